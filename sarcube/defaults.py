"""The defaults of the pipeline's parameters, each stated once.

The library's signatures and dataclasses take their defaults from here, and the command line
shows the same values in ``--help`` without importing the modules that use them (pandas, Dask,
torch): ``sarcube --help`` stays fast. Sources of the paper values: docs/design.md §4.
"""

from __future__ import annotations

from .classes import FOREST_CODES

# sarcube sample (sarcube.sampling.SamplingParams)
N_ANCHORS = 1_000_000  # anchors drawn (the papers: 1,000,000)
SAMPLING_SEED = 0
EXCLUDE_FULL = FOREST_CODES  # patches made only of forest are dropped
PRETRAIN_MONTHS = (10, 11)  # October–November scenes: pretraining
FINETUNE_MONTHS = (9,)  # September scenes: fine-tuning and evaluation
SPLIT_FRACTIONS = (0.65, 0.18, 0.17)  # train, val, test
MAX_NODATA = 0.0  # largest no-data share of a kept patch
SPLIT_BLOCK = 4  # patches per side of a spatial split block
PATCH = 256  # patch side, px

# sarcube ingest (sarcube.ingestion.ingest)
EDGE_NODATA_PCT = 50.0  # a cell is no data when at least this % of its source pixels are

# sarcube shards (sarcube.shards.write_shards)
SHARD_SIZE_MB = 256  # MiB (an int: the manifest records it as given)
MIN_SHARDS_PER_SPLIT = 8  # ≥ 4 × ranks × loader workers
SHARD_SEED = 0

# sarcube predict (training.predict.predict)
PREDICT_OVERLAP = 128  # px between neighbouring windows (50 % of a 256 px window)
PREDICT_BATCH = 16  # windows per forward pass
PREDICT_BLOCK = 1024  # px per block edge, a multiple of the window
