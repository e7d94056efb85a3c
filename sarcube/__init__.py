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

# The public API, imported on first use so that `import sarcube` (and the CLI) stay fast.
_API = {
    "open_cube": ".cube",
    "ingest": ".ingestion",
    "synthesize": ".synth",
    "sample_patches": ".sampling",
    "SamplingParams": ".sampling",
    "write_shards": ".shards",
    "iter_samples": ".shards",
    "recut_patch": ".shards",
    "read_manifest": ".shards",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from importlib import import_module

        return getattr(import_module(_API[name], __name__), name)
    raise AttributeError(f"module 'sarcube' has no attribute {name!r}")


def __dir__() -> list[str]:
    # the lazy names too, so that tab completion and dir(sarcube) list the public API
    return sorted({*globals(), *_API})
