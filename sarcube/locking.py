"""One writer at a time: a lock object inside the store a run writes (cube, shard prefix,
prediction store, run folder), on local disk and on S3.

Why hand-written: the lock must live *in the store itself* so that every writer, whatever host
it runs on, meets it — a file lock (``fcntl``, ``filelock``) works on one machine only, and no
maintained library offers a lease over S3 conditional writes.

The lock is one small JSON object, ``<store>/.sarcube-lock.json``::

    {"token": "<uuid>", "command": "sarcube ingest", "user": ..., "host": ..., "pid": ...,
     "started": "<UTC ISO time>", "heartbeat": "<UTC ISO time>"}

- **acquire**: atomic create-if-absent — a hard link of the written record locally (``O_EXCL``
  semantics, never visible half-written), a ``PutObject`` with
  ``If-None-Match: *`` on S3 (the server refuses it with 412 when the object exists). The loser
  fails at once with one line naming the holder and its age, or polls for ``wait`` seconds.
- **heartbeat**: a daemon thread rewrites ``heartbeat`` every ``heartbeat_s`` seconds; on S3 with
  ``If-Match: <etag>`` so a lock that someone broke is never silently re-taken (the holder then
  learns it lost the lock and its next ``check()`` raises before a commit point).
- **dead holder**: a lock whose holder ran on this host and whose process is gone (a killed
  run) is broken at once, with a warning: that is how a re-run after SIGKILL proceeds.
- **stale**: no heartbeat for ``stale_after_s`` seconds (default 120, ``SARCUBE_LOCK_STALE_AFTER``)
  means its holder died. A stale lock is broken only when asked (``break_stale=True``, the
  commands' ``--break-stale-lock``, or ``sarcube unlock URL``); never implicitly, because a clock
  skew or a paused VM could make a live holder look dead.
- **release**: deletes the object (S3: ``If-Match`` its last ETag; locally: after checking the
  token), so a run never removes somebody else's lock.

Readers never take the lock: every write below it is itself atomic and committed last
(registry switch, manifest), so a reader sees the previous or the next state, never half of one.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

from .errors import SarcubeError
from .storage import is_local_fs, join_url, url_to_fs

log = logging.getLogger("sarcube.locking")

LOCK_NAME = ".sarcube-lock.json"
HEARTBEAT_S = 10.0
STALE_AFTER_S = 120.0
POLL_S = 1.0


class LockHeldError(SarcubeError):
    """Another writer holds the store's lock."""


class LockUnsupportedError(SarcubeError):
    """The object store cannot do the atomic create-if-absent a lock needs."""


