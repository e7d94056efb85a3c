"""sarcube: ALOS-2 SAR scenes and JAXA land-cover maps -> Zarr datacube -> class-balanced
WebDataset shards -> masked-image pretraining and segmentation fine-tuning -> region-wide maps.

The data side lives here (``sarcube``); the model side in the sibling package ``training``.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sarcube")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0+unknown"

__all__ = ["__version__"]
