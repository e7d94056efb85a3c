"""``sarcube info URL``: what a cube, a predictions store or a shard set holds, without Python.

For a cube or predictions store: its grid (bbox, resolution, size, chunking), every variable
(dtype, dimensions, shape, chunks, shards), every date with its slice status (complete, empty,
or a writer's attempt in progress), the labels and the size on disk. For a shard set: the cube it
was cut from, and per split the shards, samples and bytes. Read-only: nothing is locked or
written.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import InputError
from .storage import join_url, url_to_fs

__all__ = ["describe", "format_description"]


def describe(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A JSON-able description of the store at ``url``.

    Args:
        url: a cube or predictions store (``…zarr``), a shard directory or its ``manifest.json``;
            local or ``s3://``.
        storage_options: fsspec options for remote URLs.

    Returns:
        ``{"kind": "cube" | "predictions" | "shards", ...}`` (see :func:`format_description`).

    Raises:
        InputError: nothing sarcube knows at ``url``.
    """
    storage_options = dict(storage_options or {})
    fs, path = url_to_fs(url, storage_options)
    if fs.exists(join_url(path, "zarr.json")):
        return _describe_store(url, storage_options)
    if fs.exists(join_url(path, "manifest.json")) or path.endswith("manifest.json"):
        return _describe_shards(url, storage_options)
    raise InputError(
        f"{url}: neither a sarcube cube / predictions store (no zarr.json) nor a shard set "
        "(no manifest.json)"
    )


def _describe_store(url: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    from .cube import FORMAT, PREDICTIONS_FORMAT, cube_attrs, cube_grid, open_group

    root = open_group(url, storage_options, formats=(FORMAT, PREDICTIONS_FORMAT))
    meta, grid = cube_attrs(root), cube_grid(root)
    variables = {
        name: {
            "dtype": str(arr.dtype),
            "dims": list(arr.metadata.dimension_names or ()),
            "shape": list(arr.shape),
            "chunks": list(arr.chunks),
            "shards": list(arr.shards) if arr.shards else None,
        }
        for name, arr in sorted(root.arrays())
        if arr.ndim >= 2
    }
    dates = {
        d: {"status": e.get("status"), "time_index": int(e["time_index"])}
        for d, e in sorted((meta.get("slices") or {}).items())
    }
    for d, e in sorted((meta.get("attempts") or {}).items()):
        dates.setdefault(d, {"time_index": int(e["time_index"])})
        dates[d]["attempt"] = {"status": e.get("status"), "time_index": int(e["time_index"])}
    fs, path = url_to_fs(url, storage_options)
    labels = meta.get("labels") or {}
    return {
        "kind": "cube" if root.attrs.get("format") == FORMAT else "predictions",
        "url": url,
        "format": root.attrs.get("format"),
        "bbox": list(grid.bounds),
        "resolution": f"1/{grid.cells_per_degree} degree",
        "size_px": [grid.height, grid.width],
        "crs": root.attrs.get("crs"),
        "variables": variables,
        "dates": dates,
        "free_slots": list(meta.get("free_slots") or []),
        "labels": {
            k: labels.get(k) for k in ("status", "coverage", "labelled_cells") if k in labels
        }
        | ({"tiles": sorted(labels["tiles"])} if labels.get("tiles") else {}),
        "bytes_on_disk": int(fs.du(path, total=True)),
    }


def _describe_shards(url: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    from .shards import read_manifest

    man = read_manifest(url, storage_options)
    return {
        "kind": "shards",
        "url": url,
        "format": man.get("format"),
        "cube": man.get("cube"),
        "patch_size": man.get("patch_size"),
        "splits": {
            name: {
                "shards": len(s["shards"]),
                "samples": int(sum(x["samples"] for x in s["shards"])),
                "bytes": int(sum(x["bytes"] for x in s["shards"])),
            }
            for name, s in man["splits"].items()
        },
    }


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_description(d: Mapping[str, Any]) -> str:
    """The description as the lines ``sarcube info`` prints."""
    lines = [f"{d['url']}: {d['kind']} ({d['format']})"]
    if d["kind"] == "shards":
        cube = d.get("cube") or {}
        lines.append(f"  cut from {cube.get('url')} (fingerprint {cube.get('fingerprint')})")
        for name, s in d["splits"].items():
            lines.append(
                f"  {name:9s} {s['shards']:4d} shards {s['samples']:7d} samples "
                f"{_size(s['bytes']):>10s}"
            )
        return "\n".join(lines)
    w, s, e, n = d["bbox"]
    h, wd = d["size_px"]
    lines += [
        f"  bbox W {w:.6f} S {s:.6f} E {e:.6f} N {n:.6f} ({d['crs']}), cell {d['resolution']}, "
        f"{h} × {wd} px",
        f"  on disk: {_size(d['bytes_on_disk'])}",
        "  variables:",
    ]
    for name, v in d["variables"].items():
        shards = f", shards {tuple(v['shards'])}" if v["shards"] else ""
        lines.append(
            f"    {name:10s} {v['dtype']:8s} {tuple(v['dims'])} {tuple(v['shape'])}, "
            f"chunks {tuple(v['chunks'])}{shards}"
        )
    lines.append(f"  dates ({len(d['dates'])}):")
    for date, e in d["dates"].items():
        status = e.get("status") or "not committed"
        attempt = e.get("attempt")
        extra = f"; a writer's attempt in slot {attempt['time_index']}" if attempt else ""
        lines.append(f"    {date}  {status} (time slot {e['time_index']}){extra}")
    if d.get("labels"):
        lab = d["labels"]
        lines.append(
            f"  labels: {lab.get('status')}, {lab.get('labelled_cells', 0)} labelled cells, "
            f"{len(lab.get('tiles', []))} tiles"
        )
    return "\n".join(lines)
