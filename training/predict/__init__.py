"""Large-area inference: seamless, out-of-core land-cover and water maps from the cube.

::

    sarcube predict --cube cube.zarr --checkpoint runs/lulc/best.pt --out cube.zarr [...]
    python -m training.predict ...                                  # the same

A fine-tuned segmenter is applied to 256² windows on one lattice anchored at the cube's origin,
their class probabilities blended with smooth weights, block by block, so a map of any size is
seamless, independent of how it was cut, and made in the memory of one block per worker. The
parts, each with its own account:

- :mod:`~training.predict.windows`: the window lattice and the blending weights (pure numpy);
- :mod:`~training.predict.predictor`: the segmenter of a checkpoint, applied to cube dB values;
- :mod:`~training.predict.blocks`: one block: read with its halo, blend, write, mark done;
- :mod:`~training.predict.store`: the prediction layers' Zarr schema and the resume markers;
- :mod:`~training.predict.scoring`: region-wide scores against the cube's labels;
- :mod:`~training.predict.export`: PNG panels and the Cloud-Optimized GeoTIFF;
- :mod:`~training.predict.run`: :func:`predict` (in this process or on Dask) and the CLI.
"""

from __future__ import annotations

from .blocks import predict_array, run_block
from .export import export_cog
from .predictor import PredictError, Predictor, load_predictor
from .run import PredictResult, check_args, main, predict, run_args
from .store import LAYERS, NODATA, PROB_LAYERS
from .windows import WINDOW, blend_weight, window_starts

__all__ = [
    "LAYERS",
    "NODATA",
    "PROB_LAYERS",
    "WINDOW",
    "PredictError",
    "PredictResult",
    "Predictor",
    "blend_weight",
    "check_args",
    "export_cog",
    "load_predictor",
    "main",
    "predict",
    "predict_array",
    "run_args",
    "run_block",
    "window_starts",
]
