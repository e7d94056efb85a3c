"""The test harness: a real S3 server, a real Dask cluster, and the real-data fixtures.

- ``s3``: a moto S3 HTTP server on 127.0.0.1 (session-scoped ``ThreadedMotoServer``, the way
  s3fs's own suite runs), reset before every test, with one empty bucket. Everything that talks
  to S3 in the tests goes to it over HTTP: s3fs, GDAL ``/vsis3/``, WebDataset, worker processes.
- ``dask_client``: a client of a session-scoped ``LocalCluster`` with 2 worker *processes*.
- ``realdata``: the real files in ``../shared/realdata`` (tests skip with a reason when absent).
- ``small_synth``: a small synthetic data set, generated once per session.
"""

from __future__ import annotations

import os
import socket
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# -- scheduling under pytest-xdist (`make test`: -n 2 --dist loadfile --no-loadscope-reorder) ----
# Each test file is one unit of work, run whole by one worker: its tests share module fixtures
# and keep their file order (test_cli_errors' README check and test_transactions' overlap check
# run after the cases they read). Files that share an expensive session fixture share a unit:
# the small demo serves test_cli and test_notebooks. Units start heaviest first (durations
# measured on 2 cores) so that no long file is left to end the run alone. (xdist's own
# `--dist loadgroup` marks do not take effect with pytest 9.2, hence the scheduler below.)
XDIST_SHARED_UNIT = {"test_cli.py": "demo", "test_notebooks.py": "demo"}
XDIST_HEAVY_FIRST = [
    "demo",
    "test_secrets.py",
    "test_faults.py",
    "test_transactions.py",
    "test_cli_errors.py",
    "test_predict.py",
    "test_pretrain.py",
    "test_ingest_errors.py",
    "test_ingest_resume.py",
    "test_finetune.py",
    "test_shard_integrity.py",
    "test_synth.py",
]


def _xdist_unit(nodeid: str) -> str:
    name = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
    return XDIST_SHARED_UNIT.get(name, name)


# -- `make test-fast`: -m "not slow and not integration" -------------------------------------
# A test is "integration" when it needs one of the session's expensive fixtures (a Dask cluster
# of worker processes, a synthetic cube ingested on it, its shards, the small demo) or sits in a
# file whose tests start whole processes (the CLI, torchrun ranks, the bootstrap, notebooks).
# What is left are the unit tests: each compares a function with an independent computation.
INTEGRATION_FIXTURES = {"dask_cluster", "dask_client", "small_cube", "small_shards", "small_demo"}
INTEGRATION_FILES = {
    "test_bootstrap.py",
    "test_cli.py",
    "test_cli_errors.py",
    "test_deploy.py",
    "test_faults.py",
    "test_finetune.py",
    "test_ingest.py",
    "test_ingest_errors.py",
    "test_ingest_resume.py",
    "test_notebooks.py",
    "test_predict.py",
    "test_pretrain.py",
    "test_secrets.py",
    "test_security.py",
    "test_transactions.py",
}


def _mark_integration(items: list[pytest.Item]) -> None:
    for it in items:
        name = it.nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
        if name in INTEGRATION_FILES or INTEGRATION_FIXTURES & set(getattr(it, "fixturenames", ())):
            it.add_marker(pytest.mark.integration)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _mark_integration(items)
    if hasattr(config, "workerinput"):  # an xdist worker: its order is the schedule's order
        rank = {u: i for i, u in enumerate(XDIST_HEAVY_FIRST)}
        items.sort(key=lambda it: rank.get(_xdist_unit(it.nodeid), len(rank)))  # stable


@pytest.hookimpl(optionalhook=True)  # known only when xdist is loaded (not with -p no:xdist)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FileUnits(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _xdist_unit(nodeid)

    return FileUnits(config, log)


REPO = Path(__file__).resolve().parents[1]
REALDATA = Path(os.environ.get("SARCUBE_REALDATA", REPO.parent / "shared" / "realdata"))

# Dummy credentials: the S3 server accepts any; set before anything creates a boto session, and
# inherited by subprocesses (torchrun ranks, DataLoader workers, Dask workers).
os.environ.setdefault("AWS_ACCESS_KEY_ID", "sarcube-test-key")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "sarcube-test-secret")
os.environ.pop("AWS_PROFILE", None)
os.environ.setdefault("MPLBACKEND", "Agg")


