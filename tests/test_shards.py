"""WebDataset shards from the cube and a patch index: round trip through S3, byte-identical re-runs,
resume after a crash, the manifest's statistics, and the errors for foreign indexes and bad
destinations.

The index is built by hand from the cube (``helpers.shard_index``: every patch with some valid
SAR; Oct/Nov -> pretrain, Sep -> train/val/test by patch position) so that these tests do not
depend on the sampling module.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers.shard_index import build_index

from sarcube.cube import cube_attrs, open_cube, open_group
from sarcube.index import (
    CODES,
    HIST_COLUMNS,
    cube_fingerprint,
    patch_id,
    read_index,
    write_index,
)
from sarcube.ingestion import ingest
from sarcube.shards import (
    MANIFEST,
    ShardError,
    iter_samples,
    plan_shards,
    read_manifest,
    recut_patch,
    shard_count,
    write_shards,
)

KW = {"shard_size_mb": 64, "min_shards_per_split": 3, "progress": False}  # 3 shards a split


@pytest.fixture(scope="module")
def small_cube(small_synth, tmp_path_factory, dask_cluster):
    from distributed import Client

    url = str(tmp_path_factory.mktemp("cubes") / "small.zarr")
    with Client(dask_cluster) as client:
        report = ingest(
            [f"{small_synth.out}/scenes"],
            url,
            lulc=[f"{small_synth.out}/lulc"],
            client=client,
            progress=False,
        )
    assert report.ok, report.problems
    return url


@pytest.fixture(scope="module")
def index(small_cube, tmp_path_factory):
    df, meta = build_index(small_cube)
    assert set(df["split"]) == {"pretrain", "train", "val", "test"}
    assert (df.groupby("split").size() >= 3).all()
    url = str(tmp_path_factory.mktemp("index") / "index.parquet")
    write_index(df, url, meta)
    return url


@pytest.fixture(scope="module")
def clean_run(small_cube, index, tmp_path_factory, dask_cluster):
    """One uninterrupted local run: (out dir, manifest)."""
    from distributed import Client

    out = tmp_path_factory.mktemp("shards") / "clean"
    with Client(dask_cluster) as client:
        manifest = write_shards(small_cube, index, str(out), client=client, **KW)
    return out, manifest


def shard_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def cube_arrays(cube_url):
    """{date: hh_db float32 (y, x)}, lulc (y, x) of the whole (small) cube, via xarray."""
    cube = open_cube(cube_url)
    hh = {pd.Timestamp(t): cube.hh_db.sel(time=t).values for t in cube.time.values}
    return hh, cube.lulc.values


def cube_patch(arrays, t, r, c):
    hh, lulc = arrays
    sar = hh[pd.Timestamp(t)][r * 256 : (r + 1) * 256, c * 256 : (c + 1) * 256]
    return sar.astype(np.float16), lulc[r * 256 : (r + 1) * 256, c * 256 : (c + 1) * 256]


def test_round_trip_through_s3(s3, small_cube, index, dask_client):
    fs = s3.fs()
    fs.put(small_cube, f"{s3.bucket}/cubes/small.zarr", recursive=True)
    cube_url, index_url = s3.url("cubes/small.zarr"), s3.url("runs/index.parquet")
    df, meta = read_index(index)
    write_index(df, index_url, meta, s3.storage_options)
    out = s3.url("runs/shards")
    manifest = write_shards(
        cube_url, index_url, out, storage_options=s3.storage_options, client=dask_client, **KW
    )

    assert read_manifest(out, s3.storage_options) == manifest  # what was written last, read back
    assert (
        manifest["storage_options"]["secret"] == "***"
        and manifest["storage_options"]["key"] == "***"
    )
    assert manifest["cube"]["fingerprint"] == meta["cube_fingerprint"]
    assert manifest["sampling"]["seed"] == 0 and manifest["seed"] == 0
    arrays = cube_arrays(small_cube)
    updated, umeta = read_index(index_url, s3.storage_options)
    assert (
        umeta["cube_fingerprint"] == meta["cube_fingerprint"] and umeta["params"] == meta["params"]
    )
    shard_of = dict(zip(updated["patch_id"], updated["shard"], strict=True))
    for split, entry in manifest["splits"].items():
        expect = set(df.loc[df["split"] == split, "patch_id"])
        assert entry["samples"] == len(expect)
        assert len(entry["shards"]) == min(3, len(expect))
        for sh in entry["shards"]:  # the manifest's sha256 and size are those of the stored bytes
            data = fs.cat_file(f"{s3.bucket}/runs/shards/{sh['name']}")
            assert hashlib.sha256(data).hexdigest() == sh["sha256"] and len(data) == sh["bytes"]
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                exts = {m.name.split(".", 1)[1] for m in tar.getmembers()}
            assert exts == (
                {"json", "sar.npy"} if split == "pretrain" else {"json", "sar.npy", "lulc.npy"}
            )
        seen = {}
        for smp in iter_samples(out, split, s3.storage_options, verify=True):
            t, r, c = pd.Timestamp(smp["meta"]["time"]), smp["meta"]["row"], smp["meta"]["col"]
            assert smp["key"] == smp["meta"]["id"] == patch_id(t, r, c)
            assert smp["meta"]["split"] == split and smp["meta"]["crs"] == "EPSG:4326"
            row = df.set_index("patch_id").loc[smp["key"]]
            assert smp["meta"]["class_histogram"] == {
                str(k): int(row[h]) for k, h in zip(CODES, HIST_COLUMNS, strict=True)
            }
            assert smp["meta"]["bounds"] == [
                row["lon_min"],
                row["lat_min"],
                row["lon_max"],
                row["lat_max"],
            ]
            sar, lab = cube_patch(arrays, t, r, c)
            assert smp["sar"].dtype == np.float16 and smp["sar"].shape == (256, 256)
            np.testing.assert_array_equal(smp["sar"], sar)  # NaN where NaN, else equal
            if split == "pretrain":
                assert smp["lulc"] is None
            else:
                assert smp["lulc"].dtype == np.uint8
                np.testing.assert_array_equal(smp["lulc"], lab)
            if not seen:  # the first sample of each split: re-cut by id from the S3 cube
                rsar, rlab = recut_patch(cube_url, smp["key"], s3.storage_options)
                np.testing.assert_array_equal(rsar, smp["sar"])
                np.testing.assert_array_equal(rlab, lab)
            seen[smp["key"]] = smp["shard"]
        assert set(seen) == expect
        assert all(shard_of[k] == s for k, s in seen.items())  # the index's shard column


def test_shards_are_byte_identical_wherever_the_cube_lives(
    s3, small_cube, index, clean_run, tmp_path, dask_client
):
    out, manifest = clean_run
    again = tmp_path / "again"
    m2 = write_shards(small_cube, index, str(again), client=dask_client, **KW)
    assert shard_files(again) == shard_files(out) and len(shard_files(out)) == 4 * 3
    assert {**m2, "url": None} == {**manifest, "url": None}
    assert (again / MANIFEST).read_bytes().replace(str(again).encode(), b"") == (
        (out / MANIFEST).read_bytes().replace(str(out).encode(), b"")
    )
    # fixed tar headers: no pax headers, mtime 0, root-less owner, 0644, key-sorted members
    raw = (out / "train-000000.tar").read_bytes()
    assert b"PaxHeader" not in raw and b"ustar" in raw
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        members = tar.getmembers()
    assert all(
        (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)
        for m in members
    )
    assert [m.name.split(".", 1)[1] for m in members][:3] == ["json", "lulc.npy", "sar.npy"]
    # a different seed shuffles differently
    other = write_shards(
        small_cube, index, str(tmp_path / "seed1"), seed=1, client=dask_client, **KW
    )
    assert [s["sha256"] for s in other["splits"]["pretrain"]["shards"]] != [
        s["sha256"] for s in manifest["splits"]["pretrain"]["shards"]
    ]


def test_resume_rewrites_only_missing_or_damaged_shards(
    small_cube, index, clean_run, tmp_path, dask_client
):
    out, manifest = clean_run
    crashed = tmp_path / "crashed"
    shutil.copytree(out, crashed)
    (crashed / MANIFEST).unlink()
    (crashed / "pretrain-000001.tar").unlink()  # never written
    damaged = crashed / "train-000000.tar"
    damaged.write_bytes(damaged.read_bytes()[:5000])  # a truncated tar
    (crashed / "val-000007.tar").write_bytes(b"left by an older run")  # not in the plan
    (crashed / ".val-000001.tar.k2j4.partial").write_bytes(b"killed mid-write")
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in crashed.glob("*.tar")}

    with pytest.raises(ShardError, match="no manifest"):
        read_manifest(str(crashed))  # readers refuse a directory without its manifest
    m2 = write_shards(small_cube, index, str(crashed), client=dask_client, **KW)

    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in crashed.glob("*.tar")}
    changed = {k for k in after if before.get(k) != after[k]}
    assert changed == {"pretrain-000001.tar", "train-000000.tar"}
    assert "val-000007.tar" not in after  # stale shard removed
    assert shard_files(crashed) == shard_files(out)
    assert {**m2, "url": None} == {**manifest, "url": None}
    assert not list(crashed.glob(".*partial")) and not list(crashed.glob(".sarcube*"))


def test_manifest_statistics_equal_numpy_over_the_split(small_cube, index, clean_run):
    _, manifest = clean_run
    df, _ = read_index(index)
    cube = open_cube(small_cube)
    hh = {pd.Timestamp(t): cube.hh_db.sel(time=t).values for t in cube.time.values}
    lulc = cube.lulc.values
    for split, entry in manifest["splits"].items():
        rows = df[df["split"] == split]
        sar = np.stack(
            [
                hh[pd.Timestamp(t)][r * 256 : (r + 1) * 256, c * 256 : (c + 1) * 256]
                for t, r, c in zip(rows["time"], rows["row"], rows["col"], strict=True)
            ]
        )
        v = sar.astype(np.float16).astype(np.float64)
        v = v[np.isfinite(v)]
        st = entry["db_stats"]
        assert st["pixels"] == v.size
        assert st["mean"] == pytest.approx(v.mean(), rel=1e-12)
        assert st["std"] == pytest.approx(v.std(), rel=1e-9)
        assert abs(st["mean"] - sar[np.isfinite(sar)].mean()) < 1e-3  # float16 vs float32 values
        labels = np.stack(
            [
                lulc[r * 256 : (r + 1) * 256, c * 256 : (c + 1) * 256]
                for r, c in zip(rows["row"], rows["col"], strict=True)
            ]
        )
        counts = np.bincount(labels.ravel(), minlength=15)
        cls = entry["classes"]
        assert cls["pixels"] == {str(k): int(counts[k]) for k in CODES}
        assert sum(cls["nine_class_pixels"].values()) == counts[1:].sum()
        assert cls["nine_class_pixels"]["forest"] == counts[[6, 7, 8, 9, 11]].sum()
        assert cls["nine_class_pixels"]["cropland"] == counts[[3, 4]].sum()
        assert sum(cls["nine_class_fraction"].values()) == pytest.approx(1.0)
    # the pretrain split has no labels in its shards
    assert manifest["splits"]["pretrain"]["members"] == ["json", "sar.npy"]


def test_index_from_another_cube_is_refused(small_synth, small_cube, index, tmp_path, dask_client):
    other = str(tmp_path / "other.zarr")
    ingest(
        [small_synth.scene_urls[0]],
        other,
        lulc=[f"{small_synth.out}/lulc"],
        client=dask_client,
        progress=False,
    )
    fp_other = cube_fingerprint(cube_attrs(open_group(other)))
    fp_index = read_index(index)[1]["cube_fingerprint"]
    assert fp_other != fp_index
    out = tmp_path / "out"
    with pytest.raises(ShardError, match=f"(?s){fp_index}.*{fp_other}"):
        write_shards(other, index, str(out), client=dask_client, **KW)
    assert not (out / MANIFEST).exists()


def test_index_disagreeing_with_the_labels_fails_without_a_manifest(
    small_cube, index, tmp_path, dask_client
):
    df, meta = read_index(index)
    df.loc[df["split"] == "val", "hist_01"] += 1  # same fingerprint, wrong histograms
    out = tmp_path / "out"
    with pytest.raises(ShardError, match="not made from this cube's labels"):
        write_shards(small_cube, (df, meta), str(out), client=dask_client, **KW)
    assert not (out / MANIFEST).exists()


def test_clear_errors(s3, small_cube, index, tmp_path, dask_client):
    df, meta = read_index(index)
    with pytest.raises(ShardError, match="no rows"):
        write_shards(small_cube, (df.iloc[:0], meta), str(tmp_path / "a"), client=dask_client, **KW)
    with pytest.raises(ShardError, match=r"no patches in split\(s\) \['val'\]"):
        write_shards(
            small_cube,
            (df[df["split"] != "val"], meta),
            str(tmp_path / "b"),
            client=dask_client,
            **KW,
        )
    # ... unless only the other splits are asked for
    m = write_shards(
        small_cube,
        (df[df["split"] != "val"], meta),
        str(tmp_path / "b"),
        splits=("pretrain", "train"),
        client=dask_client,
        **KW,
    )
    assert sorted(m["splits"]) == ["pretrain", "train"]
    with pytest.raises(ValueError, match="needs its metadata"):
        write_shards(small_cube, df, str(tmp_path / "c"), client=dask_client, **KW)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for dest in (a_file, a_file / "sub"):
        with pytest.raises(ShardError, match="cannot write shards there"):
            write_shards(small_cube, index, str(dest), client=dask_client, **KW)
    with pytest.raises(ShardError, match="cannot write shards there"):
        write_shards(
            small_cube,
            index,
            "s3://no-such-bucket-here/shards",
            storage_options=s3.storage_options,
            client=dask_client,
            **KW,
        )
    assert a_file.read_text() == "x"
    with pytest.raises(ShardError, match="no manifest"):
        read_manifest(str(tmp_path / "a"))


def test_shard_count_rule_and_shuffle():
    assert shard_count(10 * 2**20, 100, 256, 8) == 8  # small split: the minimum
    assert shard_count(3000 * 2**20, 10_000, 256, 8) == 12  # ceil(3000 / 256)
    assert shard_count(3000 * 2**20, 5, 256, 8) == 5  # never more shards than samples
    assert shard_count(0, 1, 256, 8) == 1
    # 40 × 40 patches on one date: every shard draws from all over the area
    rows = [
        {
            "patch_id": patch_id("2022-10-10", r, c),
            "time": pd.Timestamp("2022-10-10"),
            "row": r,
            "col": c,
            "lon_min": 0.0,
            "lat_min": 0.0,
            "lon_max": 1.0,
            "lat_max": 1.0,
            "split": "pretrain",
            **dict.fromkeys(HIST_COLUMNS, 0),
            "nodata_frac": 0.0,
            "anchors": 1,
            "shard": "",
        }
        for r in range(40)
        for c in range(40)
    ]
    df = pd.DataFrame(rows)
    plans = plan_shards(df, {"2022-10-10": 0}, "fp", ["pretrain"], 256, 8, seed=0)["pretrain"]
    assert [len(p.samples) for p in plans] == [200] * 8
    for p in plans:
        assert np.ptp([s.row for s in p.samples]) >= 35 and np.ptp([s.col for s in p.samples]) >= 35
    again = plan_shards(
        df.sample(frac=1, random_state=1), {"2022-10-10": 0}, "fp", ["pretrain"], 256, 8, seed=0
    )
    assert [[s.key for s in p.samples] for p in again["pretrain"]] == [
        [s.key for s in p.samples] for p in plans
    ]
    assert sorted(s.key for p in plans for s in p.samples) == sorted(df["patch_id"])
