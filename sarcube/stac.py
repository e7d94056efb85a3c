"""STAC records of sarcube's artefacts, written with pystac next to each artefact, so that a
catalogue (stac-fastapi, pgSTAC, a static browser) indexes them without sarcube.

- a cube: ``<cube>/collection.json``, a Collection with the datacube extension (dimensions
  ``x``/``y``/``time`` with extents, step and CRS; variables with units; the dates of the complete
  slices), written at the end of every ingest;
- a predictions store: ``<store>/item.json``, an Item with the projection, raster and
  classification extensions (the classes and their colours; nodata 255), and the COG as an asset
  when one was exported; written at the end of every predict;
- a shard set: ``<shards>/item.json``, an Item whose properties are what the manifest says (splits,
  shard and sample counts, dB statistics, the cube fingerprint), written after the manifest.

Each record is rebuilt from the artefact's own metadata (never edited in place), so a re-run
gives the same record and a failed run leaves the previous one. Written inside the artefact's
folder: it travels with it on a copy (relative asset links: ``./``, ``manifest.json``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .storage import join_url, write_bytes

__all__ = [
    "COLLECTION_FILE",
    "ITEM_FILE",
    "write_cube_collection",
    "write_predictions_item",
    "write_shards_item",
    "write_stac_record",
]

log = logging.getLogger("sarcube.stac")

COLLECTION_FILE = "collection.json"
ITEM_FILE = "item.json"
ZARR_MEDIA_TYPE = "application/vnd+zarr"


def _when(date: str) -> dt.datetime:
    return dt.datetime.fromisoformat(date).replace(tzinfo=dt.timezone.utc)


def _grid_id(grid: Mapping[str, Any]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(dict(grid), sort_keys=True).encode()).hexdigest()[:16]


def _complete_dates(meta: Mapping[str, Any]) -> list[str]:
    return sorted(d for d, e in (meta.get("slices") or {}).items() if e.get("status") == "complete")


def _footprint(bounds: Sequence[float]) -> dict[str, Any]:
    w, s, e, n = bounds
    return {"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]}


def _dump(obj: Any) -> bytes:
    return (
        json.dumps(obj.to_dict(include_self_link=False), indent=1, sort_keys=True) + "\n"
    ).encode()


def cube_collection(url: str, storage_options: Mapping[str, Any] | None = None):
    """The STAC Collection (pystac) of the cube at ``url``."""
    import pystac
    from pystac.extensions.datacube import DatacubeExtension, Dimension, Variable

    from .cube import cube_attrs, cube_grid, open_group
    from .index import cube_fingerprint

    root = open_group(url, storage_options)
    meta, grid = cube_attrs(root), cube_grid(root)
    dates = _complete_dates(meta)
    w, s, e, n = grid.bounds
    temporal: list[list[dt.datetime | None]] = (
        [[_when(dates[0]), _when(dates[-1])]] if dates else [[None, None]]
    )
    collection = pystac.Collection(
        # a stable id (the grid, which a cube never changes), so that a catalogue updates one
        # Collection per cube; the content's fingerprint changes with every ingest
        id=f"sarcube-cube-{_grid_id(meta['grid'])}",
        title=str(root.attrs.get("title", "sarcube datacube")),
        description="ALOS-2 PALSAR-2 HH backscatter (dB) and JAXA HR-LULC labels on one "
        f"EPSG:4326 grid of 1/{grid.cells_per_degree} degree; complete slices only.",
        extent=pystac.Extent(pystac.SpatialExtent([[w, s, e, n]]), pystac.TemporalExtent(temporal)),
        license="other",
        extra_fields={
            "sarcube:format": root.attrs.get("format"),
            "sarcube:fingerprint": cube_fingerprint(meta),
        },
    )
    step = 1.0 / grid.cells_per_degree
    dims: dict[str, dict[str, Any]] = {
        "x": {
            "type": "spatial",
            "axis": "x",
            "extent": [w, e],
            "step": step,
            "reference_system": 4326,
        },
        "y": {
            "type": "spatial",
            "axis": "y",
            "extent": [s, n],
            "step": -step,
            "reference_system": 4326,
        },
        "time": {"type": "temporal", "values": [f"{d}T00:00:00Z" for d in dates]},
    }
    variables: dict[str, dict[str, Any]] = {
        "hh_db": {
            "dimensions": ["time", "y", "x"],
            "type": "data",
            "unit": "dB",
            "description": "HH backscatter (sigma0 for scenes, gamma0 for mosaics)",
        },
        "lulc": {
            "dimensions": ["y", "x"],
            "type": "data",
            "description": "JAXA HR-LULC class code, 0 = no data",
        },
    }
    DatacubeExtension.ext(collection, add_if_missing=True).apply(
        {k: Dimension.from_dict(v) for k, v in dims.items()},
        {k: Variable.from_dict(v) for k, v in variables.items()},
    )
    collection.add_asset(
        "zarr",
        pystac.Asset("./", title="the cube (Zarr v3)", media_type=ZARR_MEDIA_TYPE, roles=["data"]),
    )
    return collection


def write_cube_collection(url: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """Write ``<cube>/collection.json``; returns its URL."""
    target = join_url(url, COLLECTION_FILE)
    write_bytes(target, _dump(cube_collection(url, storage_options)), storage_options)
    return target


def predictions_item(url: str, layer: str, storage_options=None, cog: str | None = None):
    """The STAC Item (pystac) of the prediction layer ``layer`` in the store at ``url``."""
    import pystac
    from pystac.extensions.classification import Classification, ClassificationExtension
    from pystac.extensions.projection import ProjectionExtension
    from pystac.extensions.raster import DataType, RasterBand, RasterExtension

    from .classes import segmentation_task
    from .cube import FORMAT, PREDICTIONS_FORMAT, cube_attrs, cube_grid, open_group

    root = open_group(url, storage_options, formats=(PREDICTIONS_FORMAT, FORMAT))
    meta, grid = cube_attrs(root), cube_grid(root)
    attrs = root[layer].attrs.asdict()
    task = segmentation_task(str(attrs.get("task", "lulc")))
    dates = _complete_dates(meta)
    item = pystac.Item(
        id=f"sarcube-{layer}-{str(attrs.get('checkpoint_sha256', 'model'))[:16]}",
        geometry=_footprint(grid.bounds),
        bbox=list(grid.bounds),
        datetime=None if len(dates) != 1 else _when(dates[0]),
        start_datetime=_when(dates[0]) if len(dates) > 1 else None,
        end_datetime=_when(dates[-1]) if len(dates) > 1 else None,
        properties={
            "title": str(attrs.get("long_name", layer)),
            "sarcube:task": task.name,
            "sarcube:checkpoint_sha256": attrs.get("checkpoint_sha256"),
            "sarcube:dates": dates,
        },
    )
    item.add_asset(
        "zarr",
        pystac.Asset("./", title=f"{layer} (Zarr v3)", media_type=ZARR_MEDIA_TYPE, roles=["data"]),
    )
    if cog:
        item.add_asset(
            "cog",
            pystac.Asset(
                cog,
                title=f"{layer}, {dates[0] if dates else ''} (COG)",
                media_type=pystac.MediaType.COG,
                roles=["data", "visual"],
            ),
        )
    t = grid.window_transform(0, 0)
    proj = ProjectionExtension.ext(item, add_if_missing=True)
    proj.apply(
        code="EPSG:4326", shape=[grid.height, grid.width], transform=[t.a, t.b, t.c, t.d, t.e, t.f]
    )
    classes = [
        Classification.create(
            value=i,
            name=name.replace(" ", "_"),
            description=name,
            color_hint="".join(f"{int(c):02X}" for c in rgb[:3]),
        )
        for i, (name, rgb) in enumerate(zip(task.class_names, task.rgb, strict=True))
    ] + [Classification.create(value=255, name="no_data", nodata=True)]
    for key in item.assets:
        asset = item.assets[key]
        RasterExtension.ext(asset, add_if_missing=True).bands = [
            RasterBand.create(
                nodata=255, data_type=DataType.UINT8, spatial_resolution=1.0 / grid.cells_per_degree
            )
        ]
        ClassificationExtension.ext(asset, add_if_missing=True).classes = classes
    return item


def write_predictions_item(
    url: str, layer: str, storage_options: Mapping[str, Any] | None = None, cog: str | None = None
) -> str:
    """Write ``<store>/item.json`` for ``layer``; returns its URL."""
    target = join_url(url, ITEM_FILE)
    item = predictions_item(url, layer, storage_options, cog)
    write_bytes(target, _dump(item), storage_options)
    return target


def write_stac_record(write: Callable[[], str]) -> None:
    """Run ``write`` (one of the ``write_*`` above) after an artefact's commit. A failure is a
    warning, not the run's failure: the data is committed, and the next run rewrites the record."""
    try:
        log.debug("STAC record: %s", write())
    except Exception as e:
        log.warning(
            "the STAC record was not written (%s: %s); the next run rewrites it",
            type(e).__name__,
            e,
        )