@dataclass
class S3Env:
    """Handle on the test S3 server."""

    endpoint: str
    bucket: str

    @property
    def storage_options(self) -> dict[str, Any]:
        return {
            "key": os.environ["AWS_ACCESS_KEY_ID"],
            "secret": os.environ["AWS_SECRET_ACCESS_KEY"],
            "client_kwargs": {"endpoint_url": self.endpoint},
        }

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *(p.strip("/") for p in parts)])

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(**self.storage_options, skip_instance_cache=True)

    def rasterio_env(self):
        from sarcube.storage import rasterio_env

        return rasterio_env(self.storage_options)

    def subprocess_env(self) -> dict[str, str]:
        """Environment for a child process that should reach this server with plain AWS_* vars."""
        env = dict(os.environ)
        env["AWS_ENDPOINT_URL"] = self.endpoint
        return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server) -> S3Env:
    """A fresh S3 state (server reset) with one empty bucket, ``sarcube-test``."""
    import s3fs

    req = urllib.request.Request(f"{s3_server}/moto-api/reset", method="POST")
    urllib.request.urlopen(req, timeout=10).read()
    s3fs.S3FileSystem.clear_instance_cache()
    env = S3Env(endpoint=s3_server, bucket="sarcube-test")
    env.fs().mkdir(env.bucket)  # no region: a us-east-1 LocationConstraint is refused
    return env


@pytest.fixture(scope="session")
def dask_cluster():
    from distributed import LocalCluster

    cluster = LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        memory_limit="3GiB",
        dashboard_address="127.0.0.1:0",
        silence_logs=40,
    )
    yield cluster
    cluster.close()


@pytest.fixture
def dask_client(dask_cluster):
    from distributed import Client

    with Client(dask_cluster) as client:
        yield client


@pytest.fixture(scope="session")
def realdata() -> Path:
    if not REALDATA.is_dir():
        pytest.skip(
            f"real data not found at {REALDATA} (set SARCUBE_REALDATA or check out ../shared)"
        )
    return REALDATA


@pytest.fixture(scope="session")
def hrlulc_250m(realdata) -> Path:
    p = realdata / "hrlulc_japan_v23.12_250m" / "JAXA_HRLULC_Japan_v23.12_250m.tif"
    if not p.exists():
        pytest.skip(f"{p} not found")
    return p


# A small area (0.17° a side, 4 × 4 patches of 256² at 1/6000°): fast to generate, enough
# patches for sampling and splits.
SMALL_BBOX = (140.30, 36.00, 140.30 + 2048 / 12000, 36.00 + 2048 / 12000)


@pytest.fixture(scope="session")
def small_synth(tmp_path_factory):
    """Procedural synthetic data (no template needed): 3 dates, 1 scene each."""
    from sarcube.synth import synthesize

    out = tmp_path_factory.mktemp("small_synth")
    return synthesize(str(out), bbox=SMALL_BBOX, seed=3, progress=False)


@pytest.fixture(scope="session")
def small_cube(small_synth, tmp_path_factory, dask_cluster) -> str:
    """``small_synth`` ingested (3 dates, labels) into a local cube; its URL."""
    from distributed import Client

    from sarcube.ingestion import ingest

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


@pytest.fixture(scope="session")
def small_shards(small_cube, tmp_path_factory, dask_cluster) -> Path:
    """``small_cube``'s patches in shards (every patch with valid SAR; Oct/Nov -> pretrain, Sep ->
    train 8 / val 4 / test 4 patches by 2 × 2-patch block; 2 shards a split); the directory."""
    from distributed import Client
    from helpers.shard_index import build_index  # made by hand (no sampling module)

    from sarcube.index import write_index
    from sarcube.shards import write_shards

    tmp = tmp_path_factory.mktemp("small_shards")
    df, meta = build_index(small_cube)
    write_index(df, str(tmp / "index.parquet"), meta)
    with Client(dask_cluster) as client:
        write_shards(
            small_cube,
            str(tmp / "index.parquet"),
            str(tmp / "shards"),
            shard_size_mb=64,
            min_shards_per_split=2,
            progress=False,
            client=client,
        )
    return tmp / "shards"


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory):
    """``sarcube demo`` on ``SMALL_BBOX`` (every stage, about a minute), run once per session:
    ``(work dir holding demo-output/, the CompletedProcess)``."""
    import subprocess
    import sys

    work = tmp_path_factory.mktemp("small_demo")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sarcube.cli",
            "demo",
            "--out",
            str(work / "demo-output"),
            "--bbox",
            *map(str, SMALL_BBOX),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return work, proc