class LockLostError(SarcubeError):
    """This run's lock was broken or replaced while it ran; it must not commit."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _iso(t: dt.datetime) -> str:
    return t.isoformat(timespec="seconds")


def _age_s(record: Mapping[str, Any], key: str = "heartbeat") -> float:
    try:
        return (_now() - dt.datetime.fromisoformat(record[key])).total_seconds()
    except (KeyError, TypeError, ValueError):
        return float("inf")  # unreadable: as old as can be


def _fmt_age(seconds: float) -> str:
    if seconds == float("inf"):
        return "unknown"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def stale_after_default() -> float:
    try:
        return float(os.environ.get("SARCUBE_LOCK_STALE_AFTER", STALE_AFTER_S))
    except ValueError:
        return STALE_AFTER_S


def describe(record: Mapping[str, Any]) -> str:
    """'sarcube ingest (pid 12, user@host), started 3 min ago, last heartbeat 4 s ago'."""
    return (
        f"{record.get('command', '?')} (pid {record.get('pid', '?')}, "
        f"{record.get('user', '?')}@{record.get('host', '?')}), "
        f"started {_fmt_age(_age_s(record, 'started'))} ago, "
        f"last heartbeat {_fmt_age(_age_s(record))} ago"
    )


class StoreLock:
    """The single-writer lock of one store. Use as a context manager::

        with StoreLock(cube_url, so, command="sarcube ingest", wait=0):
            ...  # write; call lock.check() before each commit point

    Args:
        url: the store's URL (local path or ``s3://bucket/prefix``); the lock is
            ``<url>/.sarcube-lock.json``.
        storage_options: fsspec options for ``url``.
        command: what holds the lock, shown to the writers it turns away.
        wait: seconds to wait for a held lock before giving up (0: fail at once).
        stale_after_s: heartbeat age (s) after which the holder is presumed dead.
        break_stale: break a stale lock instead of failing.
        heartbeat_s: seconds between heartbeats.
    Raises:
        LockHeldError: (on enter) the lock is held and was not released within ``wait`` s.
    """

    def __init__(
        self,
        url: str,
        storage_options: Mapping[str, Any] | None = None,
        command: str = "sarcube",
        wait: float = 0.0,
        stale_after_s: float | None = None,
        break_stale: bool = False,
        heartbeat_s: float = HEARTBEAT_S,
    ):
        self.url = str(url)
        self.lock_url = join_url(self.url, LOCK_NAME)
        self.fs, self.path = url_to_fs(self.lock_url, storage_options)
        self.local = is_local_fs(self.fs)
        self.command = command
        self.wait = max(float(wait or 0.0), 0.0)
        self.stale_after_s = stale_after_default() if stale_after_s is None else stale_after_s
        self.break_stale = break_stale
        self.heartbeat_s = heartbeat_s
        self.record: dict[str, Any] = {}
        self.created_dir = False  # local: the store's folder did not exist before the lock
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: str | None = None
        self._io = threading.Lock()

    # -- the store's object, local or S3 -------------------------------------------------------

    def _create(self, data: bytes) -> bool:
        """Create the lock object if absent; False when it exists."""
        if self.local:
            directory = os.path.dirname(self.path)
            if not os.path.isdir(directory):
                os.makedirs(directory, exist_ok=True)
                self.created_dir = True
            # Written whole to a private file, then hard-linked into place: link() creates the
            # name only if it is absent (like O_EXCL) and a reader never sees a half-written
            # record (an O_EXCL file is visible empty until its bytes land).
            tmp = f"{self.path}.{uuid.uuid4().hex}.partial"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
            return True
        try:
            out = self.fs.pipe_file(self.path, data, mode="create")
        except FileExistsError:
            return False
        self._etag = (out or {}).get("ETag")
        self._check_conditional_writes(data)
        return True

    def _check_conditional_writes(self, data: bytes) -> None:
        """Prove the server honours ``If-None-Match: *``: a second create of the object we just
        wrote must be refused. (Some S3-compatible servers ignore the header; on those two
        writers would both "acquire" the lock.) The probe writes the same bytes, so even a
        server that accepts it changes nothing but the ETag."""
        try:
            out = self.fs.pipe_file(self.path, data, mode="create")
        except FileExistsError:
            return
        self._etag = (out or {}).get("ETag", self._etag)
        self.release()
        raise LockUnsupportedError(
            f"{self.url}: this S3 server ignores conditional writes (If-None-Match: *), so it "
            "cannot hold a write lock; use a server that supports them (AWS S3 does) "
            "or run one writer at a time yourself"
        )

    def read(self) -> dict[str, Any] | None:
        """The lock record now in the store (None: no lock)."""
        try:
            if self.local:
                with open(self.path, "rb") as f:
                    raw = f.read()
            else:
                raw = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        try:
            rec = json.loads(raw)
            return rec if isinstance(rec, dict) else {"unreadable": True}
        except ValueError:
            return {"unreadable": True}

    def _etag_now(self) -> str | None:
        info = self.fs.info(self.path, refresh=True)
        return info.get("ETag")

    def _delete(self, etag: str | None = None) -> None:
        if self.local:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            return
        bucket, key, _ = self.fs.split_path(self.path)
        kwargs = {"IfMatch": etag} if etag else {}
        self.fs.call_s3("delete_object", Bucket=bucket, Key=key, **kwargs)
        self.fs.invalidate_cache(self.path)

    def _write_heartbeat(self) -> None:
        """Rewrite our record with a fresh heartbeat, only if the lock is still ours."""
        with self._io:
            self.record["heartbeat"] = _iso(_now())
            data = json.dumps(self.record).encode()
            if self.local:
                current = self.read()
                if not current or current.get("token") != self.record["token"]:
                    raise LockLostError(self._lost_message(current))
                tmp = f"{self.path}.{self.record['token']}.partial"
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, self.path)
                return
            try:
                out = self.fs.pipe_file(self.path, data, IfMatch=self._etag)
            except (OSError, FileNotFoundError):
                current = self.read()
                raise LockLostError(self._lost_message(current)) from None
            self._etag = (out or {}).get("ETag", self._etag)

    def _lost_message(self, current: Mapping[str, Any] | None) -> str:
        now = "no lock" if not current else f"now held by {describe(current)}"
        return (
            f"{self.url}: this run's write lock was broken while it ran ({now}); "
            "nothing more is committed"
        )

    # -- protocol ------------------------------------------------------------------------------

    def acquire(self) -> StoreLock:
        deadline = time.monotonic() + self.wait
        started = _iso(_now())
        self.record = {
            "token": uuid.uuid4().hex,
            "command": self.command,
            "user": _user(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": started,
            "heartbeat": started,
        }
        while True:
            if self._create(json.dumps(self.record).encode()):
                break
            holder = self.read()
            if holder is None:  # released between our create and read: try again now
                continue
            age = _age_s(holder)
            if _dead_here(holder):
                log.warning(
                    "%s: breaking the lock of %s: that process no longer runs on this host",
                    self.url,
                    describe(holder),
                )
                self._break_if_unchanged(holder)
                continue
            if self.break_stale and age > self.stale_after_s:
                log.warning("%s: breaking a stale lock held by %s", self.url, describe(holder))
                self._break_if_unchanged(holder)
                continue
            if time.monotonic() >= deadline:
                hint = (
                    f"; it looks stale (no heartbeat for > {self.stale_after_s:.0f} s): if that "
                    "process is dead, re-run with --break-stale-lock or "
                    f"`sarcube unlock {self.url}`"
                    if age > self.stale_after_s
                    else "; wait for it to finish (--wait SECONDS) or stop it"
                )
                raise LockHeldError(
                    f"{self.url}: locked by another writer: {describe(holder)}{hint}"
                )
            time.sleep(min(POLL_S, max(deadline - time.monotonic(), 0.05)))
        self._thread = threading.Thread(
            target=self._beat, name="sarcube-lock-heartbeat", daemon=True
        )
        self._thread.start()
        return self

    def _break_if_unchanged(self, holder: Mapping[str, Any]) -> None:
        """Delete the lock only if it still is ``holder`` (not a fresh one taken meanwhile)."""
        if self.local:
            current = self.read()
            if current and current.get("token") == holder.get("token"):
                self._delete()
            return
        try:
            etag = self._etag_now()
            current = self.read()
            if current and current.get("token") == holder.get("token"):
                self._delete(etag)
        except (FileNotFoundError, OSError):
            pass  # gone or changed meanwhile: the next create attempt decides

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._write_heartbeat()
            except LockLostError as e:
                self._lost = str(e)
                log.error("%s", e)
                return
            except Exception as e:  # a transient storage error: try again next beat
                log.warning("%s: lock heartbeat failed (%s); retrying", self.url, e)

    def check(self) -> None:
        """Raise LockLostError if the lock was broken; call before every commit point."""
        if self._lost:
            raise LockLostError(self._lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._lost:
            return
        with self._io:
            try:
                current = self.read()
                if current and current.get("token") == self.record.get("token"):
                    self._delete(None if self.local else self._etag)
            except (FileNotFoundError, OSError) as e:
                log.warning("%s: could not remove the write lock (%s)", self.url, e)
        if self.local and self.created_dir:
            try:
                os.rmdir(os.path.dirname(self.path))  # only if empty: nothing else was written
            except OSError:
                pass

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _dead_here(holder: Mapping[str, Any]) -> bool:
    """The holder ran on this host and its process is gone (killed, crashed): safe to break.

    Holders on other hosts can only be judged by their heartbeat (``stale_after_s``)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    try:  # a zombie (exited, not yet reaped) is dead too
        with open(f"/proc/{holder['pid']}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return False


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry (containers)
        return str(os.getuid())


def break_lock(
    url: str,
    storage_options: Mapping[str, Any] | None = None,
    force: bool = False,
    stale_after_s: float | None = None,
) -> str:
    """Remove the lock of the store at ``url`` (``sarcube unlock``); returns what was removed.

    Refuses a lock whose heartbeat is fresh unless ``force`` (its holder is probably alive).
    """
    lock = StoreLock(url, storage_options, stale_after_s=stale_after_s)
    holder = lock.read()
    if holder is None:
        return f"{url}: not locked"
    if not force and _age_s(holder) <= lock.stale_after_s:
        raise LockHeldError(
            f"{url}: the lock is live ({describe(holder)}); refusing to break it without --force"
        )
    lock._break_if_unchanged(holder)
    return f"{url}: removed the lock of {describe(holder)}"
