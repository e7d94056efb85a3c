"""What each ``sarcube`` subcommand does once its arguments are parsed (:mod:`sarcube.cli` holds
the parser): call one library function, print what it produced, return the exit status.

Library and model imports stay inside the functions, so that ``sarcube --help`` and a bad
argument answer in a fraction of a second, before Dask, torch or rasterio load.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .errors import InputError


def _bbox(values: Sequence[str]) -> tuple[float, float, float, float]:
    return tuple(float(v) for v in values)  # type: ignore[return-value]


def _synth_kwargs(args: argparse.Namespace) -> dict:
    from .storage import parse_storage_options

    return dict(
        bbox=_bbox(args.bbox),
        dates=args.dates,
        scenes_per_date=args.scenes_per_date,
        seed=args.seed,
        lulc_template=args.lulc_template,
        looks=args.looks,
        direction=args.direction,
        storage_options=parse_storage_options(args.storage_option),
    )


def cmd_synth(args: argparse.Namespace) -> int:
    from .synth import synthesize

    res = synthesize(args.out, **_synth_kwargs(args))
    print(
        f"wrote {len(res.lulc_urls)} HR-LULC tiles and {len(res.scene_urls)} scenes under {res.out}"
    )
    for u in res.lulc_urls + res.scene_urls:
        print(f"  {u}")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from .ingestion import ingest
    from .storage import parse_storage_options

    report = ingest(
        scenes=args.scenes,
        cube=args.cube,
        lulc=args.lulc or (),
        bbox=_bbox(args.bbox) if args.bbox else None,
        resolution=args.resolution,
        scheduler=args.scheduler,
        workers=args.workers,
        strict=args.strict,
        storage_options=parse_storage_options(args.storage_option),
        mosaic_date=args.mosaic_date,
        edge_nodata_pct=args.edge_nodata_pct,
        memory_limit=args.memory_limit,
        wait=args.wait,
        break_stale_lock=args.break_stale_lock,
    )
    print(report.summary())
    return 0 if report.ok else 1


def cmd_info(args: argparse.Namespace) -> int:
    import json

    from .info import describe, format_description
    from .storage import parse_storage_options

    d = describe(args.url, parse_storage_options(args.storage_option))
    print(json.dumps(d, indent=2, sort_keys=True) if args.json else format_description(d))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_layer
    from .storage import parse_storage_options

    done = export_layer(
        args.cube,
        args.var,
        args.out,
        time=args.time,
        bbox=args.bbox,
        format=args.format,
        storage_options=parse_storage_options(args.storage_option),
    )
    dates = ", ".join(done["dates"]) or "no time axis"
    h, w = done["shape"]
    print(f"wrote {done['path']} ({done['format']}, {done['variable']}, {dates}, {h} x {w} px)")
    return 0


def cmd_unlock(args: argparse.Namespace) -> int:
    from .locking import break_lock
    from .storage import parse_storage_options

    print(break_lock(args.url, parse_storage_options(args.storage_option), force=args.force))
    return 0


def _check_io(
    storage_options: dict, read: dict[str, str], write: dict[str, tuple[str, str]]
) -> None:
    """Up-front checks of a command's inputs and outputs (bucket there and allowed, paths of the
    right kind), so that a bad URL is one line naming it before any work starts."""
    from .storage import check_readable, check_writable

    for what, url in read.items():
        check_readable(url, storage_options, what)
    for what, (url, kind) in write.items():
        check_writable(url, storage_options, what, kind)


def cmd_sample(args: argparse.Namespace) -> int:
    from .sampling import SamplingParams, sample_patches
    from .storage import parse_storage_options

    params = SamplingParams(
        n_anchors=args.n_anchors,
        seed=args.seed,
        exclude_full=tuple(args.exclude_full),
        pretrain_months=tuple(args.pretrain_months),
        finetune_months=tuple(args.finetune_months),
        split=tuple(args.split),
        max_nodata=args.max_nodata,
        block=args.block,
    )
    storage_options = parse_storage_options(args.storage_option)
    _check_io(storage_options, read={"--cube": args.cube}, write={"--out": (args.out, "file")})
    res = sample_patches(args.cube, args.out, params, storage_options)
    counts = res.index.groupby("split").size().to_dict()
    print(
        f"wrote {args.out}: {len(res.index)} patches "
        f"({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))})"
    )
    for k, v in res.files.items():
        if k != "index":
            print(f"  {k}: {v}")
    return 0


def cmd_shards(args: argparse.Namespace) -> int:
    from .shards import write_shards
    from .storage import join_url, parse_storage_options

    _check_io(
        parse_storage_options(args.storage_option),
        read={"--cube": args.cube, "--index": args.index},
        write={"--out": (args.out, "dir")},
    )
    manifest = write_shards(
        args.cube,
        args.index,
        args.out,
        shard_size_mb=args.shard_size_mb,
        min_shards_per_split=args.min_shards,
        seed=args.seed,
        storage_options=parse_storage_options(args.storage_option),
        scheduler=args.scheduler,
        workers=args.workers,
        verify=args.verify,
        wait=args.wait,
        break_stale_lock=args.break_stale_lock,
    )
    for split, info in manifest["splits"].items():
        n = sum(s["samples"] for s in info["shards"])
        print(f"  {split}: {len(info['shards'])} shards, {n} samples")
    print(f"manifest: {join_url(args.out, 'manifest.json')}")
    return 0


def _forwarded(args: argparse.Namespace) -> list[str]:
    """The subcommand's own arguments as typed, without the launcher's ``--nproc`` and ``-v``
    (the ranks get the verbosity from ``args.verbose``)."""
    out, skip = [], False
    for tok in args.argv:
        if skip:
            skip = False
        elif tok == "--nproc":
            skip = True
        elif not tok.startswith("--nproc=") and tok not in ("-v", "--verbose"):
            out.append(tok)
    return out


def cmd_pretrain(args: argparse.Namespace) -> int:
    return _launch("training.pretrain", _forwarded(args), args.nproc, args.command, args.verbose)


def _launch(
    module: str, argv: list[str], nproc: int, command: str = "", verbose: bool = False
) -> int:
    """``module``'s main in-process for one process, else ``torch.distributed.run`` with
    ``nproc`` local ranks (gloo on CPU, NCCL on GPUs).

    The arguments are checked here first (config, manifest, output), so that bad input is one
    line before any rank starts. Secret storage options (``key``, ``secret``, ``token`` …) are
    not put on the ranks' command lines, which every user of the machine can read, nor printed:
    they travel in the ``SARCUBE_SECRET_STORAGE_OPTIONS`` environment variable, which the ranks'
    entry points merge back."""
    import importlib
    import json
    import os

    from training import arguments as ta

    from .storage import SECRET_OPTIONS_ENV, redact_argv, split_secret_storage_options

    if nproc < 1:
        raise InputError(f"--nproc must be ≥ 1, got {nproc}")
    # the arguments checked before torch is imported or any rank starts (SarcubeError)
    parser = argparse.ArgumentParser(prog=f"sarcube {command}")
    kind = module.rsplit(".", 1)[-1]
    getattr(ta, f"add_{kind}_arguments")(parser)
    getattr(ta, f"check_{kind}_args")(parser.parse_intermixed_args(argv))
    mod = importlib.import_module(module)  # the model side, imported lazily
    prog = f"sarcube {command}" if command else None
    if nproc == 1:
        return mod.main(argv, prog=prog, verbose=verbose)
    forwarded, secrets = split_secret_storage_options(argv)
    shown = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        module,
        *redact_argv(argv),
    ]
    print("launching: " + " ".join(shown), flush=True)
    handed = {
        SECRET_OPTIONS_ENV: json.dumps(secrets) if secrets else None,
        "SARCUBE_PROG": prog,
    }  # the ranks' error lines read "sarcube <command>: error: …"
    saved = {k: os.environ.get(k) for k in handed}
    for k, v in handed.items():
        if v is not None:
            os.environ[k] = v
    try:
        return _torchrun(
            ["--standalone", f"--nproc_per_node={nproc}", "-m", module, *forwarded], verbose
        )
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _torchrun(args: list[str], verbose: bool = False) -> int:
    """``torch.distributed.run`` in this process; a rank's failure is its exit status (each rank
    printed its own one-line error), without torchrun's ChildFailedError traceback."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if not verbose:
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(parse_args(args))
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        return failure.exitcode if failure.exitcode and failure.exitcode > 0 else 1
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    return _launch("training.finetune", _forwarded(args), args.nproc, args.command, args.verbose)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from training.arguments import check_evaluate_args

    check_evaluate_args(args)  # before torch is imported: bad input fails in a second
    from training.evaluation import run_evaluate_args

    return run_evaluate_args(args)


def cmd_ablation(args: argparse.Namespace) -> int:
    from training.ablation import run_ablation
    from training.config import ConfigError

    from .storage import parse_storage_options

    pre = args.pretrained
    try:
        res = run_ablation(
            args.manifest,
            pre,
            args.out,
            args.config,
            args.overrides,
            parse_storage_options(args.storage_option),
        )
    except (ConfigError, FileNotFoundError, ValueError) as e:
        raise InputError(str(e)) from None
    print(res["markdown"])
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from training.arguments import check_predict_args

    check_predict_args(args)  # before torch is imported: bad input fails in a second
    from training.predict import run_args

    return run_args(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, workers=args.workers, **_synth_kwargs(args))
    return 0
