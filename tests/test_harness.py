"""The test harness itself: the S3 server is real HTTP (s3fs and GDAL /vsis3/ both reach it, also
from other processes), its state is reset per test, and the Dask cluster runs worker processes."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine

from sarcube.storage import gdal_path, redact

PROFILE = dict(
    driver="GTiff",
    width=64,
    height=48,
    count=1,
    dtype="uint16",
    nodata=0,
    crs="EPSG:32654",
    transform=Affine(6.25, 0, 400000, 0, -6.25, 4000000),
)


def test_each_test_starts_with_one_empty_bucket(s3):
    fs = s3.fs()
    assert fs.ls(s3.bucket) == []
    fs.pipe(f"{s3.bucket}/leftover.txt", b"x")  # the next test must not see this


def test_reset_between_tests(s3):
    assert s3.fs().ls(s3.bucket) == []


def test_s3fs_write_gdal_read_and_gdal_write_s3fs_read(s3, tmp_path):
    data = np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) + 1
    local = tmp_path / "a.tif"
    with rasterio.open(local, "w", **PROFILE) as ds:
        ds.write(data, 1)
    fs = s3.fs()
    fs.put_file(str(local), f"{s3.bucket}/via-s3fs/a.tif")
    # GDAL reads the object over HTTP through /vsis3/
    with s3.rasterio_env(), rasterio.open(gdal_path(s3.url("via-s3fs/a.tif"))) as ds:
        np.testing.assert_array_equal(ds.read(1), data)
        assert ds.crs.to_epsg() == 32654
    # GDAL writes through /vsis3/ (a sequential CreateCopy, as GDAL streams uploads), s3fs reads
    with rasterio.open(tmp_path / "flipped.tif", "w", **PROFILE) as ds:
        ds.write(data[::-1], 1)
    with s3.rasterio_env():
        rasterio.shutil.copy(
            tmp_path / "flipped.tif",
            gdal_path(s3.url("via-gdal/b.tif")),
            driver="GTiff",
            STREAMABLE_OUTPUT="YES",
        )
    fs.invalidate_cache()
    fs.get_file(f"{s3.bucket}/via-gdal/b.tif", str(tmp_path / "b.tif"))
    with rasterio.open(tmp_path / "b.tif") as ds:
        np.testing.assert_array_equal(ds.read(1), data[::-1])


def test_s3_reachable_from_a_child_process(s3):
    s3.fs().pipe(f"{s3.bucket}/hello.txt", b"from the test")
    code = (
        "import s3fs, sys; fs = s3fs.S3FileSystem(); "
        f"sys.stdout.write(fs.cat('{s3.bucket}/hello.txt').decode())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=s3.subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "from the test"


def _worker_pid_and_s3_read(endpoint: str, bucket: str) -> tuple[int, bytes]:
    import s3fs  # a filesystem made inside the worker process (s3fs is not fork-safe)

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
    return os.getpid(), fs.cat(f"{bucket}/w.txt")


def test_dask_cluster_runs_worker_processes_that_reach_s3(dask_client, s3):
    s3.fs().pipe(f"{s3.bucket}/w.txt", b"payload")
    futures = [
        dask_client.submit(_worker_pid_and_s3_read, s3.endpoint, s3.bucket, pure=False, key=f"t{i}")
        for i in range(4)
    ]
    results = dask_client.gather(futures)
    pids = {pid for pid, _ in results}
    assert os.getpid() not in pids and len(dask_client.scheduler_info()["workers"]) == 2
    assert all(payload == b"payload" for _, payload in results)
    assert dask_client.dashboard_link.startswith("http://127.0.0.1:")


def test_redact_hides_credentials(s3):
    red = redact(s3.storage_options)
    assert red["key"] == "***" and red["secret"] == "***"
    assert red["client_kwargs"]["endpoint_url"] == s3.endpoint
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in repr(red)
