"""The ingest's writes to the cube as one transaction: the label layer, and every new or changed
date built in a fresh time slot and committed in one registry write (driver side).

Transactional, resumable and idempotent (``sarcube.registry``): under the cube's lock
(``sarcube.locking``), every new or changed date is built in a fresh time slot registered as an
attempt, and one registry write commits all of the run's dates at once; a failure leaves the
previous complete slices exactly as they were. A re-run skips dates whose scenes (product ids and
sha256) are unchanged, so a killed run re-runs to the same cube. ``strict`` is all-or-nothing:
nothing is committed on any problem.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from ..cluster import run_tasks, task_key
from ..cube import date_to_days, metadata, publish_view
from ..registry import SliceRegistry, clear_slots, time_layers
from ..sources import SceneSource, SourceError
from .report import IngestError, IngestReport
from .tasks import bad_input_as_value, ingest_label_block, ingest_sar_block, intersects

log = logging.getLogger("sarcube.ingestion")

# A pending attempt: date -> (time slot, the date's scenes, its previous registry entry or None)
Pending = dict[str, tuple[int, list[SceneSource], Mapping[str, Any] | None]]


def slice_signature(scenes: Sequence[SceneSource]) -> dict[str, str]:
    """Product id -> sha256 of a date's scenes: what a re-run compares to skip the date."""
    return {s.product_id: s.sha256 for s in sorted(scenes, key=lambda s: s.product_id)}


def source_to_json(s: SceneSource) -> dict[str, Any]:
    """A scene as recorded in the slice registry (``source_from_json`` reads it back)."""
    return {
        **s.__dict__,
        "date": s.date.isoformat(),
        "transform": list(s.transform),
        "bounds_4326": list(s.bounds_4326),
    }


def source_from_json(d: Mapping[str, Any]) -> SceneSource:
    return SceneSource(
        **{
            **d,
            "date": dt.date.fromisoformat(d["date"]),
            "transform": tuple(d["transform"]),
            "bounds_4326": tuple(d["bounds_4326"]),
        }
    )


def ingest_labels(client, root, cube, storage_options, grid, tiles, progress) -> str:
    """Write the label layer from ``tiles`` unless the same tiles are in already; returns what
    happened, for the report. Raises IngestError when a block failed."""
    meta = metadata(root)
    if not tiles:
        return "kept" if meta.attrs.get("labels", {}).get("status") == "complete" else "none"
    sig = {t.name: t.sha256 for t in sorted(tiles, key=lambda t: t.name)}
    reg = dict(meta.attrs.get("labels", {}))
    if reg.get("status") == "complete" and reg.get("tiles") == sig:
        return "unchanged"
    b = [t.bounds for t in tiles]
    coverage = [
        min(x[0] for x in b),
        min(x[1] for x in b),
        max(x[2] for x in b),
        max(x[3] for x in b),
    ]
    meta.attrs["labels"] = {"status": "writing", "tiles": sig, "coverage": coverage}
    futs = {
        blk: client.submit(
            ingest_label_block,
            cube,
            storage_options,
            grid,
            blk,
            tiles,
            key=task_key(f"lulc-{blk}"),
            pure=False,
        )
        for blk in grid.shard_blocks()
    }
    results = run_tasks(client, futs, "labels", progress)
    errors = [r for r in results.values() if isinstance(r, Exception)]
    if errors:
        meta.attrs["labels"] = {**meta.attrs["labels"], "status": "failed"}
        raise IngestError(f"writing labels failed: {type(errors[0]).__name__}: {errors[0]}")
    labelled = sum(results.values())
    meta.attrs["labels"] = {
        "status": "complete",
        "tiles": sig,
        "coverage": coverage,
        "labelled_cells": labelled,
    }
    publish_view(root)
    return f"{len(tiles)} tiles, {labelled} labelled cells"


def no_valid_pixel(s: SceneSource) -> str:
    """The problem line of a scene that gave no valid cube cell."""
    return f"{s.url}: no valid pixel inside the cube (all no-data, or only outside the grid)"


def _plan_attempts(
    registry: SliceRegistry, by_date: Mapping[dt.date, Sequence[SceneSource]], report
) -> Pending:
    """Begin an attempt for each new or changed date; an unchanged date goes into the report
    as skipped."""
    pending: Pending = {}
    for date, new in sorted(by_date.items()):
        key = date.isoformat()
        entry = registry.slices.get(key)
        # A date already in the cube keeps its scenes: new ones join them (same id: replaced).
        merged = {d["product_id"]: source_from_json(d) for d in (entry or {}).get("sources", [])}
        merged.update({s.product_id: s for s in new})
        scenes = sorted(merged.values(), key=lambda s: s.product_id)
        sig = slice_signature(scenes)
        if entry and entry.get("inputs") == sig:
            # scenes that gave no valid pixel are reported again, not counted as in the cube
            used = set(entry.get("scenes", []))
            report.skipped += [pid for pid in sig if pid in used]
            report.problems += [no_valid_pixel(s) for s in scenes if s.product_id not in used]
            report.slices[key] = entry["status"]
            continue
        t = registry.begin(key, {"inputs": sig, "sources": [source_to_json(x) for x in scenes]})
        pending[key] = (t, scenes, entry)
    return pending


