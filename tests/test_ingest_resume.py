"""Resumable, idempotent, incremental ingest.

- A ``sarcube ingest`` process killed (SIGKILL, whole process group: driver, scheduler, workers)
  while it writes time slices leaves no half-written slice visible; a re-run finishes the job, and
  the cube then equals one made by a clean, uninterrupted run: values, labels, registry and the set
  of stored shard objects.
- A new date appends a slice without touching the stored shards of the others; a second frame of
  a date already in the cube gives the same slice as ingesting both frames at once, and that slice
  is the mean of the two frames' linear power where they overlap (checked against the frames
  ingested one by one, in numpy).
- A re-run with unchanged inputs skips every scene and rewrites nothing.
- Two ingests at once on one Dask cluster (operators sharing a scheduler) each get a full cube.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sarcube.cube import open_cube
from sarcube.ingestion import ingest

# North shore of Lake Kasumigaura, 0.17° a side: one 1024² shard per slice at 1/6000°; each date's
# two frames take about a second to resample, so a killer polling the store finds a slice half-way.
BBOX = (140.30, 36.00, 140.30 + 2048 / 12000, 36.00 + 2048 / 12000)
DATES = ("2022-09-12", "2022-09-26", "2022-10-10", "2022-10-24")
SHARD_DIR = ("hh_db", "c")


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    """4 dates × 2 overlapping frames (consecutive along the pass) over BBOX."""
    from sarcube.synth import synthesize

    out = tmp_path_factory.mktemp("resume_synth")
    res = synthesize(str(out), bbox=BBOX, dates=DATES, scenes_per_date=2, seed=11, progress=False)
    by_date: dict[str, list[str]] = {}
    for rec, url in zip(res.record["scenes"], res.scene_urls, strict=True):
        by_date.setdefault(rec["date"], []).append(url)
    assert sorted(by_date) == list(DATES) and all(len(v) == 2 for v in by_date.values())
    return res, by_date


@pytest.fixture(scope="module")
def reference(frames, dask_cluster, tmp_path_factory):
    """A clean, uninterrupted ingest of everything."""
    from distributed import Client

    res, _ = frames
    cube = str(tmp_path_factory.mktemp("reference") / "cube.zarr")
    with Client(dask_cluster) as client:
        report = ingest(res.scene_urls, cube, lulc=res.lulc_urls, client=client, progress=False)
    assert report.ok and len(report.ingested) == 8, report.summary()
    return cube


# ---------------------------------------------------------------------------------------------
# helpers reading the store directly (not through sarcube)


def registry(cube: str) -> dict:
    """The slice registry and label status from the group's zarr.json, without times."""
    attrs = json.loads((Path(cube) / "sarcube" / "zarr.json").read_text())["attributes"]
    keep = ("time_index", "status", "scenes", "inputs", "valid_cells", "sources")
    slices = {d: {k: e.get(k) for k in keep} for d, e in attrs["slices"].items()}
    labels = {k: attrs["labels"].get(k) for k in ("status", "tiles", "coverage", "labelled_cells")}
    return {"slices": slices, "labels": labels}


def shard_files(cube: str, *parts: str) -> dict[str, tuple[int, int, bytes]]:
    """{relative path: (inode, mtime_ns, bytes)} of the stored chunk/shard objects."""
    root = Path(cube, *parts)
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.endswith(".partial"):
            st = p.stat()
            out[str(p.relative_to(cube))] = (st.st_ino, st.st_mtime_ns, p.read_bytes())
    return out


def time_index_of(cube: str, date: str) -> int:
    return json.loads((Path(cube) / "sarcube" / "zarr.json").read_text())["attributes"]["slices"][
        date
    ]["time_index"]


def shards_by_date(cube: str) -> set[str]:
    """Stored hh_db shard objects named by date instead of time slot ({date}/{row}/{col})."""
    attrs = json.loads((Path(cube) / "sarcube" / "zarr.json").read_text())["attributes"]
    date_of = {str(e["time_index"]): d for d, e in attrs["slices"].items()}
    out = set()
    for k in shard_files(cube, "hh_db", "c"):
        _, _, t, *rest = k.split("/")
        assert t in date_of, f"{k}: a stored object outside every committed slice (not reclaimed)"
        out.add("/".join([date_of[t], *rest]))
    return out


def assert_same_cube(got: str, want: str, same_slots: bool = True) -> None:
    """Equal through open_cube, equal registries and the same stored objects. A date rebuilt
    copy-on-write lives in another time slot: ``same_slots=False`` compares by date."""
    a, b = open_cube(got), open_cube(want)
    np.testing.assert_array_equal(a.time.values, b.time.values)
    assert a.sizes["time"] == len(DATES)
    np.testing.assert_array_equal(a.hh_db.values, b.hh_db.values)  # NaNs in the same places
    np.testing.assert_array_equal(a.lulc.values, b.lulc.values)
    if same_slots:
        assert registry(got) == registry(want)
        assert set(shard_files(got, "hh_db", "c")) == set(shard_files(want, "hh_db", "c"))
    else:

        def strip(r):
            return {
                d: {k: v for k, v in e.items() if k != "time_index"} for d, e in r["slices"].items()
            }

        assert strip(registry(got)) == strip(registry(want))
        assert registry(got)["labels"] == registry(want)["labels"]
    assert shards_by_date(got) == shards_by_date(want)


