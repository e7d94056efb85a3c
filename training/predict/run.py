"""A prediction run: ``predict(...)`` and ``sarcube predict``.

::

    sarcube predict --cube cube.zarr --checkpoint runs/lulc/best.pt [--out cube.predictions.zarr] \\
        [--bbox W S E N] [--time 2022-09-12 | 2022-09-01/2022-10-31] [--task lulc|water] \\
        [--overlap 128] [--batch-size 16] [--device auto|cpu|cuda] [--workers N] \\
        [--probabilities] [--cog map.tif]

**Out of core.** The region (bbox snapped outward to whole 256-px chunks) is cut into blocks of
``block`` × ``block`` pixels aligned to the chunks (:mod:`training.predict.blocks`: each reads its
halo, predicts and writes only its own pixels, so memory is that of one block per worker,
independent of the region's size). Blocks run in this process (``workers=0``, or on one GPU with
``device="cuda"``), or as tasks on a Dask cluster (``workers`` local processes or a scheduler).
Blocks whose resume marker is current are skipped (:mod:`training.predict.store`). With labels in
the cube the run is scored (:mod:`training.predict.scoring`); panels and the COG are
:mod:`training.predict.export`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import logging
import sys
import time as _time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sarcube import defaults
from sarcube.cube import FORMAT, PREDICTIONS_FORMAT, cube_attrs, cube_grid, open_group, publish_view
from sarcube.errors import InputError
from sarcube.grid import CubeGrid
from sarcube.locking import StoreLock
from sarcube.stac import write_predictions_item, write_stac_record
from sarcube.storage import RedactedOptions

from .blocks import BlockJob, run_block
from .export import export_cog, write_panels
from .predictor import PredictError, Predictor, load_predictor
from .scoring import region_scores
from .store import (
    marker_is_current,
    marker_url,
    prepare_output,
    read_marker,
    same_store,
    slice_id,
)
from .windows import WINDOW, region_blocks

__all__ = ["PredictResult", "check_args", "main", "predict", "run_args"]

OUTPUT_FORMATS = (PREDICTIONS_FORMAT, FORMAT)  # a predictions store, or the cube itself


@dataclass
class PredictResult:
    """What ``predict`` did."""

    out: str
    layer: str
    task: str
    dates: list[str]
    region: tuple[int, int, int, int]  # cube pixels (r0, r1, c0, c1), chunk-snapped
    bounds: tuple[float, float, float, float]  # W, S, E, N of the region
    blocks: int
    skipped: int  # blocks already done (resume)
    seconds: float
    megapixels: float  # predicted this run (valid or not), all dates
    scores: dict[str, Any] = field(default_factory=dict)  # date -> scores (labels present)
    panels: list[str] = field(default_factory=list)
    cog: str | None = None


# ---------------------------------------------------------------------------------------------
# What to predict: dates and region


def _dates_of(item: str, done: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    """The complete slices (date, time index) of ``item``: a date, or a ``DATE/DATE`` (or
    ``DATE..DATE``) range."""
    s = str(item).strip()
    bad = f"--time {s!r}: expected DATE or DATE/DATE (YYYY-MM-DD)"
    if "/" in s or ".." in s:
        a, b = s.replace("..", "/").split("/", 1)
        try:
            lo, hi = dt.date.fromisoformat(a.strip()), dt.date.fromisoformat(b.strip())
        except ValueError:
            raise PredictError(bad) from None
        got = [x for x in done if lo <= dt.date.fromisoformat(x[0]) <= hi]
    else:
        try:
            want = dt.date.fromisoformat(s)
        except ValueError:
            raise PredictError(bad) from None
        got = [x for x in done if x[0] == want.isoformat()]
    if not got:
        raise PredictError(
            f"--time {s}: no data for that date in the cube (dates: "
            f"{', '.join(d for d, _ in done)})"
        )
    return got


def _select_dates(root, time: str | Sequence[str] | None) -> list[tuple[str, int]]:
    """(date, time index) of the complete slices ``time`` asks for (default: all of them)."""
    slices = cube_attrs(root).get("slices", {})
    done = sorted(
        (d, int(v["time_index"])) for d, v in slices.items() if v.get("status") == "complete"
    )
    if not done:
        raise PredictError("the cube has no complete time slice (nothing to predict)")
    if time is None:
        return done
    items = [time] if isinstance(time, str) else list(time)
    out = []
    for item in items:
        out += _dates_of(item, done)
    return sorted(set(out))


def _region(grid: CubeGrid, bbox: Sequence[float] | None) -> tuple[int, int, int, int]:
    """``bbox`` (W S E N degrees; None: the whole cube) as cube pixels (r0, r1, c0, c1),
    clipped to the cube and snapped outward to whole chunks."""
    if bbox is None:
        return 0, grid.height, 0, grid.width
    try:
        return grid.bbox_window(tuple(bbox), snap_to_chunks=True)  # type: ignore[arg-type]
    except InputError as e:
        raise PredictError(str(e)) from None


# ---------------------------------------------------------------------------------------------
# The run


def _open_source(cube: str, storage_options: Mapping[str, Any]):
    """The cube's root group, checked to hold ``hh_db`` and ``time``; ``PredictError``
    otherwise."""
    try:
        root = open_group(cube, storage_options)
    except Exception as e:
        from sarcube.storage import storage_error_message

        raise PredictError(f"--cube {cube}: {storage_error_message(e) or e}") from None
    for var in ("hh_db", "time"):
        if var not in root:
            raise PredictError(f"{cube}: the cube has no {var!r} variable (not ingested?)")
    return root


def _resolve_predictor(
    checkpoint: str | Predictor, storage_options: Mapping[str, Any], task: str | None, device: str
) -> tuple[Predictor, Any]:
    """(the Predictor here, what Dask workers get: the Predictor itself, or (checkpoint,
    storage options, device) that each worker loads once)."""
    if isinstance(checkpoint, Predictor):
        if task is not None and task != checkpoint.task:
            raise PredictError(
                f"the predictor is for {checkpoint.task!r}, --task {task} was asked for"
            )
        return checkpoint, checkpoint
    return load_predictor(str(checkpoint), storage_options, task, device), (
        str(checkpoint),
        storage_options,
        device,
    )


def _plan(
    template: BlockJob,
    dates: Sequence[tuple[str, int]],
    blocks: Sequence[tuple[int, int, int, int]],
    sha256: str,
    slice_ids: Mapping[str, str],
) -> tuple[list[BlockJob], dict[str, dict[str, Any]]]:
    """(the jobs to run, marker URL → content of the blocks already done by this checkpoint on
    the same slice): every block at every date, ``template`` with its time, block and marker."""
    jobs: list[BlockJob] = []
    done: dict[str, dict[str, Any]] = {}
    for d, t in dates:
        for b in blocks:
            marker = marker_url(template.out, template.layer, t, b)
            m = read_marker(marker, template.storage_options)
            if m is not None and marker_is_current(m, sha256, b, slice_ids[d]):
                done[marker] = m
                continue
            jobs.append(
                dataclasses.replace(template, t=t, block=b, marker=marker, slice_id=slice_ids[d])
            )
    return jobs, done


def default_output(cube: str) -> str:
    """The predictions store of ``cube`` when no ``out`` is given: ``x/cube.zarr`` ->
    ``x/cube.predictions.zarr`` (beside it, never inside a shared cube)."""
    base = str(cube).rstrip("/")
    return (base[: -len(".zarr")] if base.endswith(".zarr") else base) + ".predictions.zarr"


def predict(
    cube: str,
    checkpoint: str | Predictor,
    out: str | None = None,
    *,
    bbox: Sequence[float] | None = None,
    time: str | Sequence[str] | None = None,
    task: str | None = None,
    overlap: int = defaults.PREDICT_OVERLAP,
    batch_size: int = defaults.PREDICT_BATCH,
    device: str = "auto",
    probabilities: bool = False,
    cog: str | None = None,
    workers: int = 0,
    client: Any = None,
    scheduler: str | None = None,
    block: int = defaults.PREDICT_BLOCK,
    storage_options: Mapping[str, Any] | None = None,
    progress: bool = True,
    panel: bool = True,
    wait: float = 0.0,
    break_stale_lock: bool = False,
) -> PredictResult:
    """Map ``bbox`` × ``time`` of the cube with a fine-tuned segmenter (see the module doc).

    Args:
        cube: the cube URL.
        checkpoint: ``best.pt`` / ``checkpoint.pt`` of ``sarcube finetune``, or a ``Predictor``.
        out: where the layer goes: a separate predictions store (default
            :func:`default_output`: ``<cube stem>.predictions.zarr`` beside the cube), or the
            cube itself when ``out`` names it (a shared cube is then written to: say so).
        bbox: W S E N degrees (EPSG:4326); default the whole cube. Snapped out to 256-px chunks.
        time: a date, ``DATE/DATE`` range, or a list of them; default every complete slice.
        task: ``lulc`` / ``water``; checked against the checkpoint.
        overlap: pixels shared by neighbouring 256² windows (0 … 255; default 128 = 50 %).
        batch_size: windows per forward pass.
        device: ``auto`` (``cuda`` when torch sees a GPU, else ``cpu``), ``cpu`` or ``cuda``
            (``cuda``: blocks run in this process on the GPU).
        probabilities: also write uint8 class probabilities.
        cog: also export the map of the first date as a Cloud-Optimized GeoTIFF here.
        workers / client / scheduler: run blocks on a Dask cluster (``workers`` local processes,
            a client, or a scheduler address); default in this process.
        block: block edge in pixels (a multiple of 256; memory scales with its square).
        wait / break_stale_lock: wait this many seconds for another writer's lock on ``out``;
            break a lock whose holder stopped heart-beating (``sarcube.locking``).
    """
    storage_options = RedactedOptions(
        storage_options or {}
    )  # Dask's repr of a failed task shows no secret
    cube = str(cube)
    out = default_output(cube) if out is None else str(out)
    if not 0 <= int(overlap) < WINDOW:
        raise PredictError(f"--overlap must be in [0, {WINDOW - 1}] pixels, got {overlap}")
    stride = WINDOW - int(overlap)
    if block < WINDOW or block % 256:
        raise PredictError(f"block must be a positive multiple of 256 pixels, got {block}")
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    root = _open_source(cube, storage_options)
    grid = cube_grid(root)
    dates = _select_dates(root, time)
    region = _region(grid, bbox)
    pr, spec = _resolve_predictor(checkpoint, storage_options, task, device)
    meta = cube_attrs(root)
    labels = "lulc" in root and bool(meta.get("labels"))
    slice_ids = {d: slice_id(meta["slices"][d]) for d, _ in dates}
    # One writer per output store (the cube itself by default: then ingest and predict exclude
    # each other too); the markers beside it are covered by the same lock.
    with StoreLock(
        out, storage_options, command="sarcube predict", wait=wait, break_stale=break_stale_lock
    ):
        layer, prob_layer, placement = prepare_output(
            cube, out, storage_options, grid, pr, dates, overlap, stride, probabilities, region
        )
        blocks = region_blocks(region, block)
        # every block's job: this with its time index, block, marker and slice filled in
        template = BlockJob(
            cube,
            out,
            storage_options,
            layer,
            prob_layer,
            t=0,
            block=(0, 0, 0, 0),
            stride=stride,
            batch_size=batch_size,
            labels=labels,
            marker="",
            placement=placement,
        )
        jobs, done = _plan(template, dates, blocks, pr.sha256, slice_ids)
        t0 = _time.perf_counter()
        results = _run_jobs(pr, spec, jobs, device, workers, client, scheduler, progress)
        seconds = _time.perf_counter() - t0
        # every block written: plain readers (consolidated metadata) see the new layers now
        publish_view(open_group(out, storage_options, mode="r+", formats=OUTPUT_FORMATS))
        if not same_store(cube, out):  # a predictions store: its STAC Item (the cube: its own)
            write_stac_record(
                lambda: write_predictions_item(
                    out, layer, storage_options, str(cog) if cog else None
                )
            )
    results.update(done)
    mpx = sum((j.block[1] - j.block[0]) * (j.block[3] - j.block[2]) for j in jobs) / 1e6
    res = PredictResult(
        out,
        layer,
        pr.task,
        [d for d, _ in dates],
        region,
        grid.window_bounds(*region),
        len(blocks) * len(dates),
        len(done),
        seconds,
        mpx,
    )
    if labels:
        res.scores = region_scores(pr.task, dates, results)
    if panel:
        res.panels = [
            str(p)
            for p in write_panels(
                cube, out, storage_options, layer, dates, region, pr.task, labels, placement
            )
        ]
    if cog:
        export_cog(
            out,
            cog,
            layer=layer,
            time_index=placement.t(dates[0][1]),
            region=placement.region(region),
            storage_options=storage_options,
        )
        res.cog = str(cog)
    return res


def _run_jobs(
    pr: Predictor,
    spec,
    jobs: list[BlockJob],
    device: str,
    workers: int,
    client,
    scheduler,
    progress: bool,
) -> dict[str, dict[str, Any]]:
    """In this process with the loaded ``pr``; on Dask with ``spec`` (a checkpoint path each
    worker loads once, or the Predictor itself, pickled)."""
    if not jobs:
        return {}
    if client is None and scheduler is None and (workers <= 0 or device != "cpu"):
        from tqdm import tqdm

        out = {}
        for job in tqdm(jobs, desc="predict", unit="block", disable=not progress):
            out[job.marker] = run_block(pr, job)
        return out
    from sarcube.cluster import dask_client, run_tasks, task_key

    with dask_client(client, scheduler, workers or None) as c:
        futs = {
            j.marker: c.submit(run_block, spec, j, key=task_key(f"predict-{i}"), pure=False)
            for i, j in enumerate(jobs)
        }
        res = run_tasks(c, futs, "predict", progress)
    failed = {k: v for k, v in res.items() if isinstance(v, BaseException)}
    if failed:
        k, e = next(iter(failed.items()))
        raise RuntimeError(
            f"{len(failed)} of {len(jobs)} blocks failed (re-run to resume); "
            f"first: {k}: {type(e).__name__}: {e}"
        )
    return res


# ---------------------------------------------------------------------------------------------
# Command line


def check_args(args: argparse.Namespace) -> None:
    """``predict``'s arguments before any work
    (:func:`training.arguments.check_predict_args`)."""
    from training.arguments import check_predict_args

    check_predict_args(args)


def _print_result(res: PredictResult) -> None:
    print(
        f"predict: {res.task} → {res.out} [{res.layer}], dates {', '.join(res.dates)}; "
        f"{res.blocks} blocks ({res.skipped} done earlier), {res.megapixels:.1f} Mpx in "
        f"{res.seconds:.1f} s"
    )
    for d, s in res.scores.items():
        if res.task == "lulc":
            print(
                f"  {d}: mIoU {s['miou']:.3f}, mAcc {s['macc']:.3f}, "
                f"pixel accuracy {s['pixel_acc']:.3f} "
                "(vs the cube's HR-LULC labels)"
            )
        else:
            print(
                f"  {d}: water IoU {s['iou']:.3f}, precision {s['precision']:.3f}, "
                f"recall {s['recall']:.3f}"
            )
    for p in res.panels:
        print(f"  panel: {p}")
    if res.cog:
        print(f"  COG: {res.cog}")


def run_args(args: argparse.Namespace) -> int:
    """``sarcube predict``: :func:`predict` with the parsed arguments, then a summary."""
    from sarcube.storage import parse_storage_options

    check_args(args)
    res = predict(
        args.cube,
        args.checkpoint,
        args.out,
        bbox=args.bbox,
        time=args.time,
        task=args.task,
        overlap=args.overlap,
        batch_size=args.batch_size,
        device=args.device,
        probabilities=args.probabilities,
        cog=args.cog,
        workers=args.workers,
        scheduler=args.scheduler,
        block=args.block,
        storage_options=parse_storage_options(args.storage_option),
        wait=args.wait,
        break_stale_lock=args.break_stale_lock,
    )
    _print_result(res)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m training.predict``: the arguments of ``sarcube predict``; 2 on an error."""
    from training.arguments import add_predict_arguments

    package_doc = sys.modules[__package__].__doc__ or ""  # its first line says what predict is
    p = argparse.ArgumentParser(
        prog="python -m training.predict", description=package_doc.splitlines()[0]
    )
    add_predict_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from sarcube.errors import run_command
    from sarcube.storage import storage_error_message

    return run_command(lambda: run_args(args), "predict", describe=[storage_error_message])
