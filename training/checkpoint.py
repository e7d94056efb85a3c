"""Checkpoint files: atomic writes to a local path or any fsspec URL, safe loading, RNG states.

A checkpoint is a plain nested dict of tensors, numbers, strings, lists and dicts, serialised
with ``torch.save`` and read back with ``torch.load(weights_only=True)``: no pickled code runs
on load. Everything that is not such a value is converted before saving: the numpy and Python
random states become tensors, lists and ints (:func:`rng_state` / :func:`set_rng_state`), the
config a plain dict.

Writes are atomic: the whole file is serialised in memory, then

- local paths: written to a temporary file in the destination directory, fsynced, and renamed
  over the destination with ``os.replace``;
- object stores (``s3://`` ...): uploaded with one ``pipe_file`` of the finished bytes (a single
  PUT, or for very large files a multipart upload that only becomes visible when completed),

so a crash never leaves a truncated checkpoint where a good one was.

A resume must continue the run the checkpoint belongs to: :func:`check_resume_config` compares
the checkpoint's config with the resuming run's. Only :data:`RESUME_MAY_CHANGE` (``train.*``,
the data loader settings) may differ freely, and :data:`RESUME_MAY_OVERRIDE` when named as
overrides of the resuming command.
"""

from __future__ import annotations

import io
import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from sarcube.storage import url_to_fs
from sarcube.storage import write_bytes as storage_write_bytes

from .config import RESUME_MAY_CHANGE, RESUME_MAY_OVERRIDE, Config, config_diff

__all__ = [
    "RESUME_MAY_CHANGE",
    "RESUME_MAY_OVERRIDE",
    "CheckpointError",
    "check_resume_config",
    "exists",
    "load_checkpoint",
    "read_bytes",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "torch_load_safe",
    "write_bytes",
]


def write_bytes(url: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write ``data`` at ``url`` atomically (temp file + ``os.replace``, or one upload)."""
    storage_write_bytes(url, data, storage_options)


def read_bytes(url: str, storage_options: Mapping[str, Any] | None = None) -> bytes:
    fs, path = url_to_fs(url, storage_options)
    return fs.cat_file(path)


def exists(url: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    fs, path = url_to_fs(url, storage_options)
    try:
        return bool(fs.exists(path))
    except FileNotFoundError:
        return False


def save_checkpoint(
    obj: Mapping[str, Any], url: str, storage_options: Mapping[str, Any] | None = None
) -> int:
    """``torch.save(obj)`` to ``url`` atomically; returns the number of bytes written."""
    buf = io.BytesIO()
    torch.save(dict(obj), buf)
    data = buf.getvalue()
    write_bytes(url, data, storage_options)
    return len(data)


def load_checkpoint(
    url: str, storage_options: Mapping[str, Any] | None = None, map_location: Any = "cpu"
) -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)``.

    Raises:
        FileNotFoundError: nothing at ``url``.
    """
    if not exists(url, storage_options):
        raise FileNotFoundError(f"no checkpoint at {url}")
    data = read_bytes(url, storage_options)
    return torch_load_safe(data, url, map_location)


class CheckpointError(ValueError):
    """A file that ``torch.load(weights_only=True)`` refuses: not a sarcube checkpoint."""


def torch_load_safe(data: bytes, url: str, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` of ``data``; a file it refuses is a
    :class:`CheckpointError` naming ``url`` and what is wrong (never torch's advice to load with
    ``weights_only=False``, which would run the file's pickled code)."""
    import pickle
    import re

    try:
        return torch.load(io.BytesIO(data), weights_only=True, map_location=map_location)
    except pickle.UnpicklingError as e:
        m = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f" (a {m.group(1)} object)" if m else ""
        raise CheckpointError(
            f"{url}: not a sarcube checkpoint: it contains non-tensor "
            f"objects{what} that a safe load (weights only) refuses; sarcube "
            "checkpoints hold only tensors, numbers, strings, lists and "
            "dicts"
        ) from None
    except Exception as e:  # truncated, not a torch file at all, ...
        raise CheckpointError(
            f"{url}: not a sarcube checkpoint: not a readable torch file "
            f"({type(e).__name__}{': ' + str(e)[:200] if str(e) else ''})"
        ) from None


# ---------------------------------------------------------------------------------------------
# Random number generator states as weights_only-loadable values


def rng_state() -> dict[str, Any]:
    """The torch (CPU and every CUDA device), numpy and Python global RNG states, as tensors,
    lists, ints and floats."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)  # noqa: NPY002
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.uint32).astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": {
            "version": int(py_version),
            "internal": [int(v) for v in py_internal],
            "gauss_next": None if py_gauss is None else float(py_gauss),
        },
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (CUDA states only where devices match)."""
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    cuda = list(state.get("cuda") or [])
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu().to(torch.uint8) for s in cuda])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    legacy = (n["name"], keys, int(n["pos"]), int(n["has_gauss"]), float(n["cached_gaussian"]))
    np.random.set_state(legacy)  # noqa: NPY002
    p = state["python"]
    random.setstate((int(p["version"]), tuple(int(v) for v in p["internal"]), p["gauss_next"]))


# ---------------------------------------------------------------------------------------------
# Resuming a run: which config keys may differ from the checkpoint's

# RESUME_MAY_CHANGE / RESUME_MAY_OVERRIDE live in training.config (no torch: the CLI checks a
# resume's config before any rank starts) and are re-exported here.


def check_resume_config(
    saved: Mapping[str, Any], cfg: Config, url: str, allow_changes: Sequence[str] = ()
) -> dict[str, list[Any]]:
    """Whether a run of ``cfg`` may resume from a checkpoint written under config ``saved``.

    Args:
        saved: the checkpoint's ``config`` (a plain dict).
        cfg: the resuming run's config.
        url: the checkpoint's URL (for the message).
        allow_changes: config keys named as overrides of the resuming command; those in
            :data:`RESUME_MAY_OVERRIDE` may differ.

    Returns:
        Every key that differs, as ``{key: [checkpoint's value, this run's value]}``.

    Raises:
        ValueError: a key outside :data:`RESUME_MAY_CHANGE` and the allowed overrides differs.
    """
    allowed = tuple(k for k in allow_changes if k in RESUME_MAY_OVERRIDE)
    diff = config_diff(saved, cfg, ignore=(*RESUME_MAY_CHANGE, *allowed))
    if diff:
        lines = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in diff.items()))
        raise ValueError(
            f"cannot resume from {url}: the config differs from the "
            f"checkpoint's in {lines} (only train.* and data loader settings "
            f"may change on a resume, and {' / '.join(RESUME_MAY_OVERRIDE)} "
            "when named as overrides, e.g. --resume optim.base_lr=1e-5)"
        )
    return {k: list(v) for k, v in config_diff(saved, cfg).items()}
