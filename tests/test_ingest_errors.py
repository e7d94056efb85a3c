"""Bad inputs to ``sarcube ingest``: each one is one line naming the file and what was expected,
the good scenes still go into the cube, a summary lists the problems, and ``--strict`` (or a run
that ingested nothing) fails.

The bad files are copies of the session's synthetic scenes, modified with rasterio and given valid
JAXA names with a date of their own (so a bad scene would form its own time slice), except where
the name itself is the problem.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from helpers.bad_scenes import corrupt_middle_tile, rewrite_geotiff, with_date
from rasterio.warp import transform_bounds

from sarcube.cube import open_cube
from sarcube.ingestion import IngestError, ingest

SARCUBE = [sys.executable, "-m", "sarcube.cli"]


# ---------------------------------------------------------------------------------------------
# Building bad files from the good synthetic scenes


def _date_of(yymmdd: str) -> np.datetime64:
    return np.datetime64(dt.datetime.strptime(yymmdd, "%y%m%d").date(), "ns")


def _truncated(src: str, dst: Path, keep: int) -> str:
    dst.write_bytes(Path(src).read_bytes()[:keep])
    return str(dst)


# Each case: (id, new date yymmdd or None, builder(src, dir) -> path, expected message parts).
# The expected parts are written here from the issue, independently of the code's messages.
def _cases():
    def truncated_tail(src, d):
        return _truncated(src, d / with_date(src, "220913"), os.path.getsize(src) // 2)

    def truncated_header(src, d):
        return _truncated(src, d / with_date(src, "220914"), 120)

    def not_a_tiff(src, d):
        p = d / with_date(src, "220915")
        p.write_bytes(b"<html>403 Forbidden</html>\n" * 40)
        return str(p)

    def corrupt_middle(src, d):
        return corrupt_middle_tile(src, d / with_date(src, "220916"))

    def no_crs(src, d):
        return rewrite_geotiff(src, d / with_date(src, "220917"), crs=None)

    def float32(src, d):
        with rasterio.open(src) as ds:
            dn = ds.read().astype(np.float32)
        return rewrite_geotiff(src, d / with_date(src, "220918"), data=dn)

    def two_bands(src, d):
        with rasterio.open(src) as ds:
            dn = ds.read(1)
        return rewrite_geotiff(src, d / with_date(src, "220919"), data=np.stack([dn, dn]))

    def bad_name(src, d):
        return rewrite_geotiff(src, d / "ALOS2_HH_scene_2022-09-20.tif")

    def outside_grid(src, d):
        with rasterio.open(src) as ds:
            t = ds.transform
        far = Affine(t.a, t.b, t.c + 200_000.0, t.d, t.e, t.f)  # 200 km east: ~142.5°E
        return rewrite_geotiff(src, d / with_date(src, "220921"), transform=far)

    def all_nodata(src, d):
        with rasterio.open(src) as ds:
            zeros = np.zeros((1, ds.height, ds.width), np.uint16)
        return rewrite_geotiff(src, d / with_date(src, "220922"), data=zeros)

    return [
        ("truncated-tail", "220913", truncated_tail, ["cannot be read", "truncated or corrupt"]),
        (
            "truncated-header",
            "220914",
            truncated_header,
            ["cannot read as a GeoTIFF", "Failed to read directory"],
        ),
        ("not-a-tiff", "220915", not_a_tiff, ["not a GeoTIFF"]),
        ("corrupt-middle-tile", "220916", corrupt_middle, ["cannot be read", "corrupt"]),
        ("no-crs", "220917", no_crs, ["no CRS", "expected UTM or EPSG:4326"]),
        ("float32", "220918", float32, ["expected uint16", "found float32"]),
        ("two-bands", "220919", two_bands, ["expected 1 band", "found 2"]),
        (
            "unparseable-name",
            None,
            bad_name,
            [
                "does not follow the ALOS-2 scene naming rule",
                "IMG-{pol}-ALOS2{orbit:5 digits}{frame:4 digits}-{yymmdd}-",
            ],
        ),
        ("outside-grid", "220921", outside_grid, ["outside the cube grid"]),
        ("all-nodata", "220922", all_nodata, ["no valid pixel"]),
    ]


CASES = _cases()


@pytest.fixture(scope="module")
def good(small_synth):
    """The good inputs and their dates (from the generator's record, not from the cube)."""
    dates = sorted(np.datetime64(d, "ns") for d in small_synth.record["dates"])
    assert len(small_synth.scene_urls) == len(dates) == 3
    return small_synth.scene_urls, small_synth.lulc_urls, dates


@pytest.fixture(scope="module")
def bad_files(small_synth, tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_scenes")
    src = small_synth.scene_urls[0]
    return {cid: builder(src, d) for cid, _, builder, _ in CASES}


def assert_good_dates_ingested(cube: str, dates) -> None:
    """open_cube shows exactly the good dates, each with plenty of plausible backscatter."""
    ds = open_cube(cube)
    assert list(ds.time.values) == list(dates)
    hh = ds.hh_db.values
    for i in range(len(dates)):
        valid = np.isfinite(hh[i])
        assert valid.mean() > 0.5, f"slice {dates[i]}: only {valid.mean():.0%} valid cells"
        assert -35 < np.median(hh[i][valid]) < 5  # dB of L-band HH over land and water
    assert (ds.lulc.values > 0).mean() > 0.5


def assert_one_line(problem: str, path: str, expected: list[str]) -> None:
    """One plain line: the file, then what is wrong (no repr of an exception, no cut-off)."""
    assert "\n" not in problem
    assert problem.startswith(f"{path}: "), problem
    assert problem.count(path) == 1, problem
    assert "Exception" not in problem and "Error(" not in problem, problem
    for part in expected:
        assert part in problem, f"{part!r} not in {problem!r}"


@pytest.fixture(scope="module")
def mixed(good, bad_files, dask_cluster, tmp_path_factory):
    """One ingest of the good scenes together with every bad file above."""
    from distributed import Client

    scenes, lulc, _ = good
    cube = str(tmp_path_factory.mktemp("mixed") / "cube.zarr")
    with Client(dask_cluster) as client:
        report = ingest(
            [*scenes, *bad_files.values()], cube, lulc=lulc, client=client, progress=False
        )
    return cube, report


@pytest.mark.parametrize("cid,yymmdd,builder,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_scene_is_one_line_naming_it(cid, yymmdd, builder, expected, bad_files, mixed):
    cube, report = mixed
    bad = bad_files[cid]
    mine = [p for p in report.problems if bad in p]
    assert len(mine) == 1, report.problems
    assert_one_line(mine[0], bad, expected)
    if yymmdd is not None:  # its date never shows as a valid slice
        assert _date_of(yymmdd) not in open_cube(cube).time.values


def test_good_scenes_ingested_beside_bad_ones_and_summary(good, bad_files, mixed):
    cube, report = mixed
    scenes, _, dates = good
    assert not report.ok
    assert sorted(report.ingested) == sorted(Path(u).name[7:-4] for u in scenes)
    assert len(report.problems) == len(bad_files)  # one line per bad file, nothing else
    assert_good_dates_ingested(cube, dates)
    # the summary: counts, labels, slices, one line per problem, and the time last
    lines = report.summary().splitlines()
    assert "scenes ingested: 3" in lines[1] and f"problems: {len(bad_files)}" in lines[1]
    assert [ln for ln in lines if ln.startswith("  problem: ")] == [
        f"  problem: {p}" for p in report.problems
    ]
    assert lines[-1].startswith("  time: ")


def test_scene_without_lulc_coverage(good, tmp_path, dask_client):
    """With --lulc tiles that do not cover a scene (inside the cube's bbox), it is reported."""
    scenes, lulc, dates = good[0][:1], good[1], good[2][:1]  # one good scene is enough here
    src = scenes[0]
    with rasterio.open(src) as ds:
        t, height_m = ds.transform, ds.height * -ds.transform.e
    # one scene height + 1 km south: entirely below the original scene, hence below the labels
    south = Affine(t.a, t.b, t.c, t.d, t.e, t.f - height_m - 1000.0)
    bad = rewrite_geotiff(src, tmp_path / with_date(src, "220923"), transform=south)
    with rasterio.open(bad) as ds:
        _, bad_south, _, bad_north = transform_bounds(ds.crs, "EPSG:4326", *ds.bounds)
    with rasterio.open(lulc[0]) as ds:
        lw, ls, le, ln = ds.bounds
    assert bad_north < ls
    bbox = (lw, bad_south, le, ln)  # the cube reaches down over the moved scene
    cube = str(tmp_path / "cube.zarr")
    report = ingest([*scenes, bad], cube, lulc=lulc, bbox=bbox, client=dask_client, progress=False)
    assert len(report.problems) == 1, report.problems
    assert_one_line(report.problems[0], bad, ["no HR-LULC coverage"])
    ds = open_cube(cube)
    assert list(ds.time.values) == dates
    assert np.isfinite(ds.hh_db.values).mean() > 0.2  # the cube reaches beyond the scene


def test_all_nodata_scene_is_reported_again_on_rerun(good, bad_files, tmp_path, dask_client):
    """A re-run with the same inputs does not hide the problem behind 'skipped'."""
    scenes, lulc = good[0][:1], good[1]
    bad = bad_files["all-nodata"]
    cube = str(tmp_path / "cube.zarr")
    first = ingest([*scenes, bad], cube, lulc=lulc, client=dask_client, progress=False)
    again = ingest([*scenes, bad], cube, lulc=lulc, client=dask_client, progress=False)
    assert again.problems == first.problems and len(again.problems) == 1
    assert sorted(again.skipped) == sorted(first.ingested)
    with pytest.raises(IngestError, match="no valid pixel"):
        ingest([*scenes, bad], cube, lulc=lulc, client=dask_client, progress=False, strict=True)


@pytest.mark.parametrize("with_bbox", [True, False], ids=["bbox", "no-bbox"])
def test_nothing_ingested_fails_naming_each_file(with_bbox, good, bad_files, tmp_path, dask_client):
    """Only bad scenes and no labels: an error that lists each bad file (not a grid question)."""
    _, lulc, _ = good
    bad = [bad_files[c] for c in ("truncated-tail", "two-bands", "unparseable-name")]
    with rasterio.open(lulc[0]) as ds:
        bbox = tuple(ds.bounds)
    with pytest.raises(IngestError) as e:
        ingest(
            bad,
            str(tmp_path / "c.zarr"),
            bbox=bbox if with_bbox else None,
            client=dask_client,
            progress=False,
        )
    msg = str(e.value)
    assert "nothing" in msg
    for b in bad:
        assert b in msg, msg


# ---------------------------------------------------------------------------------------------
# Object storage


@pytest.fixture
def refused_port():
    """A local port that refuses connections for the whole test: bound, never listening (a port
    merely found free could be taken meanwhile by another test's server, e.g. under xdist)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def test_unreachable_endpoint(good, tmp_path, dask_client, refused_port):
    scenes, lulc, dates = good[0][:1], good[1], good[2][:1]
    port = refused_port
    storage_options = {
        "key": "k",
        "secret": "s",
        "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"},
        # fail fast: one attempt instead of botocore's retries with back-off (~11 s)
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2},
    }
    url = "s3://sarcube-test/scenes/"
    cube = str(tmp_path / "cube.zarr")
    report = ingest(
        [*scenes, url],
        cube,
        lulc=lulc,
        storage_options=storage_options,
        client=dask_client,
        progress=False,
    )
    assert len(report.problems) == 1, report.problems
    assert_one_line(report.problems[0], url, ["cannot reach the storage endpoint"])
    assert_good_dates_ingested(cube, dates)


def test_missing_bucket_and_key(good, s3, tmp_path, dask_client):
    scenes, lulc, dates = good[0][:1], good[1], good[2][:1]
    missing_bucket = "s3://no-such-bucket-sarcube/scenes/"
    missing_key = s3.url("scenes", with_date(scenes[0], "220924"))
    cube = str(tmp_path / "cube.zarr")
    report = ingest(
        [*scenes, missing_bucket, missing_key],
        cube,
        lulc=lulc,
        storage_options=s3.storage_options,
        client=dask_client,
        progress=False,
    )
    assert len(report.problems) == 2, report.problems
    assert_one_line(report.problems[0], missing_bucket, ["not found"])
    assert_one_line(report.problems[1], missing_key, ["not found"])
    assert_good_dates_ingested(cube, dates)


@pytest.fixture
def s3_auth(s3):
    """Make the moto server check SigV4 signatures and IAM policies (moto does not by default).

    Creates an IAM user allowed s3:* with an access key, then turns authentication on through
    moto's ``/moto-api/reset-auth``; turns it off again afterwards.
    """
    import boto3

    iam = boto3.client(
        "iam",
        endpoint_url=s3.endpoint,
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="x",
    )
    iam.create_user(UserName="ingest")
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
    }
    iam.put_user_policy(UserName="ingest", PolicyName="s3", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="ingest")["AccessKey"]

    def set_auth(count: str) -> None:
        req = urllib.request.Request(
            f"{s3.endpoint}/moto-api/reset-auth",
            data=count.encode(),
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        urllib.request.urlopen(req, timeout=10).read()

    set_auth("0")
    try:
        yield key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        set_auth("inf")


def test_wrong_credentials(good, s3, s3_auth, tmp_path, dask_client):
    """A scene on S3 read with a wrong secret: 'access denied'; with the right one it ingests."""
    scenes, lulc, dates = good[0][:1], good[1], good[2][:1]
    key_id, secret = s3_auth
    name = with_date(scenes[0], "220925")
    right = {"key": key_id, "secret": secret, "client_kwargs": {"endpoint_url": s3.endpoint}}
    wrong = {**right, "secret": "not-the-secret"}
    import s3fs

    s3fs.S3FileSystem(**right, skip_instance_cache=True).put_file(scenes[0], s3.url("in", name))
    url = s3.url("in") + "/"

    report = ingest(
        [*scenes, url],
        str(tmp_path / "wrong.zarr"),
        lulc=lulc,
        storage_options=wrong,
        client=dask_client,
        progress=False,
    )
    assert len(report.problems) == 1, report.problems
    assert_one_line(report.problems[0], url, ["access denied", "credentials"])
    assert_good_dates_ingested(str(tmp_path / "wrong.zarr"), dates)

    # control: the server really checks, and the right key gets the scene in (workers via GDAL)
    report = ingest(
        [*scenes, url],
        str(tmp_path / "right.zarr"),
        lulc=lulc,
        storage_options=right,
        client=dask_client,
        progress=False,
    )
    assert report.problems == [] and len(report.ingested) == 2
    assert _date_of("220925") in open_cube(str(tmp_path / "right.zarr")).time.values


# ---------------------------------------------------------------------------------------------
# The command line


CLI_BAD = {  # found by the inspection, and one found only while writing its slice
    "strict": ["truncated-tail", "no-crs", "float32", "unparseable-name", "corrupt-middle-tile"],
    "lenient": ["two-bands", "corrupt-middle-tile"],
    "nothing-ingested": ["not-a-tiff", "unparseable-name"],
}


@pytest.mark.parametrize("mode", list(CLI_BAD))
def test_cli_one_line_per_problem_and_exit_status(mode, good, bad_files, tmp_path):
    """--strict: non-zero; without it: the summary last, exit 1; nothing ingested: non-zero.
    Every bad file is named on exactly one line of the output (no worker log names it), and no
    traceback is printed."""
    scenes, lulc, dates = good[0][:1], good[1], good[2][:1]
    cases = {c[0]: c for c in CASES}
    bad = [bad_files[c] for c in CLI_BAD[mode]]
    cube = str(tmp_path / "cube.zarr")
    args = [*SARCUBE, "ingest", "--cube", cube, "--workers", "1"]
    if mode == "nothing-ingested":
        with rasterio.open(lulc[0]) as ds:
            args += ["--scenes", *bad, "--bbox", *(str(b) for b in ds.bounds)]
    else:
        args += ["--scenes", *scenes, *bad, "--lulc", *lulc]
    if mode == "strict":
        args.append("--strict")
    out = subprocess.run(args, capture_output=True, text=True, timeout=240)
    text = out.stdout + out.stderr
    assert "Traceback" not in text, text
    for cid, path in zip(CLI_BAD[mode], bad, strict=True):
        lines = [ln for ln in text.splitlines() if path in ln]
        assert len(lines) == 1, (path, text)
        assert lines[0].strip().removeprefix("problem: ").startswith(f"{path}: "), lines[0]
        for part in cases[cid][3]:
            assert part in lines[0], lines[0]
    if mode == "lenient":
        assert out.returncode == 1, text
        summary = out.stdout[out.stdout.index("ingest summary for") :].splitlines()
        assert "scenes ingested: 1" in summary[1] and f"problems: {len(bad)}" in summary[1]
        assert sum(ln.strip().startswith("problem:") for ln in summary) == len(bad)
        assert summary[-1].strip().startswith("time:")  # the summary ends the output
        assert_good_dates_ingested(cube, dates)
    else:
        assert out.returncode != 0, text
        if mode == "strict":  # all or nothing: every input checked first, nothing written
            assert not os.path.exists(cube), os.listdir(cube)
            assert "nothing was written" in out.stderr
