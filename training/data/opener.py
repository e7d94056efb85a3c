"""Opening shards: a retrying fsspec reader, registered as WebDataset's ``gopen`` handler.

``register_fsspec_opener`` makes WebDataset's ``gopen`` open ``s3://`` (and every other fsspec
protocol it has no handler of its own for) through a ``RetryingReader``. Transient object-store
errors (connection refused/reset, timeouts, HTTP 5xx/429: ``training.data.errors.is_transient``)
are retried with exponential backoff (``retries``, ``backoff``): each read fetches one byte range
and a retry re-requests that range, so a shard resumes where it stopped. When the retries are
spent the reader raises ``TransientReadError``; the stream then skips the rest of that shard
within ``skip_errors`` (samples already emitted from it stay; the skip is logged and counted in
``io_counters`` and the quota is met by wrapping around) or raises ``ShardReadError``.

Per-process state: the registered settings (``_OPENERS``, by URL prefix), the fsspec filesystems
(``_FS_CACHE``, made lazily in the process that reads: s3fs is not fork-safe) and the counters
of retried and failed reads (``READ_COUNTERS``, reported in the stream's ``io_counters``).
"""

from __future__ import annotations

import importlib
import io
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec

from .errors import TransientReadError, is_transient

__all__ = [
    "MIB",
    "READ_COUNTERS",
    "RetryingReader",
    "ensure_fsspec_opener",
    "gopen_fsspec",
    "open_shard",
    "register_fsspec_opener",
]

log = logging.getLogger("training.data")

MIB = 2**20
# WebDataset's own handlers that stay in place (everything else fsspec knows goes through ours)
_NATIVE_SCHEMES = frozenset({"pipe", "http", "https", "ais", "sftp", "ftps", "scp", "htgs", "hf"})
_LOCAL_SCHEMES = frozenset({"", "file", "local"})


@dataclass(frozen=True)
class _OpenerConfig:
    """The opener settings registered for one URL prefix (see ``register_fsspec_opener``)."""

    storage_options: Mapping[str, Any] = field(default_factory=dict)
    retries: int = 3
    timeout: float = 60.0
    backoff: float = 0.5
    block_size: int = 8 * MIB


_OPENERS: dict[str, _OpenerConfig] = {}  # URL prefix -> config ("" matches every URL)
_FS_CACHE: dict[tuple, Any] = {}  # (pid, protocol, options) -> filesystem, created lazily
READ_COUNTERS = {"read_retries": 0, "failed_reads": 0}  # this process's opener counters


def register_fsspec_opener(
    storage_options: Mapping[str, Any] | None = None,
    retries: int = 3,
    timeout: float = 60.0,
    *,
    backoff: float = 0.5,
    block_size: int = 8 * MIB,
    prefix: str = "",
    protocols: Sequence[str] | None = None,
) -> None:
    """Make WebDataset's ``gopen`` open ``s3://`` (and every other fsspec protocol it has no
    handler of its own for: ``gs``, ``az``, ``memory`` …) through fsspec, with retries.

    Args:
        storage_options: fsspec options (for s3fs: key, secret, client_kwargs.endpoint_url …).
        retries: retries of one read after a transient error (so ``retries + 1`` attempts),
            sleeping ``backoff × 2**attempt`` seconds in between; then ``TransientReadError``.
        timeout: seconds; for S3, botocore's connect and read timeouts (unless the options set
            ``config_kwargs`` of their own; botocore's and s3fs's own retries are turned off, so
            that this opener is the one retry layer).
        backoff: first sleep in seconds.
        block_size: bytes fetched per ranged GET (the unit that is retried).
        prefix: the settings apply to URLs starting with it (longest prefix wins; "" = all).
        protocols: protocols to register (default: all fsspec protocols except local files and
            WebDataset's native http/https/pipe/… handlers).

    Filesystem objects are created lazily, in the process that reads (s3fs is not fork-safe):
    once per (process, protocol, options), so DataLoader workers each make their own.
    """
    wds_gopen = _wds_gopen()
    if retries < 0:
        raise ValueError(f"retries must be ≥ 0, got {retries}")
    if not timeout or timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    if block_size < 1:
        raise ValueError(f"block_size must be ≥ 1 byte, got {block_size}")
    _OPENERS[str(prefix)] = _OpenerConfig(
        dict(storage_options or {}), int(retries), float(timeout), float(backoff), int(block_size)
    )
    if protocols is None:
        protocols = [
            p
            for p in fsspec.available_protocols()
            if p not in _NATIVE_SCHEMES and p not in _LOCAL_SCHEMES
        ]
    for p in protocols:
        wds_gopen.gopen_schemes[p] = gopen_fsspec


def _wds_gopen():
    """The ``webdataset.gopen`` module (``webdataset.gopen`` the attribute is the function)."""
    return importlib.import_module("webdataset.gopen")


def _config_for(url: str) -> _OpenerConfig:
    best = None
    for prefix in _OPENERS:
        if url.startswith(prefix) and (best is None or len(prefix) > len(best)):
            best = prefix
    return _OPENERS[best] if best is not None else _OpenerConfig()


