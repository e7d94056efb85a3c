"""The store lock (sarcube.locking) on local disk and on the S3 server: exclusive create, the
holder named in the refusal, waiting, heartbeats, stale locks broken only on request, a lost
lock detected before the next commit point, and two real processes racing for one lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from sarcube.locking import (
    LOCK_NAME,
    LockHeldError,
    LockLostError,
    StoreLock,
    break_lock,
)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """(url, storage_options) of an empty store, local or on the S3 server."""
    if request.param == "local":
        return str(tmp_path / "store"), {}
    s3 = request.getfixturevalue("s3")
    return s3.url("store"), s3.storage_options


def _age_lock(url: str, storage_options, seconds: float) -> None:
    """Rewrite the lock's heartbeat as if its holder had died ``seconds`` ago."""
    lock = StoreLock(url, storage_options)
    rec = lock.read()
    old = time.time() - seconds
    import datetime as dt

    rec["heartbeat"] = dt.datetime.fromtimestamp(old, dt.timezone.utc).isoformat()
    lock.fs.pipe_file(lock.path, json.dumps(rec).encode())


def test_second_writer_refused_with_the_holder_named(store):
    url, storage_options = store
    with StoreLock(url, storage_options, command="sarcube ingest") as first:
        rec = first.read()
        assert rec["pid"] == os.getpid() and rec["command"] == "sarcube ingest"
        t0 = time.monotonic()
        with pytest.raises(LockHeldError) as e:
            StoreLock(url, storage_options, command="sarcube shards").acquire()
        assert time.monotonic() - t0 < 5  # at once, not after a timeout
        msg = str(e.value)
        assert url in msg and "sarcube ingest" in msg and f"pid {os.getpid()}" in msg
        assert "last heartbeat" in msg and "\n" not in msg
    # released: the object is gone and the next writer gets it
    assert StoreLock(url, storage_options).read() is None
    with StoreLock(url, storage_options):
        pass


def test_wait_for_the_holder(store):
    url, storage_options = store
    first = StoreLock(url, storage_options).acquire()
    threading.Timer(1.5, first.release).start()
    t0 = time.monotonic()
    with StoreLock(url, storage_options, wait=20):
        waited = time.monotonic() - t0
    assert 1.0 < waited < 15


def test_heartbeat_refreshes_the_record(store):
    url, storage_options = store
    with StoreLock(url, storage_options, heartbeat_s=0.3) as lock:
        before = lock.read()["heartbeat"]
        time.sleep(1.6)
        after = lock.read()["heartbeat"]
        lock.check()
    assert after > before


def test_stale_lock_is_broken_only_on_request(store):
    url, storage_options = store
    dead = StoreLock(url, storage_options, command="sarcube predict").acquire()
    dead._stop.set()  # the holder "dies": no more heartbeats, the object stays
    _age_lock(url, storage_options, 3600)
    with pytest.raises(LockHeldError, match=r"looks stale.*--break-stale-lock"):
        StoreLock(url, storage_options, stale_after_s=60).acquire()
    with StoreLock(url, storage_options, stale_after_s=60, break_stale=True) as lock:
        assert lock.read()["token"] == lock.record["token"]


def test_unlock_refuses_a_live_lock(store):
    url, storage_options = store
    with StoreLock(url, storage_options):
        with pytest.raises(LockHeldError, match="live"):
            break_lock(url, storage_options)
    assert "not locked" in break_lock(url, storage_options)
    held = StoreLock(url, storage_options).acquire()
    held._stop.set()
    _age_lock(url, storage_options, 3600)
    assert "removed" in break_lock(url, storage_options, stale_after_s=60)
    assert StoreLock(url, storage_options).read() is None


def test_a_broken_lock_is_noticed_by_its_holder(store):
    url, storage_options = store
    lock = StoreLock(url, storage_options, heartbeat_s=0.2).acquire()
    try:
        break_lock(url, storage_options, force=True)
        other = StoreLock(url, storage_options, heartbeat_s=60).acquire()  # somebody else takes it
        time.sleep(1.0)
        with pytest.raises(LockLostError, match="broken"):
            lock.check()
        assert other.read()["token"] == other.record["token"]  # the holder did not clobber it
        other.release()
    finally:
        lock.release()


def test_local_lock_leaves_no_folder_behind(tmp_path):
    url = str(tmp_path / "new.zarr")
    with StoreLock(url):
        assert os.path.exists(os.path.join(url, LOCK_NAME))
    assert not os.path.exists(url)  # nothing was written: nothing is left


_RACE = """
import sys, time
from sarcube.locking import StoreLock, LockHeldError
url = sys.argv[1]
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
try:
    with StoreLock(url, command="racer " + sys.argv[3]):
        with open(sys.argv[4], "a") as f:
            f.write(sys.argv[3] + " in\\n")
        time.sleep(0.5)
        with open(sys.argv[4], "a") as f:
            f.write(sys.argv[3] + " out\\n")
    print("won")
except LockHeldError as e:
    print("refused:", e)
"""


@pytest.mark.parametrize("trial", range(5))
def test_two_processes_one_lock(tmp_path, trial):
    """Real processes started for the same instant: exactly one enters; the other is refused."""
    url, log = str(tmp_path / "store"), str(tmp_path / "log.txt")
    start = time.time() + 1.5
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACE, url, str(start), name, log],
            stdout=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert sorted(o.split(":")[0].strip() for o in outs) == ["refused", "won"], outs
    lines = open(log).read().split()
    assert len(lines) == 4 and lines[1] == "in" and lines[3] == "out"  # one in/out pair


def test_server_ignoring_conditional_writes_is_refused(s3):
    """A server that ignores If-None-Match (emulated by dropping the header client-side, the
    server stays real) is detected: no lock is claimed on it, and nothing is left behind."""
    from sarcube.locking import LockUnsupportedError

    lock = StoreLock(s3.url("store"), s3.storage_options)
    real = lock.fs.pipe_file

    def without_condition(path, data, mode="overwrite", **kw):
        return real(path, data, **kw)

    lock.fs.pipe_file = without_condition
    with pytest.raises(LockUnsupportedError, match="ignores conditional writes"):
        lock.acquire()
    lock.fs.pipe_file = real
    assert StoreLock(s3.url("store"), s3.storage_options).read() is None