def _prepare_slots(cube, root, storage_options, registry: SliceRegistry, pending: Pending) -> None:
    """Clear the attempts' slots, publish the attempts, grow the time axis to hold the slots and
    set their dates."""
    # A slot may hold an abandoned attempt's pixels: clear it before writing (missing objects
    # read as NaN, so blocks the new mosaic leaves empty cannot show old data).
    clear_slots(cube, root, {t for t, _, _ in pending.values()}, storage_options)
    # Register the attempts before touching the arrays: a crash at any point leaves them here
    # (never in ``slices``), and the next run frees their slots.
    registry.publish_attempts()
    n_slots = max(t for t, _, _ in pending.values()) + 1
    for name in time_layers(root):  # hh_db and any derived (time, ...) layer (predictions)
        arr = root[name]
        if arr.shape[0] < n_slots:
            arr.resize((n_slots, *arr.shape[1:]))
    if root["time"].shape[0] < n_slots:
        root["time"].resize((n_slots,))
    for key, (t, _, _) in pending.items():
        root["time"][t] = date_to_days(dt.date.fromisoformat(key))


def _write_blocks(
    client, cube, storage_options, grid, pending: Pending, edge_nodata_pct, progress
) -> dict:
    """Run ``ingest_sar_block`` for every (date, shard block); returns (date, block) -> result."""
    futs = {}
    for key, (t, scenes, _) in pending.items():
        for blk in grid.shard_blocks():
            here = [s for s in scenes if intersects(s.bounds_4326, grid.window_bounds(*blk))]
            futs[(key, blk)] = client.submit(
                bad_input_as_value,
                ingest_sar_block,
                cube,
                storage_options,
                grid,
                t,
                blk,
                here,
                edge_nodata_pct,
                key=task_key(f"sar-{key}-{blk}"),
                pure=False,
            )
    return run_tasks(client, futs, "sar", progress)


def _outcomes(
    pending: Pending, results: Mapping, report: IngestReport
) -> dict[str, tuple[list[str], int] | None]:
    """Date -> (scenes that gave valid cells, valid cells), or None for a date whose blocks
    failed; the failures and scenes without a valid pixel go into the report."""
    outcome: dict[str, tuple[list[str], int] | None] = {}
    for key, (_t, scenes, old) in pending.items():
        res = {blk: r for (k, blk), r in results.items() if k == key}
        errors = [r for r in res.values() if isinstance(r, Exception)]
        kept = (
            f"the previous slice ({len(old.get('scenes', []))} scenes) is kept unchanged"
            if old
            else "not written"
        )
        if errors:
            e = errors[0]
            if isinstance(e, SourceError):  # names the file
                report.problems.append(f"{e} (slice {key}: {kept})")
            else:
                report.problems.append(
                    f"date {key}: writing the slice failed "
                    f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); {kept}; re-run to retry"
                )
            outcome[key] = None
            continue
        per_scene: dict[str, int] = defaultdict(int)
        for r in res.values():
            for pid, n in r.items():
                per_scene[pid] += n
        report.problems += [no_valid_pixel(s) for s in scenes if per_scene[s.product_id] == 0]
        used = sorted(pid for pid in per_scene if per_scene[pid] > 0)
        outcome[key] = (used, int(sum(per_scene.values())))
    return outcome


def _settle(
    registry: SliceRegistry,
    outcome: Mapping[str, tuple[list[str], int] | None],
    report: IngestReport,
    strict: bool,
) -> None:
    """Mark each attempt succeeded or abandoned (all abandoned under ``strict`` with a problem);
    nothing is visible until the registry commits."""
    all_or_nothing = strict and (report.problems or None in outcome.values())
    for key, result in outcome.items():
        if result is None or all_or_nothing:
            registry.abandon(key)
            old = registry.slices.get(key)
            report.slices[key] = f"{old['status']} (unchanged)" if old else "not written"
            continue
        used, cells = result
        status = "complete" if used else "empty"
        registry.succeed(key, status=status, scenes=used, valid_cells=cells)
        report.ingested += used
        report.slices[key] = status


def ingest_slices(
    client,
    root,
    cube,
    storage_options,
    grid,
    by_date,
    edge_nodata_pct,
    report,
    progress,
    lock,
    strict,
) -> None:
    """Build each changed or new date in a fresh time slot, then commit all of them at once.

    See ``sarcube.registry``: what ``open_cube`` shows changes only at ``registry.commit()``;
    a date whose attempt failed keeps its previous complete slice, byte for byte.
    """
    registry = SliceRegistry(root)
    garbage = set(registry.free)
    pending = _plan_attempts(registry, by_date, report)
    if not pending:
        meta = metadata(root).attrs
        if meta.get("attempts") or garbage != set(meta.get("free_slots", [])):
            lock.check()
            registry.commit()  # forget a dead run's attempts; their slots are free
        reclaim(cube, root, storage_options, registry, garbage)
        return
    _prepare_slots(cube, root, storage_options, registry, pending)
    results = _write_blocks(client, cube, storage_options, grid, pending, edge_nodata_pct, progress)
    _settle(registry, _outcomes(pending, results, report), report, strict)
    lock.check()  # never commit after losing the lock
    registry.commit()
    reclaim(cube, root, storage_options, registry, garbage | registry.free)
    log.info("slices: %s", {k: v["status"] for k, v in registry.slices.items()})


def reclaim(cube, root, storage_options, registry: SliceRegistry, slots: set[int]) -> None:
    """Free the space of abandoned attempts and replaced slices (best effort: a failure here
    loses nothing, the next run tries again)."""
    slots = set(slots) & registry.free
    if not slots:
        return
    try:
        clear_slots(cube, root, slots, storage_options)
    except Exception as e:
        log.warning(
            "%s: reclaiming free time slots %s failed (%s); the next run retries",
            cube,
            sorted(slots),
            e,
        )
