"""The model side of sarcube: streaming loaders, models, losses, metrics, the DDP engine and
inference. It reads shards, manifests and the cube only through ``sarcube``'s public functions."""
