"""The cube's slice registry and its copy-on-write updates.

The attributes of a cube's metadata group (``sarcube/``, :func:`sarcube.cube.metadata`) name, for
each acquisition date, the *time slot* (index on the ``time`` axis of ``hh_db`` and every other
``(time, y, x)`` layer) that holds its complete mosaic::

    slices:     {"2022-09-12": {"time_index": 0, "status": "complete", "inputs": {...},
                                "sources": [...], "scenes": [...], "valid_cells": N}, ...}
    attempts:   {"2022-09-12": {"time_index": 3, "status": "writing", ...}}   # in progress
    free_slots: [5, 7]                                                          # reusable

A run never writes into a slot that ``slices`` points at. Changing a date (a new scene joins
its mosaic) or adding one builds the mosaic in a *fresh* slot registered under ``attempts``; the
switch is one atomic write of that group's ``zarr.json`` (``commit``) that points ``slices`` at
the new slot and frees the old one; ``slice_status`` and the consolidated metadata (what plain
readers see) follow. A failure (a corrupt scene, a killed run, a lost lock) leaves ``slices`` —
and so what ``open_cube`` shows — exactly as before, byte for byte; the attempt's slot joins
``free_slots``. Free slots are cleared (their stored objects deleted) before reuse and at the end
of each run, so abandoned attempts do not hold space for long.

Only complete (or ``empty``: no valid pixel) entries are ever in ``slices``; the scenes of a
failed attempt are not recorded anywhere, so a re-run without them (or with them fixed) starts
clean.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from typing import Any

import zarr

from .cube import metadata, publish_view
from .storage import join_url, url_to_fs

log = logging.getLogger("sarcube.registry")

COMMITTED = ("complete", "empty")


class SliceRegistry:
    """In-memory view of a cube's registry; ``commit()`` writes it in one metadata update.

    Args:
        root: the cube's Zarr group, opened for writing (under the cube's lock).
    """

    def __init__(self, root: zarr.Group):
        self.root = root
        self.meta = metadata(root)
        attrs = self.meta.attrs.asdict()
        self.slices: dict[str, dict[str, Any]] = {}
        self.free: set[int] = {int(t) for t in attrs.get("free_slots", [])}
        for key, entry in (attrs.get("slices") or {}).items():
            if entry.get("status") in COMMITTED:
                self.slices[key] = dict(entry)
            else:  # 'writing'/'failed' entries of cubes made before copy-on-write
                self.free.add(int(entry["time_index"]))
        # attempts of a run that died: their slots are garbage now
        self.free |= {int(a["time_index"]) for a in (attrs.get("attempts") or {}).values()}
        self.free -= {int(e["time_index"]) for e in self.slices.values()}
        self.attempts: dict[str, dict[str, Any]] = {}

    def _next_slot(self) -> int:
        if self.free:
            t = min(self.free)
            self.free.discard(t)
            return t
        used = [e["time_index"] for e in (*self.slices.values(), *self.attempts.values())]
        return max(
            self.root["hh_db"].shape[0], self.root["time"].shape[0], max(used, default=-1) + 1
        )

    def begin(self, key: str, entry: Mapping[str, Any]) -> int:
        """Register an attempt at date ``key`` in a fresh slot; returns the slot."""
        t = self._next_slot()
        self.attempts[key] = {
            **entry,
            "time_index": t,
            "status": "writing",
            "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        return t

    def publish_attempts(self) -> None:
        """Write the attempts (before any pixel of them is written): a crash finds them here."""
        self.meta.attrs.update(
            {"attempts": self.attempts, "free_slots": sorted(self.free)},
        )

    def succeed(self, key: str, **fields: Any) -> None:
        """The attempt at ``key`` is complete: it replaces the slice at the next ``commit``."""
        entry = {**self.attempts.pop(key), **fields}
        entry.pop("started", None)
        old = self.slices.get(key)
        if old is not None:
            self.free.add(int(old["time_index"]))
        self.slices[key] = entry

    def abandon(self, key: str) -> None:
        """Drop the attempt at ``key``; its slot becomes free, the old slice (if any) stays."""
        self.free.add(int(self.attempts.pop(key)["time_index"]))

    def commit(self) -> None:
        """One metadata write: the new slices become visible, abandoned slots free; then the
        view of plain readers (``slice_status``, consolidated metadata) follows."""
        for key in list(self.attempts):
            self.abandon(key)
        self.meta.attrs.update(
            {"slices": self.slices, "attempts": {}, "free_slots": sorted(self.free)}
        )
        publish_view(self.root)


def time_layers(root: zarr.Group) -> list[str]:
    """Names of the raster arrays whose first dimension is ``time`` (hh_db, predictions …);
    not the 1-D ``time`` and ``slice_status``, whose chunks hold every slot."""
    return [
        name
        for name, arr in root.arrays()
        if arr.ndim >= 3 and (arr.metadata.dimension_names or ())[:1] == ("time",)
    ]


def clear_slots(
    cube_url: str,
    root: zarr.Group,
    slots: set[int] | list[int],
    storage_options: Mapping[str, Any] | None = None,
) -> int:
    """Delete the stored chunks/shards of ``slots`` in every time layer; returns objects removed.

    Chunk keys are ``<array>/c/<t>/<row>/<col>`` (Zarr v3 default encoding), so a slot is one
    prefix per layer. Missing objects read back as the fill value (NaN / 255), never as old data.
    """
    fs, base = url_to_fs(cube_url, storage_options)
    removed = 0
    for name in time_layers(root):
        for t in sorted(set(slots)):
            prefix = join_url(base, name, "c", str(int(t)))
            try:
                files = fs.find(prefix)
            except FileNotFoundError:
                continue
            if files:
                fs.rm(files)
                removed += len(files)
            if fs.isdir(prefix):
                try:
                    fs.rm(prefix, recursive=True)
                except FileNotFoundError:
                    pass
    if removed:
        log.info(
            "%s: reclaimed %d stored objects of free time slots %s",
            cube_url,
            removed,
            sorted(slots),
        )
    return removed
