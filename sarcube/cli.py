"""The ``sarcube`` command line: the parser (one ``_add_<name>_command`` per subcommand) and
``main``.

Each subcommand's work is a ``cmd_<name>`` in :mod:`sarcube.commands`, a thin layer over one
library function; errors caused by bad input (``SarcubeError``) are printed as one line naming the
problem, with exit status 2 (:func:`sarcube.errors.run_command`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from training.arguments import (
    add_evaluate_arguments,
    add_finetune_arguments,
    add_lock_arguments,
    add_predict_arguments,
    add_pretrain_arguments,
)

from . import __version__, commands, defaults
from .errors import run_command
from .storage import add_storage_option_argument


def _add_synth_options(p: argparse.ArgumentParser) -> None:
    from .synth import DEFAULT_BBOX, DEFAULT_DATES

    p.add_argument(
        "--bbox",
        nargs=4,
        metavar=("W", "S", "E", "N"),
        type=float,
        default=DEFAULT_BBOX,
        help="region in degrees (EPSG:4326); default: Tsukuba / Lake Kasumigaura, "
        "0.4267° a side (10 × 10 patches of 256² at the cube's 1/6000° pixel)",
    )
    p.add_argument(
        "--dates",
        nargs="+",
        default=[str(d) for d in DEFAULT_DATES],
        help="acquisition dates YYYY-MM-DD (default: %(default)s)",
    )
    p.add_argument("--scenes-per-date", type=int, default=1, help="frames per pass (default 1)")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of every random draw (default %(default)s)"
    )
    p.add_argument(
        "--lulc-template",
        default=None,
        help="the real 250 m national HR-LULC GeoTIFF to refine; default: procedural",
    )
    p.add_argument("--looks", type=float, default=3.0, help="speckle looks (default 3)")
    p.add_argument("--direction", choices=("A", "D"), default="D", help="pass direction")
    add_storage_option_argument(p)


def _add_synth_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write synthetic ALOS-2 scenes and HR-LULC tiles",
        description="Write HR-LULC-format label tiles (lulc/) and ALOS-2 L2.1-style "
        "HH scenes (scenes/) for a region, deterministically from a seed.",
    )
    p.add_argument(
        "--out", required=True, help="output directory or URL (local, s3://bucket/prefix)"
    )
    _add_synth_options(p)
    p.set_defaults(func=commands.cmd_synth)


def _add_ingest_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ingest",
        help="ingest ALOS-2 scenes and HR-LULC tiles into the Zarr datacube",
        description="Calibrate, resample (one step, average of linear power) and mosaic "
        "ALOS-2 scenes onto the cube grid with Dask; align HR-LULC labels. "
        "Resumable: scenes already in the cube are skipped.",
    )
    p.add_argument(
        "--scenes",
        nargs="+",
        default=[],
        metavar="URL",
        help="scene files, globs, directories or s3:// prefixes (IMG-HH-ALOS2…tif, mosaic tiles)",
    )
    p.add_argument(
        "--lulc",
        nargs="+",
        metavar="URL",
        help="HR-LULC tiles (LC_N..E...tif): files, globs, prefixes",
    )
    p.add_argument("--cube", required=True, help="cube URL (local path or s3://bucket/cube.zarr)")
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--scheduler",
        help=(
            "address of a running Dask scheduler (tcp://host:8786, or tls://host:8786 with "
            "SARCUBE_TLS_DIR)"
        ),
    )
    g.add_argument(
        "--workers", type=int, help="start a LocalCluster with N worker processes (default 2)"
    )
    p.add_argument("--memory-limit", help="memory limit per local worker, e.g. 2GB (default: auto)")
    p.add_argument(
        "--bbox",
        nargs=4,
        type=float,
        metavar=("W", "S", "E", "N"),
        help="extent of a new cube in degrees (default: the HR-LULC tiles' extent)",
    )
    p.add_argument("--resolution", help="cell size of a new cube, 1/n degree (default 1/6000)")
    p.add_argument(
        "--strict", action="store_true", help="fail (exit 2) when any input has a problem"
    )
    p.add_argument(
        "--mosaic-date", help="acquisition date YYYY-MM-DD for mosaic tiles without their XML"
    )
    p.add_argument(
        "--edge-nodata-pct",
        type=float,
        default=defaults.EDGE_NODATA_PCT,
        help="a cell is no data when at least this %% of its source pixels are "
        "(default %(default)s)",
    )
    add_storage_option_argument(p)
    add_lock_arguments(p)
    p.set_defaults(func=commands.cmd_ingest)


def _add_sample_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample",
        help="category-aware patch sampling -> patch index (Parquet) + report",
        description="Class-balanced sampling of 256² patches (inverse-frequency anchors), "
        "splits by month (pretrain / fine-tuning) and spatial blocks "
        "(train/val/test), written as a Parquet patch index with a report.",
    )
    p.add_argument("--cube", required=True, help="cube URL")
    p.add_argument(
        "--out", required=True, help="patch index URL (.parquet); the report goes beside it"
    )
    p.add_argument(
        "--n-anchors",
        type=int,
        default=defaults.N_ANCHORS,
        help="anchors to draw (default %(default)s, as in the papers)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=defaults.SAMPLING_SEED,
        help="seed of the anchor draw and the split blocks' order (default %(default)s)",
    )
    p.add_argument(
        "--exclude-full",
        type=int,
        nargs="*",
        default=list(defaults.EXCLUDE_FULL),
        help="drop patches made only of these codes (default: forest %(default)s)",
    )
    p.add_argument(
        "--pretrain-months",
        type=int,
        nargs="+",
        default=list(defaults.PRETRAIN_MONTHS),
        metavar="M",
        help="months (1-12) whose dates go to the pretrain split (default %(default)s)",
    )
    p.add_argument(
        "--finetune-months",
        type=int,
        nargs="+",
        default=list(defaults.FINETUNE_MONTHS),
        metavar="M",
        help="months whose dates go to train/val/test (default %(default)s)",
    )
    p.add_argument(
        "--split",
        type=float,
        nargs=3,
        default=list(defaults.SPLIT_FRACTIONS),
        metavar=("TRAIN", "VAL", "TEST"),
        help="shares of the fine-tuning patches, by spatial block (default %(default)s)",
    )
    p.add_argument(
        "--max-nodata",
        type=float,
        default=defaults.MAX_NODATA,
        help="max no-data share of a patch (default %(default)s)",
    )
    p.add_argument(
        "--block",
        type=int,
        default=defaults.SPLIT_BLOCK,
        help="split block size in patches (default %(default)s)",
    )
    add_storage_option_argument(p)
    p.set_defaults(func=commands.cmd_sample)


def _add_shards_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "shards",
        help="write WebDataset shards per split + manifest.json (Dask)",
        description="Cut the indexed patches from the cube into WebDataset tar shards "
        "({split}-{n:06d}.tar) on any fsspec URL; manifest.json (written last) "
        "lists shards, sha256, dB statistics and class frequencies.",
    )
    p.add_argument("--cube", required=True, help="cube URL")
    p.add_argument("--index", required=True, help="patch index from `sarcube sample`")
    p.add_argument(
        "--out", required=True, help="output directory/prefix (local or s3://bucket/prefix)"
    )
    p.add_argument(
        "--shard-size-mb",
        type=float,
        default=defaults.SHARD_SIZE_MB,
        help="target shard size in MiB (default %(default)s)",
    )
    p.add_argument(
        "--min-shards",
        type=int,
        default=defaults.MIN_SHARDS_PER_SPLIT,
        help="at least this many shards per split; use ≥ 4 × ranks × loader workers "
        "(default %(default)s)",
    )
    p.add_argument(
        "--seed", type=int, default=defaults.SHARD_SEED, help="shuffle of samples across shards"
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--scheduler", help="address of a running Dask scheduler")
    g.add_argument("--workers", type=int, help="LocalCluster worker processes (default 2)")
    add_storage_option_argument(p)
    p.add_argument(
        "--verify",
        action="store_true",
        help="compare every sample of each kept shard with a fresh cut from the cube "
        "(default: 2 per shard; kept shards are always hashed against the old manifest)",
    )
    add_lock_arguments(p)
    p.set_defaults(func=commands.cmd_shards)


def _add_pretrain_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="pretrain the Swin encoder (SAR-W-SimMIM / SAR-W-MixMAE) on shards",
        description="Stream the manifest's pretrain split and train SAR-W-SimMIM or "
        "SAR-W-MixMAE; checkpoints, encoder.pth, metrics and a reconstruction "
        "figure go to --out. --nproc N > 1 runs N local DDP ranks (torchrun; "
        "gloo on CPU, NCCL on GPUs).",
    )
    add_pretrain_arguments(p)
    p.add_argument("--nproc", type=int, default=1, help="local processes (DDP ranks; default 1)")
    p.set_defaults(func=commands.cmd_pretrain)


def _add_finetune_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune the refined UPerNet (LULC or water) on shards",
        description="Stream the manifest's train split, fine-tune the Swin encoder + "
        "refined UPerNet, validate every epoch (best.pt by val mIoU / "
        "water IoU) and evaluate the test split with the best weights "
        "(report in OUT/test). --nproc N > 1 runs N local DDP ranks.",
    )
    add_finetune_arguments(p)
    p.add_argument("--nproc", type=int, default=1, help="local processes (DDP ranks; default 1)")
    p.set_defaults(func=commands.cmd_finetune)


def _add_evaluate_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="evaluate a fine-tuned checkpoint on a split (report)",
        description="Confusion matrix of a fine-tuning checkpoint (best.pt or "
        "checkpoint.pt) over a split; writes report.json, report.md "
        "(Table II layout), confusion_matrix.png, per_class.png and "
        "panels.png to --out.",
    )
    add_evaluate_arguments(p)
    p.set_defaults(func=commands.cmd_evaluate)


def _add_ablation_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ablation",
        help="train + validate the variants of Table I (refinements)",
        description="Fine-tune and validate the five variants of Table I of arXiv "
        "2601.15705 (pretraining, high-res injection, refine-up, "
        "α-scale) and write ablation.md / ablation.json to --out. A "
        "reproduction of the procedure (tiny profile by default).",
    )
    p.add_argument("--manifest", required=True, help="shards with train and val splits")
    p.add_argument("--pretrained", required=True, help="encoder.pth for the pretrained variants")
    p.add_argument("--out", required=True, help="output directory or URL")
    p.add_argument("--config", default="finetune_tiny", help="profile (default %(default)s)")
    add_storage_option_argument(p)
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="overrides for every variant, e.g. schedule.epochs=5",
    )
    p.set_defaults(func=commands.cmd_ablation)


def _add_predict_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="map a region of the cube with a fine-tuned model (Zarr + COG)",
        description="Sliding-window, seamless, out-of-core inference over a bbox and "
        "dates of the cube: writes pred_lulc / pred_water (uint8, 255 = no "
        "data) into the cube or another Zarr store, scores against the "
        "cube's labels, a PNG panel, and optionally a COG.",
    )
    add_predict_arguments(p)
    p.set_defaults(func=commands.cmd_predict)


def _add_unlock_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "unlock",
        help="remove the write lock of a cube, shard prefix or run folder",
        description="Remove <URL>/.sarcube-lock.json left by a writer that died. Refuses a "
        "lock whose holder still heart-beats unless --force.",
    )
    p.add_argument("url", help="the store: cube, shard prefix, prediction store or run folder")
    p.add_argument(
        "--force", action="store_true", help="break even a live lock (its writer may corrupt)"
    )
    add_storage_option_argument(p)
    p.set_defaults(func=commands.cmd_unlock)


def _add_info_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="what a cube, predictions store or shard set holds",
        description="Variables, dates with their slice status, bbox, resolution, chunking, "
        "labels and size on disk of a cube or predictions store; splits, shards and samples of "
        "a shard set. Read-only.",
    )
    p.add_argument("url", help="a cube / predictions store (.zarr) or a shard directory")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    add_storage_option_argument(p)
    p.set_defaults(func=commands.cmd_info)


def _add_export_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="one layer of a cube or predictions store as a COG or netCDF file",
        description="Write hh_db, lulc or a pred_* layer over a bbox and date as a "
        "Cloud-Optimized GeoTIFF (one date; nodata, band description, colour table and class "
        "names for class layers) or a CF netCDF-4 file (any dates), on the cube's own pixels.",
    )
    p.add_argument("--cube", required=True, help="the cube or predictions store (.zarr) URL")
    p.add_argument("--var", required=True, help="the variable: hh_db, lulc, pred_lulc, ...")
    p.add_argument("--out", required=True, help="the output file: .tif (COG) or .nc (netCDF)")
    p.add_argument(
        "--time",
        metavar="YYYY-MM-DD",
        help="the date (a complete slice); needed for a COG of several dates (default: every "
        "date for netCDF)",
    )
    p.add_argument(
        "--bbox",
        nargs=4,
        type=float,
        metavar=("W", "S", "E", "N"),
        help="degrees (EPSG:4326); every cube cell it touches (default: the whole store)",
    )
    p.add_argument(
        "--format",
        choices=("cog", "netcdf"),
        help="the output format (default: from the --out suffix)",
    )
    add_storage_option_argument(p)
    p.set_defaults(func=commands.cmd_export)


def _add_demo_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the end-to-end demo on built-in synthetic data",
        description="The end-to-end demo: synthetic inputs and each pipeline stage "
        "built so far, with a summary of what was produced and where.",
    )
    p.add_argument("--out", default="demo-output", help="output directory (default %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="Dask worker processes (default 2)")
    _add_synth_options(p)
    p.set_defaults(func=commands.cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sarcube",
        description="ALOS-2 SAR foundation-model pipeline: synth -> ingest -> sample -> shards -> "
        "pretrain -> finetune -> evaluate -> predict.",
    )
    parser.add_argument("--version", action="version", version=f"sarcube {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in (
        _add_synth_command,
        _add_ingest_command,
        _add_sample_command,
        _add_shards_command,
        _add_pretrain_command,
        _add_finetune_command,
        _add_evaluate_command,
        _add_ablation_command,
        _add_predict_command,
        _add_unlock_command,
        _add_info_command,
        _add_export_command,
        _add_demo_command,
    ):
        add_command(sub)
    from .security import add_tls_certs_parser

    add_tls_certs_parser(sub)
    for command in sub.choices.values():  # `sarcube ingest … -v` as well as `sarcube -v ingest`
        command.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            default=argparse.SUPPRESS,  # absent: the top-level flag's value stands
            help="debug logging and tracebacks",
        )
    return parser


_URL_ARGUMENTS = ("cube", "index", "out", "manifest", "checkpoint", "pretrained", "cog", "url")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    raw = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(raw)
    if extra:  # key=value overrides after options (`… --resume optim.base_lr=1e-5`) are theirs
        if hasattr(args, "overrides") and all("=" in t and not t.startswith("-") for t in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.parse_args(raw)  # argparse's own message and exit status 2
    if getattr(args, "command", None) in raw:  # what follows the subcommand (forwarded to ranks)
        args.argv = raw[raw.index(args.command) + 1 :]
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("sarcube").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if not args.verbose:
        logging.getLogger("distributed").setLevel(logging.WARNING)  # the dashboard link is printed
        # A LocalCluster shutting down races its own comms; the tracebacks are not actionable.
        for name in (
            "distributed.batched",
            "distributed.comm",
            "distributed.core",
            "distributed.worker",
        ):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    return run_command(
        lambda: args.func(args),
        f"sarcube {args.command}",
        args.verbose,
        describe=[lambda e: _storage_failure(e, args)],
    )


def _storage_failure(e: BaseException, args: argparse.Namespace) -> str | None:
    """One line for a storage failure (missing bucket, denied, no credentials), or ``None``."""
    from .storage import storage_error_message

    msg = storage_error_message(e)
    if msg is not None and "://" not in msg:  # s3fs does not say which object: name the URLs
        urls = [
            f"--{k.replace('_', '-')} {v}"
            for k, v in sorted(vars(args).items())
            if k in _URL_ARGUMENTS and isinstance(v, str) and "://" in v
        ]
        msg += f" (on {', '.join(urls)})" if urls else ""
    return msg


if __name__ == "__main__":
    sys.exit(main())