def _fs_options(protocol: str, cfg: _OpenerConfig) -> dict[str, Any]:
    opts = dict(cfg.storage_options)
    if protocol in ("s3", "s3a"):
        ck = dict(opts.get("config_kwargs") or {})
        ck.setdefault("connect_timeout", cfg.timeout)
        ck.setdefault("read_timeout", cfg.timeout)
        ck.setdefault("retries", {"total_max_attempts": 1})
        opts["config_kwargs"] = ck
    opts["skip_instance_cache"] = True
    return opts


def _filesystem(url: str, cfg: _OpenerConfig, fresh: bool = False):
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    key = (
        os.getpid(),
        protocol,
        json.dumps(cfg.storage_options, sort_keys=True, default=str),
        cfg.timeout,
    )
    fs = None if fresh else _FS_CACHE.get(key)
    if fs is None:
        fs = fsspec.filesystem(protocol, **_fs_options(protocol, cfg))
        if protocol in ("s3", "s3a"):
            fs.retries = 1  # s3fs's own retry loop: off (this module retries)
        _FS_CACHE[key] = fs
    return fs, fs._strip_protocol(url)


class RetryingReader(io.RawIOBase):
    """A read-only, sequential file over an fsspec URL: ranged GETs of ``block_size`` bytes, each
    retried on transient errors (so a stream survives a server restart mid-shard)."""

    def __init__(self, url: str, cfg: _OpenerConfig | None = None):
        super().__init__()
        self.url = url
        self.cfg = cfg or _config_for(url)
        self._fs, self._path = _filesystem(url, self.cfg)
        self.size = int(self._retry(lambda: self._fs.size(self._path), "size"))
        self.pos = 0
        self._buf = memoryview(b"")
        self._buf_start = 0

    def readable(self) -> bool:
        return True

    def _retry(self, fn, what: str):
        for attempt in range(self.cfg.retries + 1):
            try:
                return fn()
            except Exception as e:
                if not is_transient(e):
                    raise
                if attempt == self.cfg.retries:
                    READ_COUNTERS["failed_reads"] += 1
                    raise TransientReadError(
                        f"{self.url}: {what} failed after {attempt + 1} attempts "
                        f"({type(e).__name__}: {e})",
                        shard=self.url,
                    ) from e
                READ_COUNTERS["read_retries"] += 1
                wait = self.cfg.backoff * 2**attempt
                log.info(
                    "%s: %s: transient %s (%s); retry %d/%d in %.2f s",
                    self.url,
                    what,
                    type(e).__name__,
                    e,
                    attempt + 1,
                    self.cfg.retries,
                    wait,
                )
                time.sleep(wait)
                # a new filesystem (new connection pool) for the next attempt
                self._fs, self._path = _filesystem(self.url, self.cfg, fresh=True)
        raise AssertionError("unreachable")  # pragma: no cover

    def _fill(self) -> None:
        start, end = self.pos, min(self.pos + self.cfg.block_size, self.size)

        def get() -> bytes:
            data = self._fs.cat_file(self._path, start=start, end=end)
            if len(data) != end - start:
                raise ConnectionError(f"short read: {len(data)} of {end - start} bytes")
            return data

        self._buf = memoryview(self._retry(get, f"bytes {start}-{end - 1}"))
        self._buf_start = start

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.size - self.pos
        out = []
        while n > 0 and self.pos < self.size:
            off = self.pos - self._buf_start
            if not 0 <= off < len(self._buf):
                self._fill()
                off = 0
            chunk = self._buf[off : off + n]
            out.append(chunk.tobytes())
            self.pos += len(chunk)
            n -= len(chunk)
        return b"".join(out)

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self.pos


def gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw) -> RetryingReader:
    """WebDataset ``gopen`` handler: a ``RetryingReader`` with the settings registered for
    ``url``."""
    if mode != "rb":
        raise ValueError(f"{url}: the fsspec opener reads only (mode 'rb'), got {mode!r}")
    return RetryingReader(url)


def ensure_fsspec_opener(settings: Mapping[str, Any]) -> None:
    """Register ``settings`` (``register_fsspec_opener`` keywords, ``prefix`` included) unless
    this process already has them: a spawned DataLoader worker process starts without."""
    cfg = _OPENERS.get(settings["prefix"])
    if cfg is None or cfg.storage_options != settings["storage_options"]:
        register_fsspec_opener(**settings)


def open_shard(url: str):
    """A binary file object over shard ``url``: a local file directly (a 1 MiB buffer: fewer
    syscalls), anything else through WebDataset's ``gopen`` (``gopen_fsspec`` for the fsspec
    protocols registered here).

    Raises:
        FileNotFoundError: the shard does not exist.
    """
    if "://" not in url or url.startswith("file://"):
        return open(url.removeprefix("file://"), "rb", buffering=MIB)
    return _wds_gopen().gopen(url, "rb")