# ---------------------------------------------------------------------------------------------
# (a) killed part-way, then re-run


def _read_registry(cube: Path) -> dict | None:
    """Committed slices and in-progress attempts ('writing') by date, read from zarr.json."""
    try:
        attrs = json.loads((cube / "sarcube" / "zarr.json").read_text())["attributes"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None
    if "slices" not in attrs:
        return None
    return {**attrs.get("slices", {}), **attrs.get("attempts", {})}


def _shards(cube: Path) -> list[Path]:
    d = cube.joinpath(*SHARD_DIR)
    if not d.is_dir():
        return []
    return [p for p in d.rglob("*") if p.is_file() and not p.name.endswith(".partial")]


def _group_alive(pgid: int) -> bool:
    """Is any process of this process group still running (zombies waiting to be reaped by
    whatever adopted them do not count)?"""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state not in ("Z", "X"):
            return True
    return False


def test_killed_ingest_resumes_to_the_same_cube(frames, reference, tmp_path, dask_client):
    res, _ = frames
    cube = tmp_path / "cube.zarr"
    cmd = [
        sys.executable,
        "-m",
        "sarcube.cli",
        "ingest",
        "--scenes",
        *res.scene_urls,
        "--lulc",
        *res.lulc_urls,
        "--cube",
        str(cube),
        "--workers",
        "1",
    ]
    log = (tmp_path / "ingest.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    seen = None
    t0 = time.monotonic()
    deadline = t0 + 240  # only reached if the machine is badly overloaded
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            shards = _shards(cube)
            slices = _read_registry(cube) if shards else None
            if shards and slices and any(e.get("status") == "writing" for e in slices.values()):
                seen = (len(shards), slices)
                break
            if shards and slices and all(e.get("status") == "complete" for e in slices.values()):
                break  # too late: every slice is committed
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver, the scheduler and the worker
        proc.wait(timeout=30)
        log.close()
    assert seen is not None, (
        f"not killed part-way (exit status {proc.returncode}, {time.monotonic() - t0:.0f} s):\n"
        + (tmp_path / "ingest.log").read_text()[-3000:]
    )
    assert proc.returncode == -signal.SIGKILL
    for _ in range(100):  # the worker process (same process group) is gone too
        if not _group_alive(proc.pid):
            break
        time.sleep(0.05)
    assert not _group_alive(proc.pid), "processes of the killed ingest are still running"

    # The state it left: attempts marked 'writing', at least one with a shard already stored.
    slices = _read_registry(cube)
    assert slices and sorted(slices) == list(DATES)
    half = [
        d
        for d, e in slices.items()
        if e["status"] == "writing"
        and any(p.parts[-3] == str(e["time_index"]) for p in _shards(cube))
    ]
    assert half, (slices, _shards(cube))
    shown = {str(t)[:10] for t in open_cube(str(cube)).time.values}
    assert not shown & set(half), f"half-written slices {half} are visible: {shown}"
    assert shown <= {d for d, e in slices.items() if e["status"] == "complete"}

    # Re-run to completion (on the test cluster), then compare with the clean run.
    report = ingest(
        res.scene_urls, str(cube), lulc=res.lulc_urls, client=dask_client, progress=False
    )
    assert report.ok, report.summary()
    ids = sorted(Path(u).name[7:-4] for u in res.scene_urls)  # IMG-HH-{product id}.tif
    assert sorted(report.ingested + report.skipped) == ids
    assert set(report.slices.values()) == {"complete"}
    assert_same_cube(str(cube), reference)


# ---------------------------------------------------------------------------------------------
# (b) incremental: a new date, a new frame of a known date


def test_new_date_appends_without_rewriting_existing_shards(
    frames, reference, tmp_path, dask_client
):
    res, by_date = frames
    cube = str(tmp_path / "cube.zarr")
    first = [u for d in DATES[:3] for u in by_date[d]]
    r1 = ingest(first, cube, lulc=res.lulc_urls, client=dask_client, progress=False)
    assert r1.ok and len(r1.ingested) == 6
    before = shard_files(cube, "hh_db", "c")
    labels_before = shard_files(cube, "lulc", "c")
    assert {k.split("/")[2] for k in before} == {"0", "1", "2"}  # one time index per date

    # later the same inputs hold a new date: the operator re-runs over all of them
    r2 = ingest(res.scene_urls, cube, lulc=res.lulc_urls, client=dask_client, progress=False)
    assert r2.ok, r2.summary()
    assert sorted(r2.ingested) == sorted(Path(u).name[7:-4] for u in by_date[DATES[3]])
    assert sorted(r2.skipped) == sorted(Path(u).name[7:-4] for u in first)
    assert r2.labels == "unchanged"
    after = shard_files(cube, "hh_db", "c")
    # every stored object of the old slices is the same file, same bytes, never rewritten
    assert {k: after[k] for k in before} == before
    assert {k.split("/")[2] for k in set(after) - set(before)} == {"3"}
    assert shard_files(cube, "lulc", "c") == labels_before
    assert time_index_of(cube, DATES[3]) == 3
    assert_same_cube(cube, reference)


def test_second_frame_of_a_date_mosaics_like_both_at_once(frames, reference, tmp_path, dask_client):
    res, by_date = frames
    date = DATES[1]
    a_url, b_url = sorted(by_date[date], reverse=True)  # the later frame first
    kw = dict(lulc=res.lulc_urls, client=dask_client, progress=False)

    cube = str(tmp_path / "cube.zarr")
    others = [u for d in DATES if d != date for u in by_date[d]]
    assert ingest([*others, a_url], cube, **kw).ok
    t = np.datetime64(date, "ns")
    a_only = open_cube(cube).hh_db.sel(time=t).values
    other_shards = {
        k: v
        for k, v in shard_files(cube, "hh_db", "c").items()
        if k.split("/")[2] != str(time_index_of(cube, date))
    }

    r = ingest(res.scene_urls, cube, **kw)  # now with the other frame too
    assert r.ok, r.summary()
    # the slice is rebuilt from both frames; the other dates' shards are untouched
    assert sorted(r.ingested) == sorted(Path(u).name[7:-4] for u in (a_url, b_url))
    assert sorted(r.skipped) == sorted(Path(u).name[7:-4] for u in others)
    assert {k: v for k, v in shard_files(cube, "hh_db", "c").items() if k in other_shards} == (
        other_shards
    )
    assert_same_cube(cube, reference, same_slots=False)  # rebuilt copy-on-write in a new slot

    # independent expectation: mean of the two frames' linear power (each frame ingested alone)
    b_cube = str(tmp_path / "b_only.zarr")
    assert ingest([b_url], b_cube, **kw).ok
    b_only = open_cube(b_cube).hh_db.sel(time=t).values
    mosaic = open_cube(cube).hh_db.sel(time=t).values
    both = np.isfinite(a_only) & np.isfinite(b_only)
    assert both.sum() > 10_000, "the two frames should overlap along track"
    assert (np.isfinite(a_only) & ~np.isfinite(b_only)).sum() > 10_000
    assert (~np.isfinite(a_only) & np.isfinite(b_only)).sum() > 10_000
    with np.errstate(invalid="ignore"):
        power = np.nanmean(np.stack([10 ** (a_only / 10.0), 10 ** (b_only / 10.0)]), axis=0)
    expected = 10 * np.log10(power)
    np.testing.assert_array_equal(np.isnan(mosaic), np.isnan(expected))
    np.testing.assert_allclose(mosaic, expected, rtol=0, atol=1e-4)
    assert np.abs(mosaic[both] - a_only[both]).mean() > 0.3  # really a mix, not one frame


# ---------------------------------------------------------------------------------------------
# (c) idempotent


def test_rerun_with_unchanged_inputs_skips_everything(frames, reference, dask_client):
    res, _ = frames
    before = shard_files(reference, "hh_db", "c")
    labels_before = shard_files(reference, "lulc", "c")
    reg = registry(reference)
    report = ingest(
        res.scene_urls, reference, lulc=res.lulc_urls, client=dask_client, progress=False
    )
    assert report.ok and report.ingested == []
    expected_ids = sorted(Path(u).name[7:-4] for u in res.scene_urls)  # IMG-HH-{product id}.tif
    assert sorted(report.skipped) == expected_ids
    assert report.labels == "unchanged"
    assert set(report.slices.values()) == {"complete"} and sorted(report.slices) == list(DATES)
    assert "skipped (already in the cube): 8" in report.summary()
    assert shard_files(reference, "hh_db", "c") == before
    assert shard_files(reference, "lulc", "c") == labels_before
    assert registry(reference) == reg


# ---------------------------------------------------------------------------------------------
# (d) two ingests at once on one Dask cluster (operators sharing a --scheduler)


def test_two_ingests_at_once_on_one_cluster(frames, reference, dask_cluster, tmp_path):
    """Each job writes its own cube in full: no task of one job stands in for the other's."""
    import threading

    from distributed import Client

    res, by_date = frames
    date = DATES[0]
    reports, errors = {}, []

    def job(name: str) -> None:
        try:
            with Client(dask_cluster, set_as_default=False) as client:
                reports[name] = ingest(
                    by_date[date],
                    str(tmp_path / name),
                    lulc=res.lulc_urls,
                    client=client,
                    progress=False,
                )
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=job, args=(n,)) for n in ("a.zarr", "b.zarr")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors
    t = np.datetime64(date, "ns")
    want = open_cube(reference).sel(time=[t])
    for name in ("a.zarr", "b.zarr"):
        assert reports[name].ok, reports[name].summary()
        got = open_cube(str(tmp_path / name))
        np.testing.assert_array_equal(got.time.values, [t])
        np.testing.assert_array_equal(got.hh_db.values, want.hh_db.values)
        np.testing.assert_array_equal(got.lulc.values, want.lulc.values)
