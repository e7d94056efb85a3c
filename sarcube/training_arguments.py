"""Command-line arguments of the training commands, defined once.

Used by ``sarcube pretrain|finetune|evaluate|predict`` (``sarcube.cli``) and by the modules' own
entry points (``python -m training.pretrain`` / ``training.finetune``, what torchrun and mpirun
launch). It lives on the data side so that building the CLI never imports ``training``, and it
imports no torch, so ``sarcube --help`` stays fast.
"""

from __future__ import annotations

import argparse

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
    p.add_argument("--out", required=True,
                   help="output directory or URL (local, s3://bucket/prefix)")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue exactly from OUT/checkpoint.pt")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="fsspec/s3fs option for the manifest, shards, weights and output, e.g. "
                        "endpoint_url=http://host:9000 (repeatable)")  # fmt: skip
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help=f"config overrides, e.g. {overrides_example}")  # fmt: skip


def add_pretrain_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="simmim_tiny",
                   help="profile (simmim_tiny, simmim_paper, mixmae_tiny, mixmae_paper; 'tiny' or "
                        "'paper' with --method) or a YAML file (default %(default)s)")  # fmt: skip
    p.add_argument("--method", choices=("simmim", "mixmae"), default=None,
                   help="pretraining method (default: the config's; completes 'tiny'/'paper')")  # fmt: skip
    add_run_arguments(p, "optim.base_lr=1e-3 schedule.epochs=10")


def add_finetune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", choices=("lulc", "water"), default=None,
                   help="9-class LULC or binary water (default: the config's seg.task, lulc)")  # fmt: skip
    p.add_argument("--config", default="finetune_tiny",
                   help="profile (finetune_tiny, finetune_paper) or a YAML file (default %(default)s)")  # fmt: skip
    p.add_argument("--pretrained", required=True, metavar="CKPT|none",
                   help="encoder.pth of `sarcube pretrain` (or its checkpoint), local or URL; "
                        "'none': random init (the scratch baseline)")  # fmt: skip
    add_run_arguments(p, "schedule.epochs=10 seg.refine_up=false")


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="best.pt or checkpoint.pt of `sarcube finetune`")  # fmt: skip
    p.add_argument("--manifest", required=True, help="shard manifest URL or its directory")
    p.add_argument("--split", default="test", help="split to evaluate (default %(default)s)")
    p.add_argument("--out", required=True, help="report directory or URL")
    p.add_argument("--batch-size", type=int, default=None, help="default: the run's batch size")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader processes (default 0)")
    p.add_argument("--panels", type=int, default=4, help="SAR | prediction | truth panels")
    p.add_argument("--method", default=None, help="first cell of the table row")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")


def add_predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cube", required=True, help="the cube URL")
    p.add_argument("--checkpoint", required=True,
                   help="best.pt / checkpoint.pt of `sarcube finetune`")  # fmt: skip
    p.add_argument("--out", default=None,
                   help="Zarr for the layer: the cube (default) or another store")  # fmt: skip
    p.add_argument("--bbox", nargs=4, type=float, metavar=("W", "S", "E", "N"), default=None,
                   help="region in degrees (default: the whole cube; snapped out to 256-px chunks)")  # fmt: skip
    p.add_argument("--time", action="append", default=None, metavar="DATE|DATE/DATE",
                   help="a date or a range (repeatable; default every date)")  # fmt: skip
    p.add_argument("--task", choices=("lulc", "water"), default=None,
                   help="checked against the checkpoint's task and class count")  # fmt: skip
    p.add_argument("--overlap", type=int, default=128,
                   help="window overlap in px (default 128 = 50%%)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=16,
                   help="windows per forward pass (default 16)")  # fmt: skip
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--workers", type=int, default=0,
                   help="Dask worker processes (default 0: this process)")  # fmt: skip
    p.add_argument("--scheduler", default=None, help="address of a running Dask scheduler")
    p.add_argument("--block", type=int, default=1024,
                   help="block edge in px, a multiple of 256 (default 1024)")  # fmt: skip
    p.add_argument("--probabilities", action="store_true",
                   help="also write uint8 class probabilities")  # fmt: skip
    p.add_argument("--cog", default=None,
                   help="also export a Cloud-Optimized GeoTIFF of the first date")  # fmt: skip
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")