def shards_item(url: str, storage_options: Mapping[str, Any] | None = None):
    """The STAC Item (pystac) of the shard set at ``url``: what its manifest says."""
    import pystac

    from .cube import cube_attrs, cube_grid, open_group
    from .shards import read_manifest

    man = read_manifest(url, storage_options)
    cube = man["cube"]
    # footprint and dates from the cube the shards were cut from (the manifest has neither)
    root = open_group(cube["url"], storage_options)
    bounds = list(cube_grid(root).bounds)
    dates = _complete_dates(cube_attrs(root))
    splits = {
        name: {
            "shards": len(s["shards"]),
            "samples": int(s["samples"]),
            "bytes": int(s["bytes"]),
            "db_stats": s.get("db_stats"),
        }
        for name, s in man["splits"].items()
    }
    item = pystac.Item(
        id=f"sarcube-shards-{cube['fingerprint']}-{man['seed']}",
        geometry=_footprint(bounds),
        bbox=bounds,
        datetime=None,
        start_datetime=_when(dates[0]),
        end_datetime=_when(dates[-1]),
        properties={
            "title": "sarcube WebDataset shards",
            "sarcube:cube": cube,
            "sarcube:splits": splits,
            "sarcube:patch_size": man.get("patch_size"),
            "sarcube:sample_schema": man.get("sample_schema"),
        },
    )
    item.add_asset(
        "manifest",
        pystac.Asset(
            "manifest.json",
            title="shard manifest (names, sha256, counts)",
            media_type=pystac.MediaType.JSON,
            roles=["metadata"],
        ),
    )
    for s in man["splits"].values():
        for sh in s["shards"]:
            item.add_asset(
                sh["name"].removesuffix(".tar"),
                pystac.Asset(
                    sh["name"],
                    media_type="application/x-tar",
                    roles=["data"],
                    extra_fields={"file:size": sh["bytes"], "file:checksum": "1220" + sh["sha256"]},
                ),
            )
    return item


def write_shards_item(url: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """Write ``<shards>/item.json``; returns its URL."""
    target = join_url(url, ITEM_FILE)
    write_bytes(target, _dump(shards_item(url, storage_options)), storage_options)
    return target
