"""Command-line arguments of the training commands, defined once.

Used by ``sarcube pretrain|finetune|evaluate|predict`` (``sarcube.cli``) and by the modules' own
entry points (``python -m training.pretrain`` / ``training.finetune``, what torchrun and mpirun
launch). It imports no torch and no module that does (only ``training.config`` and ``sarcube``),
so ``sarcube --help`` and every argument check answer before torch loads
(``tests/test_layering.py`` checks it).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from sarcube import defaults
from sarcube.storage import add_storage_option_argument

__all__ = [
    "add_evaluate_arguments",
    "add_finetune_arguments",
    "add_predict_arguments",
    "add_pretrain_arguments",
    "add_run_arguments",
]


def add_run_arguments(p: argparse.ArgumentParser, overrides_example: str) -> None:
    """``--manifest --out --resume --storage-option`` and the ``key=value`` overrides."""
    p.add_argument("--manifest", required=True, help="shard manifest URL or its directory")
    p.add_argument(
        "--out", required=True, help="output directory or URL (local, s3://bucket/prefix)"
    )
    p.add_argument("--resume", action="store_true", help="continue exactly from OUT/checkpoint.pt")
    add_storage_option_argument(p)
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help=f"config overrides, e.g. {overrides_example}",
    )


def add_pretrain_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        default="simmim_tiny",
        help="profile (simmim_tiny, simmim_paper, mixmae_tiny, mixmae_paper; 'tiny' or "
        "'paper' with --method) or a YAML file (default %(default)s)",
    )
    p.add_argument(
        "--method",
        choices=("simmim", "mixmae"),
        default=None,
        help="pretraining method (default: the config's; completes 'tiny'/'paper')",
    )
    add_run_arguments(p, "optim.base_lr=1e-3 schedule.epochs=10")


def add_finetune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--task",
        choices=("lulc", "water"),
        default=None,
        help="9-class LULC or binary water (default: the config's seg.task, lulc)",
    )
    p.add_argument(
        "--config",
        default="finetune_tiny",
        help="profile (finetune_tiny, finetune_paper) or a YAML file (default %(default)s)",
    )
    p.add_argument(
        "--pretrained",
        required=True,
        metavar="CKPT|none",
        help="encoder.pth of `sarcube pretrain` (or its checkpoint), local or URL; "
        "'none': random init (the scratch baseline)",
    )
    add_run_arguments(p, "schedule.epochs=10 seg.refine_up=false")


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", required=True, help="best.pt or checkpoint.pt of `sarcube finetune`"
    )
    p.add_argument("--manifest", required=True, help="shard manifest URL or its directory")
    p.add_argument("--split", default="test", help="split to evaluate (default %(default)s)")
    p.add_argument("--out", required=True, help="report directory or URL")
    p.add_argument("--batch-size", type=int, default=None, help="default: the run's batch size")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader processes (default 0)")
    p.add_argument(
        "--panels",
        type=int,
        default=4,
        help="samples drawn in panels.png as SAR | prediction | truth (default %(default)s)",
    )
    p.add_argument("--method", default=None, help="first cell of the table row")
    add_storage_option_argument(p)


def add_predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cube", required=True, help="the cube URL")
    p.add_argument(
        "--checkpoint", required=True, help="best.pt / checkpoint.pt of `sarcube finetune`"
    )
    p.add_argument(
        "--out",
        default=None,
        help="Zarr store for the layer (default: CUBE_STEM.predictions.zarr beside the cube); "
        "the cube's own URL writes into the cube",
    )
    p.add_argument(
        "--bbox",
        nargs=4,
        type=float,
        metavar=("W", "S", "E", "N"),
        default=None,
        help="region in degrees (default: the whole cube; snapped out to 256-px chunks)",
    )
    p.add_argument(
        "--time",
        action="append",
        default=None,
        metavar="DATE|DATE/DATE",
        help="a date or a range (repeatable; default every date)",
    )
    p.add_argument(
        "--task",
        choices=("lulc", "water"),
        default=None,
        help="checked against the checkpoint's task and class count",
    )
    p.add_argument(
        "--overlap",
        type=int,
        default=defaults.PREDICT_OVERLAP,
        help="window overlap in px (default %(default)s = 50%% of a 256 px window)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=defaults.PREDICT_BATCH,
        help="windows per forward pass (default %(default)s)",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="auto (cuda when available, else cpu), cpu, cuda, cuda:N (default auto)",
    )
    p.add_argument(
        "--workers", type=int, default=0, help="Dask worker processes (default 0: this process)"
    )
    p.add_argument("--scheduler", default=None, help="address of a running Dask scheduler")
    p.add_argument(
        "--block",
        type=int,
        default=defaults.PREDICT_BLOCK,
        help="block edge in px, a multiple of 256 (default %(default)s)",
    )
    p.add_argument(
        "--probabilities", action="store_true", help="also write uint8 class probabilities"
    )
    p.add_argument(
        "--cog", default=None, help="also export a Cloud-Optimized GeoTIFF of the first date"
    )
    add_storage_option_argument(p)
    add_lock_arguments(p)


# ---------------------------------------------------------------------------------------------
# Checks of values argparse cannot express (one-line errors before any work starts)


def check_device(value: str, flag: str = "--device", allow_auto: bool = True) -> str:
    """``value`` if it names a usable device (``auto``, ``cpu``, ``cuda``, ``cuda:N``), else an
    :class:`~sarcube.errors.InputError` naming the flag; ``cuda`` needs a CUDA build and device."""
    import re

    from sarcube.errors import InputError

    forms = "auto, cpu, cuda or cuda:N" if allow_auto else "cpu, cuda or cuda:N"
    v = str(value).strip()
    if not (re.fullmatch(r"cpu|cuda(:\d+)?", v) or (allow_auto and v == "auto")):
        raise InputError(f"{flag} {value!r}: not a device; expected {forms}")
    if v.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise InputError(f"{flag} {value}: CUDA is not available on this machine (use cpu)")
        if ":" in v and int(v.split(":")[1]) >= torch.cuda.device_count():
            raise InputError(f"{flag} {value}: there are {torch.cuda.device_count()} CUDA devices")
    return v


def check_positive(value: int | None, flag: str, minimum: int = 1) -> None:
    """An :class:`~sarcube.errors.InputError` naming ``flag`` unless ``value`` ≥ ``minimum``
    (``None``: the default, accepted)."""
    from sarcube.errors import InputError

    if value is not None and value < minimum:
        raise InputError(f"{flag} must be ≥ {minimum}, got {value}")


def named_overrides(overrides: Sequence[str]) -> list[str]:
    """The dotted keys of ``key=value`` overrides (what a resume may change when allowed)."""
    return [o.split("=", 1)[0].strip() for o in overrides if "=" in o]


def run_keywords(args: argparse.Namespace) -> dict[str, Any]:
    """The keywords a training command passes to its ``run(cfg, ...)`` (``training.pretrain`` or
    ``training.finetune``): manifest, output, storage options, ``--resume`` and the config keys
    the command line names (those a resume may change)."""
    return {
        "manifest": args.manifest,
        "out": args.out,
        "storage_options": storage_options_of(args),
        "resume": args.resume,
        "allow_changes": named_overrides(args.overrides),
    }


def storage_options_of(args: argparse.Namespace) -> dict:
    """``--storage-option`` pairs plus the secret ones a launcher handed over in the
    environment (``sarcube.storage.SECRET_OPTIONS_ENV``); a malformed pair is an InputError."""
    from sarcube.errors import InputError
    from sarcube.storage import (
        RedactedOptions,
        parse_storage_options,
        secret_storage_options_from_env,
    )

    try:
        pairs = [*args.storage_option, *secret_storage_options_from_env()]
        return RedactedOptions(parse_storage_options(pairs))  # repr hides the secrets
    except ValueError as e:
        raise InputError(str(e)) from None


def _exists(url: str, storage_options: dict) -> bool:
    from sarcube.storage import url_to_fs

    fs, path = url_to_fs(url, storage_options)
    try:
        return bool(fs.exists(path))
    except FileNotFoundError:
        return False


def check_run_io(args: argparse.Namespace, storage_options: dict) -> None:
    """A training run's manifest can be read, ``--out`` written, and ``--resume`` fits what is
    there (a checkpoint to resume; none to overwrite without it)."""
    from sarcube.errors import InputError
    from sarcube.storage import check_readable, check_writable, join_url

    check_readable(args.manifest, storage_options, "--manifest")
    check_writable(args.out, storage_options, "--out", "dir")
    ckpt = join_url(str(args.out).rstrip("/"), "checkpoint.pt")
    if args.resume and not _exists(ckpt, storage_options):
        raise InputError(f"--resume: no checkpoint at {ckpt} to resume from")
    if not args.resume and _exists(ckpt, storage_options):
        raise InputError(
            f"{ckpt} exists: pass --resume to continue that run, or choose another --out"
        )


def check_pretrain_split(split: str, manifest: str, storage_options: dict) -> None:
    """The split to pretrain on exists and holds valid SAR pixels: a split whose samples are all
    no data (``db_stats.pixels == 0``) would train on constant fill values without a word."""
    from sarcube.errors import InputError
    from sarcube.shards import read_manifest

    man = read_manifest(manifest, storage_options)
    splits = man.get("splits", {})
    if split not in splits:
        raise InputError(
            f"--manifest {manifest}: no split {split!r} to pretrain on "
            f"(splits {sorted(splits)}; data.split chooses)"
        )
    info = splits[split]
    db = info.get("db_stats") or {}
    if not db.get("pixels") or db.get("mean") is None:
        n = info.get("samples", sum(int(s.get("samples", 0)) for s in info.get("shards", [])))
        raise InputError(
            f"--manifest {manifest}: the {split!r} split has no valid SAR pixel (all "
            f"{n} samples are no data): nothing to pretrain on; sample patches "
            "with data (sarcube sample --max-nodata) and write the shards again"
        )


def check_resume_config(args: argparse.Namespace, cfg, storage_options: dict) -> None:
    """On ``--resume``: the config differs from the run's (``OUT/config.yaml``) only where a
    resume may change it — ``train.*``, loader settings, and the keys of
    ``training.config.RESUME_MAY_OVERRIDE`` named as overrides (``optim.base_lr=1e-5``). The
    engine checks the same against the checkpoint; this says it before any model is built."""
    import yaml

    from sarcube.errors import InputError
    from sarcube.storage import join_url, url_to_fs

    if not args.resume:
        return
    out = str(args.out).rstrip("/")
    url = join_url(out, "config.yaml")
    if not _exists(url, storage_options):
        return
    fs, path = url_to_fs(url, storage_options)
    try:
        old = yaml.safe_load(fs.cat_file(path))
    except yaml.YAMLError:
        return
    if not isinstance(old, dict):
        return
    from training.config import RESUME_MAY_CHANGE, RESUME_MAY_OVERRIDE, config_diff

    named = [o.split("=", 1)[0].strip() for o in args.overrides if "=" in o]
    allowed = tuple(k for k in named if k in RESUME_MAY_OVERRIDE)
    diff = config_diff(old, cfg, ignore=(*RESUME_MAY_CHANGE, *allowed))
    if diff:
        lines = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise InputError(
            f"cannot resume from {join_url(out, 'checkpoint.pt')}: the config "
            f"differs from the run's in {lines} (only train.* and data loader "
            f"settings may change on a resume, and {' / '.join(RESUME_MAY_OVERRIDE)} "
            "when named as overrides, e.g. --resume optim.base_lr=1e-5)"
        )


def _load_config(config, overrides, method):
    from sarcube.errors import InputError
    from training.config import ConfigError, load_config  # yaml only: no torch

    try:
        return load_config(config, overrides, method=method)
    except ConfigError as e:
        raise InputError(str(e)) from None


def check_pretrain_args(args: argparse.Namespace):
    """Everything ``pretrain`` can check before a rank starts (no torch): the config and
    overrides, the manifest and its split, the output and ``--resume``. Returns the config."""
    cfg = _load_config(args.config, args.overrides, args.method)
    storage_options = storage_options_of(args)
    check_run_io(args, storage_options)
    check_resume_config(args, cfg, storage_options)
    check_pretrain_split(cfg.data.split, args.manifest, storage_options)
    return cfg


def check_finetune_args(args: argparse.Namespace):
    """``finetune``'s checks before a rank starts: config and overrides, the manifest, the
    pretrained weights, the output and ``--resume``. Returns the config (``seg.pretrained``
    set)."""
    from sarcube.storage import check_readable

    overrides = list(args.overrides)
    if args.task:
        overrides.insert(0, f"seg.task={args.task}")
    pre = None if args.pretrained.strip().lower() == "none" else args.pretrained
    cfg = _load_config(args.config, overrides, "finetune")
    cfg.seg.pretrained = pre
    storage_options = storage_options_of(args)
    check_run_io(args, storage_options)
    check_resume_config(args, cfg, storage_options)
    if pre is not None:
        check_readable(pre, storage_options, "--pretrained")
    return cfg


def check_evaluate_args(args: argparse.Namespace) -> None:
    """``evaluate``'s arguments before any work: batch size, device, the checkpoint and manifest
    readable, the report directory writable."""
    from sarcube.storage import check_readable, check_writable

    check_positive(args.batch_size, "--batch-size")
    check_positive(args.num_workers, "--num-workers", 0)
    check_positive(args.panels, "--panels", 0)
    check_device(args.device)
    storage_options = storage_options_of(args)
    check_readable(args.checkpoint, storage_options, "--checkpoint")
    check_readable(args.manifest, storage_options, "--manifest")
    check_writable(args.out, storage_options, "--out", "dir")


def check_predict_args(args: argparse.Namespace) -> None:
    """``predict``'s arguments before any work: numbers, the device, the cube and checkpoint
    readable, ``--out`` and ``--cog`` writable (a COG's directory must exist)."""
    from pathlib import Path

    from sarcube.errors import InputError
    from sarcube.storage import check_readable, check_writable, is_remote

    check_positive(args.batch_size, "--batch-size")
    check_positive(args.workers, "--workers", 0)
    if not 0 <= int(args.overlap) < 256:
        raise InputError(f"--overlap must be in [0, 255] pixels, got {args.overlap}")
    if args.block < 256 or args.block % 256:
        raise InputError(f"--block must be a positive multiple of 256 pixels, got {args.block}")
    check_device(args.device)
    storage_options = storage_options_of(args)
    check_readable(args.cube, storage_options, "--cube")
    check_readable(args.checkpoint, storage_options, "--checkpoint")
    if args.out:
        check_writable(args.out, storage_options, "--out", "dir")
    if args.cog:
        check_writable(args.cog, storage_options, "--cog", "file")
        if not is_remote(args.cog):
            parent = Path(args.cog).expanduser().absolute().parent
            if not parent.is_dir():
                raise InputError(f"--cog {args.cog}: the directory {parent} does not exist")


def add_lock_arguments(p: argparse.ArgumentParser) -> None:
    """``--wait`` / ``--break-stale-lock`` of every command that writes shared state."""
    p.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait up to SECONDS for another writer's lock on the output (default: fail at once)",
    )
    p.add_argument(
        "--break-stale-lock",
        action="store_true",
        help="break the output's lock if its holder stopped heart-beating "
        "(SARCUBE_LOCK_STALE_AFTER seconds, default 120)",
    )
