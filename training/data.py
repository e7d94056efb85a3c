"""Streaming training batches from sarcube's WebDataset shards (docs/design.md).

``ShardStream(manifest_url, split, batch_size=..., rank=..., world_size=..., num_workers=...)``
reads the shards a ``manifest.json`` lists for one split (nothing else: the manifest is the commit
point), through WebDataset's tar iterators and, for object stores, an fsspec-backed ``gopen``
handler with retries (``register_fsspec_opener``). It yields batch dicts::

    image   (B, 1, P, P) float32   z-scored dB: (x - mean) / std, no-data filled with the mean (0)
    weight  (B, 1, P, P) float32   sar_intensity_weight of the augmented dB (or of ``image`` when
                                   weight_domain="normalized"), no-data pixels as filled
                                   (computed by ``intensity_weight``: the same formula, equal
                                   within float32 rounding, ~3× faster on CPU)
    valid   (B, 1, P, P) bool      finite SAR pixel (False: no data in the shard, filled above)
    label   (B, P, P)    int64     task "lulc": 9-class ids (nine_class_lut), "water": 0/1;
                                   255 = ignore (JAXA code 0 or no SAR data); absent for "pretrain"
    key     list[str]              patch ids (the samples' ``__key__``)

With ``prepare="device"`` (what training uses) the loader processes stop after decoding and
augmenting and ship a compact batch, a third of the bytes::

    sar     (B, 1, P, P) float16   augmented dB, NaN = no data
    label   (B, P, P)    uint8     task classes (before the no-data → 255 step)
    key     list[str]

and ``ShardStream.finish(batch, device)`` makes the batch above on the device (the training
engine calls it; on a GPU the weight map then costs the loaders nothing). Both paths run the
same ``finish`` code, so their batches are identical on CPU.

Statistics: ``task="pretrain"`` z-scores with the manifest's ``pretrain`` split ``db_stats``;
the fine-tuning tasks use the ``train`` split's statistics for train, val and test alike
(``stats_split`` overrides).

Epoch plan (a pure function of the manifest, ``seed``, ``epoch``, ``world_size``, ``num_workers``):

1. The split's shards are permuted by a generator seeded with ``(seed, epoch)`` — the same on
   every rank.
2. Rank ``r`` takes ``perm[r::world_size]``; within the rank, logical loader worker ``w`` takes
   ``rank_shards[w::W]`` (``W = max(num_workers, 1)``). With fewer shards than slots (avoid it:
   write ≥ 4 × ranks × workers shards; a warning is logged) a rank left empty takes
   ``perm[r mod N]`` and a worker left empty ``rank_shards[w mod n]``: shared shards.
3. ``steps_per_epoch = floor(split samples / (world_size × batch_size))``, identical on every rank
   (≥ 1, else ``ValueError``). Global step ``i`` of a rank comes from logical worker ``i mod W``,
   which is exactly how ``torch.utils.data.DataLoader`` interleaves the batches of its worker
   processes (round-robin, in order); worker ``w``'s quota is the number of such steps,
   ``ceil((steps - w) / W)``. ``batches()`` runs the W logical workers in-process in the same
   interleaving, so it yields the same sequence as ``loader()``; the sequence depends on
   ``(seed, epoch, num_workers)``, not on timing.
4. A worker streams its shard list in order, one *pass* at a time, each pass through a shuffle
   buffer of ``shuffle_buffer`` raw (undecoded) samples whose generator is seeded with
   ``(seed, epoch, rank, worker)``; the buffer is drained at the end of a pass, so a pass emits
   every sample of the worker's shards exactly once before anything repeats.
   **Remainder policy:** a worker whose pass runs short of its quota *wraps around* to the start
   of its own shard list (pass 2, 3, …: same shards, same order, the shuffle generator continuing),
   and it stops exactly at its quota. Samples beyond the quota are left out of this epoch; the
   next epoch's permutation leaves out others. So every rank runs exactly ``steps_per_epoch``
   steps (no DDP hang), and when every worker's quota covers its shards, the union over ranks is
   the whole split (some samples then appear twice in the epoch).
5. Augmentation (``augment=True``): ``rot90`` by ``k`` ∈ {0..3}, then a horizontal flip, then a
   vertical flip, applied jointly to SAR and labels, drawn from a hash of
   ``(seed, epoch, sample key)`` (``augmentation()``): independent of worker count and of
   position; a sample that appears twice in an epoch gets the same transform.
   The weight map is computed after augmentation from the un-normalised dB (see
   ``training.sar_weight``).

Mid-epoch resume: a checkpoint needs only ``(epoch, next step)`` (and the constructor arguments);
``batches(epoch, start_step=k)`` (or ``loader(epoch, k)``) yields exactly the batches
``k, k+1, …`` of the uninterrupted sequence. Each logical worker ``w`` starts at its local
step ``ceil((k - w) / W)``; it re-reads its shard stream from the start of the epoch and passes
the first ``local_step × batch_size`` samples through the shuffle buffer *undecoded* (no npy
decode, augmentation or weight), then decodes from there. Cost: the I/O of the skipped part
of the epoch (up to one epoch of the rank's shards) plus tar parsing; no GPU time is lost. With
``num_workers > 0`` the DataLoader worker process ``d`` plays logical worker ``(d + k) mod W`` so
that the first batch (step ``k``) comes from the right one.

Verified reads: every shard is checked against its manifest entry (``name``, ``samples``,
``bytes``, ``sha256``) while it streams, with no extra pass over the data: the tar iterator reads
through a ``VerifyingReader`` that counts and sha256-hashes the bytes (``verify=False``: no hash;
~1 GB/s of one core otherwise), and at the end of the tar the rest of the file (padding, or
everything after a header the parser could not read) is read too, so a corrupt header in the
middle, a flipped payload byte, a truncated or replaced file or a wrong sample count are all
found. The byte size is also checked up front when the opener knows it (local files, fsspec).
Samples are emitted while the shard streams, before its hash is known; each is held back until
the next one is parsed, so the shard's last sample (the one a truncation cuts) only comes after
the verification. A mismatch is a ``ShardIntegrityError`` naming the shard, or, within
``max_bad_shards`` (a budget per logical worker per epoch, like ``skip_errors``), a skip that is
logged (ERROR) and counted in ``stats`` (``shards_bad``, ``bad_urls``); the skipped shard is
not read again in that epoch and the quota is met by wrapping around. Samples the bad shard gave
before the end of its tar were already used (shards are not buffered: they are 256 MB);
``iter_samples(verify=True)`` or ``sarcube shards`` re-run find such a shard ahead of training.
Evaluation (``eval_batches``) never skips: every sample of the split or an error. Fast-forwarded
samples (mid-epoch resume) are read and hashed like the others; a shard a worker leaves mid-way
(its quota met) is not verified in that epoch.

Decoding: ``np.load(io.BytesIO(b), allow_pickle=False)`` (``load_npy``: repeated, byte-identical
headers are parsed once). Malformed input (every ``DataError`` is a ``SarcubeError``: the
command line prints it as one line, exit status 2; errors in DataLoader worker processes reach
the main process as themselves):

- ``SampleError``: a malformed sample (undecodable npy, wrong shape or dtype, no ``sar.npy``,
  or no ``lulc.npy`` for a fine-tuning task), naming the sample key and the shard URL.
- ``ShardReadError``: a shard that cannot be read (absent, not a tar, or a transient error that
  outlasted the opener's retries while ``skip_errors`` is spent), naming the shard URL;
  ``ShardIntegrityError`` (a subclass): its bytes differ from the manifest (see above).
- Transient object-store errors (connection refused/reset, timeouts, HTTP 5xx/429) are retried by
  the opener with exponential backoff (``retries``, ``backoff``): each read fetches one byte range
  and a retry re-requests that range, so a shard resumes where it stopped. When the retries are
  spent and ``skip_errors > 0``, the rest of that shard is skipped (samples already emitted from
  it stay), the skip is logged and counted in ``stats`` and the quota is met by wrapping around.
  ``skip_errors`` is a budget per logical worker per epoch (with ``num_workers = 0``: per rank).

``stats`` (cumulative over the object's life, merged from the workers with every batch; the
training engine writes them into each epoch's ``metrics.jsonl`` record and the rank summaries
as ``loader``): ``shards_read`` (shards streamed to their end and verified),
``shards_skipped`` and ``skipped_urls`` (transient failures), ``shards_bad`` and ``bad_urls``
(bad shards skipped under ``max_bad_shards``), ``read_retries`` (transient errors retried by
the opener), ``failed_reads`` (reads that failed after all retries), ``samples_decoded``,
``samples_fast_forwarded`` (skipped for a resume) and ``wraps`` (passes started after a
worker's first one).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import importlib
import io
import json
import logging
import math
import os
import socket
import stat
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sarcube.classes import IGNORE_INDEX, nine_class_lut, water_lut
from sarcube.errors import SarcubeError
from sarcube.shards import read_manifest, shard_urls

from .sar_weight import WEIGHT_DOMAINS

__all__ = [
    "PREPARE",
    "TASKS",
    "DataError",
    "SampleError",
    "ShardIntegrityError",
    "ShardReadError",
    "ShardStream",
    "TransientReadError",
    "apply_augmentation",
    "augmentation",
    "intensity_weight",
    "is_transient",
    "load_npy",
    "register_fsspec_opener",
]

log = logging.getLogger("training.data")

TASKS = ("pretrain", "lulc", "water")
PREPARE = ("worker", "device")  # where the z-score, weight map and int64 labels are made
MIB = 2**20
# WebDataset's own handlers that stay in place (everything else fsspec knows goes through ours)
_NATIVE_SCHEMES = frozenset({"pipe", "http", "https", "ais", "sftp", "ftps", "scp", "htgs", "hf"})
_LOCAL_SCHEMES = frozenset({"", "file", "local"})
_TAG_SHARDS, _TAG_SHUFFLE = 0x5A4D, 0x5B0F  # separate generator streams for the two draws
_CHUNK = 8  # samples per element-wise pass in collate (8 × 256² float32 = 2 MiB)
_STAT_KEYS = (
    "shards_read",
    "shards_skipped",
    "shards_bad",
    "read_retries",
    "failed_reads",
    "samples_decoded",
    "samples_fast_forwarded",
    "wraps",
)
_STAT_LISTS = ("skipped_urls", "bad_urls")
_ERROR = "_data_error"  # a batch dict carrying a worker's DataError


# ---------------------------------------------------------------------------------------------
# Errors


class DataError(SarcubeError):
    """A training-data problem; ``str()`` is the message (WebDataset appends to ``args``).

    A ``SarcubeError``: the command line prints it as one line and exits with status 2."""

    def __init__(self, message: str, *, key: str | None = None, shard: str | None = None):
        super().__init__(message)
        self.message = message
        self.key = key
        self.shard = shard

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # pickles across DataLoader workers whatever was appended to args
        return (type(self), (self.message,), {"key": self.key, "shard": self.shard})


class SampleError(DataError):
    """A malformed sample in a shard (names the sample key and the shard URL)."""


class ShardReadError(DataError):
    """A shard that could not be read (names the shard URL)."""


class ShardIntegrityError(ShardReadError):
    """A shard whose bytes differ from its manifest entry: sha256, byte size or sample count
    (a damaged, truncated or replaced file; names the shard URL)."""


class TransientReadError(DataError):
    """A transient storage error that outlasted the opener's retries."""


# ---------------------------------------------------------------------------------------------
# The fsspec opener for WebDataset


_TRANSIENT_ERRNOS = frozenset(
    {
        errno.ECONNRESET,
        errno.ECONNREFUSED,
        errno.ECONNABORTED,
        errno.ETIMEDOUT,
        errno.EPIPE,
        errno.EBUSY,
        errno.EAGAIN,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.EHOSTDOWN,
    }
)


def _third_party_transient() -> tuple[type[BaseException], ...]:
    out: list[type[BaseException]] = []
    try:
        from botocore import exceptions as bx

        out += [
            bx.ConnectionError,
            bx.HTTPClientError,
            bx.ConnectTimeoutError,
            bx.ReadTimeoutError,
            getattr(bx, "ResponseStreamingError", bx.HTTPClientError),
            getattr(bx, "IncompleteReadError", bx.HTTPClientError),
        ]
    except ImportError:  # pragma: no cover - s3fs brings botocore
        pass
    try:
        import aiohttp

        out += [
            aiohttp.ClientConnectionError,
            aiohttp.ClientPayloadError,
            aiohttp.ServerTimeoutError,
        ]
    except ImportError:  # pragma: no cover
        pass
    import http.client

    out += [http.client.IncompleteRead, http.client.RemoteDisconnected]
    return tuple(out)


_TRANSIENT_TYPES = (
    ConnectionError,
    TimeoutError,
    asyncio.TimeoutError,
    socket.timeout,
    *_third_party_transient(),
)


def _http_status(exc: BaseException) -> int | None:
    resp = getattr(exc, "response", None)
    if isinstance(resp, Mapping):
        code = (resp.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        if isinstance(code, int):
            return code
    for attr in ("status", "status_code", "code"):
        v = getattr(exc, attr, None)
        if isinstance(v, int) and 100 <= v < 600:
            return v
    return None


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: connection refused/reset/closed, timeouts, HTTP 5xx or 429
    (anywhere in the ``__cause__``/``__context__`` chain); False for missing objects, denied
    access and everything else."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, DataError):
            return False  # already the verdict of a retry loop
        if isinstance(
            e, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError
        ):
            return False
        if isinstance(e, _TRANSIENT_TYPES):
            return True
        status = _http_status(e)
        if status is not None and (status >= 500 or status == 429):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
        e = e.__cause__ or e.__context__
    return False


@dataclass(frozen=True)
class _OpenerConfig:
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    retries: int = 3
    timeout: float = 60.0
    backoff: float = 0.5
    block_size: int = 8 * MIB


_OPENERS: dict[str, _OpenerConfig] = {}  # URL prefix -> config ("" matches every URL)
_FS_CACHE: dict[tuple, Any] = {}  # (pid, protocol, options) -> filesystem, created lazily
_COUNTERS = {"read_retries": 0, "failed_reads": 0}  # this process's opener counters


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
                    _COUNTERS["failed_reads"] += 1
                    raise TransientReadError(
                        f"{self.url}: {what} failed after {attempt + 1} attempts "
                        f"({type(e).__name__}: {e})",
                        shard=self.url,
                    ) from e
                _COUNTERS["read_retries"] += 1
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


# ---------------------------------------------------------------------------------------------
# Verified reads


class VerifyingReader(io.RawIOBase):
    """A sequential reader over ``raw`` that counts and (``hash=True``) sha256-hashes every byte
    read through it: the tar iterator reads the shard anyway, so its hash costs one pass of
    ``hashlib`` (~1 GB/s) over bytes already in memory. ``raw`` is read ``block`` bytes at a time
    (hashed in one call each; the tar parser asks for 10 KiB records). ``finish()`` reads what
    the tar parser left (the end-of-archive padding, or everything after a header it could not
    parse) and returns ``(bytes, sha256 hex or None)`` of the whole file."""

    def __init__(self, raw, url: str, hash: bool = True, block: int = MIB) -> None:
        super().__init__()
        self.raw, self.url, self.block = raw, url, int(block)
        self._sha = hashlib.sha256() if hash else None
        self.nbytes = 0
        self._buf = b""
        self._pos = 0

    def readable(self) -> bool:
        return True

    def _next_block(self, n: int) -> bytes:
        data = self.raw.read(n)
        if self._sha is not None:
            self._sha.update(data)
        self.nbytes += len(data)
        return data

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0:  # everything left
            out = self._buf[self._pos :] + self._next_block(-1)
            self._buf, self._pos = b"", 0
            return out
        if self._pos >= len(self._buf):
            self._buf, self._pos = self._next_block(max(n, self.block)), 0
        out = self._buf[self._pos : self._pos + n]  # may be short at a block's end
        self._pos += len(out)
        return out

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def finish(self) -> tuple[int, str | None]:
        self._buf, self._pos = b"", 0
        while self._next_block(self.block):
            pass
        return self.nbytes, None if self._sha is None else self._sha.hexdigest()

    def close(self) -> None:
        try:
            self.raw.close()
        finally:
            super().close()

    def __repr__(self) -> str:  # WebDataset appends the stream to error messages
        return f"<shard {self.url}>"


def _known_size(raw) -> int | None:
    """The byte size of an opened shard when it costs nothing to know (local file, fsspec)."""
    size = getattr(raw, "size", None)
    if isinstance(size, int):
        return size
    try:
        st = os.fstat(raw.fileno())
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None  # not a pipe's 0


def shard_mismatch(
    entry: Mapping[str, Any] | None,
    *,
    samples: int | None = None,
    nbytes: int | None = None,
    sha256: str | None = None,
) -> str | None:
    """What differs between a shard as read and its manifest entry (None: nothing)."""
    if not entry:
        return None
    out = []
    if samples is not None and "samples" in entry and samples != int(entry["samples"]):
        out.append(f"{samples} samples, the manifest lists {int(entry['samples'])}")
    if nbytes is not None and "bytes" in entry and nbytes != int(entry["bytes"]):
        out.append(f"{nbytes} bytes, the manifest lists {int(entry['bytes'])}")
    if sha256 is not None and entry.get("sha256") and sha256 != entry["sha256"]:
        out.append(f"sha256 {sha256[:12]}…, the manifest lists {str(entry['sha256'])[:12]}…")
    return "; ".join(out) or None


# ---------------------------------------------------------------------------------------------
# Decoding .npy members

_NPY_MAGIC = b"\x93NUMPY"
_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], int]] = {}  # header -> parsed


def load_npy(data: bytes) -> np.ndarray:
    """``np.load(io.BytesIO(data), allow_pickle=False)``, faster for repeated headers.

    Every distinct header goes through ``np.load``; when it yields a C-ordered, non-object array
    whose payload fills the rest of ``data``, the header bytes are remembered, and later members
    with a byte-identical header and the same payload size are read with ``np.frombuffer``
    (read-only, no copy, no header parse: ~0.2 ms saved per 256² member). Anything else — a new
    header, a size mismatch, a truncated or foreign payload — goes to ``np.load``, whose errors
    and pickle refusal are unchanged."""
    off = -1
    if data[:6] == _NPY_MAGIC and len(data) >= 12:
        end = 10 if data[6] == 1 else 12  # header length: uint16 (v1) or uint32 (v2, v3)
        off = end + int.from_bytes(data[8:end], "little")
        hit = _NPY_HEADERS.get(data[:off])
        if hit is not None and len(data) - off == hit[2]:
            return np.frombuffer(data, dtype=hit[0], offset=off).reshape(hit[1])
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    if (
        off > 0
        and isinstance(arr, np.ndarray)
        and not arr.dtype.hasobject
        and arr.flags.c_contiguous
        and len(data) - off == arr.nbytes
        and len(_NPY_HEADERS) < 256
    ):
        _NPY_HEADERS[data[:off]] = (arr.dtype, arr.shape, arr.nbytes)
    return arr


# ---------------------------------------------------------------------------------------------
# Augmentation


def augmentation(seed: int, epoch: int, key: str) -> tuple[int, bool, bool]:
    """``(k, flip_h, flip_v)`` for one sample: ``rot90`` by ``k`` quarter turns, then a left-right
    flip, then an up-down flip; from a hash of ``(seed, epoch, key)`` (worker-count independent)."""
    d = hashlib.blake2b(f"{int(seed)}:{int(epoch)}:{key}".encode(), digest_size=8).digest()
    return d[0] & 3, bool(d[1] & 1), bool(d[2] & 1)


def apply_augmentation(a: np.ndarray, k: int, flip_h: bool, flip_v: bool) -> np.ndarray:
    """Apply ``augmentation()``'s transform to the last two axes of ``a`` (a view, no copy)."""
    a = np.rot90(a, k, axes=(-2, -1))
    if flip_h:
        a = a[..., :, ::-1]
    if flip_v:
        a = a[..., ::-1, :]
    return a


# ---------------------------------------------------------------------------------------------
# The SAR intensity weight, fast

_LN10_OVER_10 = float(np.log(10.0) / 10.0)


def intensity_weight(
    v: torch.Tensor, k: float = 1.0, eps: float = 1e-6, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``training.sar_weight.sar_intensity_weight(v, k)`` for finite float32 ``(..., H, W)``,
    equal to it within float32 rounding but about 3× faster on CPU: ``10^(v/10)`` is evaluated
    as ``exp(v · ln10/10)`` (torch's ``pow`` with a scalar base is slow) and the rest in place
    (in ``out`` when given). Used in the loader, where every sample's weight is computed; the
    tests compare the two.
    """
    p = torch.mul(v, _LN10_OVER_10, out=out).exp_()  # (..., H, W) linear power
    p_min = p.amin(dim=(-2, -1), keepdim=True)
    p_max = p.amax(dim=(-2, -1), keepdim=True)
    p.sub_(p_min).div_(p_max - p_min + eps)  # n in [0, 1)
    return p.neg_().add_(1.0).mul_(k).exp_()  # exp(k (1 - n))


def _empty(shape: tuple[int, ...], dtype: torch.dtype, shared: bool) -> torch.Tensor:
    """An uninitialised tensor; in shared memory when ``shared`` (a DataLoader worker: the batch
    then crosses to the main process without the copy torch makes of non-shared tensors, the
    way ``default_collate`` allocates its output in workers)."""
    if shared:
        try:
            numel = math.prod(shape)
            storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(numel)
            return torch.empty(0, dtype=dtype).new(storage).view(shape)
        except (AttributeError, RuntimeError):  # private API moved: the copy it is
            pass
    return torch.empty(shape, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# The stream


def _empty_stats() -> dict[str, Any]:
    return {**dict.fromkeys(_STAT_KEYS, 0), **{k: [] for k in _STAT_LISTS}}


def _merge_stats(base: Mapping[str, Any], parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {k: base.get(k, 0) + sum(p.get(k, 0) for p in parts) for k in _STAT_KEYS}
    for k in _STAT_LISTS:
        out[k] = list(base.get(k, [])) + [u for p in parts for u in p.get(k, [])]
    return out


class _Bad(Exception):
    """Internal: the shard being read is bad (message: what is wrong)."""

    def __init__(self, what: str, integrity: bool = True) -> None:
        super().__init__(what)
        self.integrity = integrity


class _WorkerState:
    """Counters of one logical worker in one epoch; with ``opener`` also the opener's counters of
    this process (deltas), which only one logical worker per process may report."""

    def __init__(self, opener: bool = True) -> None:
        self.counts = _empty_stats()
        self.bad: set[str] = set()  # shards found bad (and skipped) this epoch: not read again
        self._opener0 = dict(_COUNTERS) if opener else None

    def snapshot(self) -> dict[str, Any]:
        snap = dict(self.counts)
        for k in _STAT_LISTS:
            snap[k] = list(self.counts[k])
        if self._opener0 is not None:
            for k in _COUNTERS:
                snap[k] = _COUNTERS[k] - self._opener0[k]
        return snap


class ShardStream:
    """Deterministic, rank- and worker-split batches from a split's shards (see the module doc).

    Args:
        manifest_url: ``manifest.json`` (or its directory), local or any fsspec URL.
        split: ``pretrain``, ``train``, ``val`` or ``test``.
        batch_size: samples per batch per rank.
        rank, world_size: this process's place in the data-parallel group.
        num_workers: DataLoader worker processes of ``loader()`` (0: in the calling process);
            ``batches()`` reproduces the same sequence in-process.
        seed: seeds shard order, shuffle buffers and augmentation (with the epoch).
        task: ``pretrain`` (no labels), ``lulc`` (9 classes) or ``water`` (0/1).
        augment: random rot90 / flips (training); off for evaluation.
        weight_domain, weight_k: the weight's input (``db`` or ``normalized``) and contrast ``k``
            (see ``training.sar_weight``).
        shuffle_buffer: raw samples held by each worker's shuffle buffer (≤ 1: no shuffle).
        storage_options: fsspec options for the manifest and the shards.
        skip_errors: transient shard failures each worker may skip per epoch (0: raise).
        max_bad_shards: bad shards (missing, not a readable tar, or bytes / sha256 / sample
            count differing from the manifest) each worker may skip per epoch, each one logged
            and counted in ``stats`` (0: raise ``ShardReadError``; see the module doc).
            Evaluation (``eval_batches``) never skips.
        verify: check each shard's sha256 while streaming it (byte size and sample count are
            always checked).
        stats_split: split whose ``db_stats`` z-score the input (default per task, see above).
        retries, timeout, backoff, block_size: the opener's settings (``register_fsspec_opener``).
        pin_memory, prefetch_factor, multiprocessing_context: passed to the DataLoader.
        evaluation: a stream for ``eval_batches()`` only (no training epoch): a split smaller
            than one global batch is fine.
        prepare: ``worker`` (batches are complete) or ``device`` (compact batches: ``sar``
            float16 dB + uint8 ``label``; the consumer calls ``finish(batch, device)``, as the
            training engine does, so that the z-score and weight map run on the GPU).
    """

    def __init__(
        self,
        manifest_url: str,
        split: str,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        task: str = "pretrain",
        augment: bool = True,
        weight_domain: str = "db",
        weight_k: float = 1.0,
        shuffle_buffer: int = 256,
        storage_options: Mapping[str, Any] | None = None,
        skip_errors: int = 0,
        max_bad_shards: int = 0,
        verify: bool = True,
        stats_split: str | None = None,
        retries: int = 3,
        timeout: float = 60.0,
        backoff: float = 0.5,
        block_size: int = 8 * MIB,
        pin_memory: bool = False,
        prefetch_factor: int | None = 2,
        multiprocessing_context: Any = None,
        prepare: str = "worker",
        evaluation: bool = False,
    ) -> None:
        if prepare not in PREPARE:
            raise ValueError(f"prepare must be one of {PREPARE}, got {prepare!r}")
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if weight_domain not in WEIGHT_DOMAINS:
            raise ValueError(
                f"weight_domain must be one of {WEIGHT_DOMAINS}, got {weight_domain!r}"
            )
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        if int(world_size) < 1 or not 0 <= int(rank) < int(world_size):
            raise ValueError(
                f"need 0 ≤ rank < world_size, got rank {rank}, world_size {world_size}"
            )
        if min(int(num_workers), int(skip_errors), int(max_bad_shards), int(seed)) < 0:
            raise ValueError("num_workers, skip_errors, max_bad_shards and seed must be ≥ 0")
        self.manifest_url = str(manifest_url)
        self.split = split
        self.batch_size = int(batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.task = task
        self.augment = bool(augment)
        self.weight_domain, self.weight_k = weight_domain, float(weight_k)
        self.shuffle_buffer = int(shuffle_buffer)
        self.storage_options = dict(storage_options or {})
        self.skip_errors = int(skip_errors)
        self.max_bad_shards = int(max_bad_shards)
        self.verify = bool(verify)
        self.pin_memory, self.prefetch_factor = bool(pin_memory), prefetch_factor
        self.multiprocessing_context = multiprocessing_context
        self.prepare = prepare
        self.stats: dict[str, Any] = _empty_stats()

        manifest = read_manifest(self.manifest_url, self.storage_options)
        splits = manifest["splits"]
        urls = shard_urls(self.manifest_url, split, self.storage_options, manifest)
        entries = splits[split]["shards"]
        self.shards: list[str] = list(urls)
        self.shard_samples: list[int] = [int(e["samples"]) for e in entries]
        # URL -> manifest entry (name, samples, bytes, sha256): what every read is checked against
        self.shard_entries: dict[str, dict[str, Any]] = {
            u: dict(e) for u, e in zip(urls, entries, strict=True)
        }
        self.total_samples = sum(self.shard_samples)
        self.patch = int(manifest.get("patch_size", 256))
        if not self.shards:
            raise ValueError(f"{self.manifest_url}: split {split!r} lists no shards")
        members = splits[split].get("members") or []
        self.with_labels = task != "pretrain"
        if self.with_labels and members and "lulc.npy" not in members:
            raise ValueError(
                f"task {task!r} needs labels but split {split!r} has none "
                f"(members {members}); fine-tune on train/val/test"
            )
        self.stats_split = stats_split or ("pretrain" if task == "pretrain" else "train")
        if self.stats_split not in splits:
            raise ValueError(
                f"{self.manifest_url}: no split {self.stats_split!r} for the "
                f"normalisation statistics (splits {sorted(splits)}); pass stats_split"
            )
        db = splits[self.stats_split].get("db_stats") or {}
        mean, std = db.get("mean"), db.get("std")
        if mean is None or std is None or not np.isfinite([mean, std]).all() or std <= 0:
            raise ValueError(
                f"{self.manifest_url}: split {self.stats_split!r} has unusable dB "
                f"statistics (mean {mean}, std {std})"
            )
        self.mean, self.std = float(mean), float(std)
        self.lut = {"lulc": nine_class_lut(), "water": water_lut()}.get(task)

        self.steps_per_epoch = self.total_samples // (self.world_size * self.batch_size)
        if self.steps_per_epoch < 1 and not evaluation:
            raise ValueError(
                f"split {split!r} has {self.total_samples} samples, fewer than world_size × "
                f"batch_size = {self.world_size} × {self.batch_size}: not one full step per epoch"
            )
        slots = self.world_size * max(self.num_workers, 1)
        if len(self.shards) < slots and not evaluation:
            log.warning(
                "split %s: %d shards for %d rank×worker slots; some shards are read by "
                "several slots (write ≥ %d shards)",
                split,
                len(self.shards),
                slots,
                4 * slots,
            )
        base = self.shards[0].rsplit("/", 1)[0] + "/"
        self._opener = {
            "storage_options": self.storage_options,
            "retries": int(retries),
            "timeout": float(timeout),
            "backoff": float(backoff),
            "block_size": int(block_size),
            "prefix": base,
        }
        register_fsspec_opener(**self._opener)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __repr__(self) -> str:
        return (
            f"ShardStream({self.manifest_url!r}, {self.split!r}, task={self.task!r}, "
            f"rank={self.rank}/{self.world_size}, workers={self.num_workers}, "
            f"batch={self.batch_size}, steps/epoch={self.steps_per_epoch})"
        )

    # --- the plan -------------------------------------------------------------------------

    @property
    def _nw(self) -> int:
        return max(self.num_workers, 1)

    def shard_order(self, epoch: int) -> list[int]:
        """Indices into ``shards`` in this epoch's order (same on every rank)."""
        rng = np.random.default_rng([self.seed, int(epoch), _TAG_SHARDS])
        return [int(i) for i in rng.permutation(len(self.shards))]

    def rank_shards(self, epoch: int, rank: int | None = None) -> list[int]:
        rank = self.rank if rank is None else int(rank)
        perm = self.shard_order(epoch)
        return perm[rank :: self.world_size] or [perm[rank % len(perm)]]

    def worker_shards(self, epoch: int, worker: int, rank: int | None = None) -> list[int]:
        mine = self.rank_shards(epoch, rank)
        return mine[worker :: self._nw] or [mine[worker % len(mine)]]

    def worker_quota(self, worker: int, steps: int | None = None) -> int:
        """Batches logical worker ``worker`` yields among the first ``steps`` (default: all)."""
        steps = self.steps_per_epoch if steps is None else steps
        return max(0, (steps - worker + self._nw - 1) // self._nw)

    def plan(self, epoch: int) -> dict[int, list[dict[str, Any]]]:
        """Every rank's workers: shard URLs, samples in one pass and quota (batches)."""
        out = {}
        for r in range(self.world_size):
            out[r] = []
            for w in range(self._nw):
                idx = self.worker_shards(epoch, w, r)
                out[r].append(
                    {
                        "worker": w,
                        "shards": [self.shards[i] for i in idx],
                        "samples": sum(self.shard_samples[i] for i in idx),
                        "quota": self.worker_quota(w),
                    }
                )
        return out

    # --- streaming ------------------------------------------------------------------------

    def _ensure_opener(self) -> None:
        cfg = _OPENERS.get(self._opener["prefix"])
        if cfg is None or cfg.storage_options != self._opener["storage_options"]:
            register_fsspec_opener(**self._opener)  # a spawned worker process

    def _shard_raw(
        self, url: str, state: _WorkerState, tolerant: bool = True
    ) -> Iterator[dict[str, Any]]:
        """Raw samples ({__key__, __url__, ext: bytes}) of one shard via WebDataset's tar
        iterators, verified against the shard's manifest entry (byte size up front when known;
        sha256, byte size and sample count at the end of the tar). Each sample is held back
        until the next one is parsed, so the last one (the one a truncation or a bad header
        would cut) comes only after the verification. With ``tolerant``, transient failures
        are skipped within ``skip_errors`` and bad shards within ``max_bad_shards``."""
        from webdataset.tariterators import group_by_keys, tar_file_expander

        if url in state.bad:  # found bad (and skipped) earlier this epoch
            return
        entry = self.shard_entries.get(url)
        reader: VerifyingReader | None = None
        bad: str | None = None
        try:
            try:
                if "://" not in url or url.startswith("file://"):  # 1 MiB buffer: fewer syscalls
                    raw = open(url.removeprefix("file://"), "rb", buffering=MIB)
                else:  # WebDataset's gopen: our fsspec opener (register_fsspec_opener)
                    raw = _wds_gopen().gopen(url, "rb")
            except FileNotFoundError:
                raise _Bad("the shard is missing", integrity=False) from None
            reader = VerifyingReader(raw, url, hash=self.verify)
            bad = shard_mismatch(entry, nbytes=_known_size(raw))
            if bad:
                raise _Bad(f"the shard differs from the manifest: {bad}")
            held, n = None, 0
            for s in group_by_keys(tar_file_expander([{"url": url, "stream": reader}])):
                if held is not None:
                    yield held
                held, n = s, n + 1
            nbytes, sha = reader.finish()
            bad = shard_mismatch(entry, samples=n, nbytes=nbytes, sha256=sha)
            if bad:
                raise _Bad(f"the shard differs from the manifest: {bad}")
            if held is not None:
                yield held
            state.counts["shards_read"] += 1
        except _Bad as e:
            self._bad_shard(url, str(e), state, tolerant, integrity=e.integrity)
        except TransientReadError as e:
            if tolerant and state.counts["shards_skipped"] < self.skip_errors:
                state.counts["shards_skipped"] += 1
                state.counts["skipped_urls"].append(url)
                log.warning(
                    "skipping the rest of shard %s after a transient read error "
                    "(%d of skip_errors=%d this epoch): %s",
                    url,
                    state.counts["shards_skipped"],
                    self.skip_errors,
                    e.message,
                )
                return
            how = (
                f"skip_errors={self.skip_errors} spent; raise it to skip such shards"
                if tolerant
                else "evaluation reads every shard; retry, or raise retries"
            )
            raise ShardReadError(f"shard {url}: {e.message} ({how})", shard=url) from e
        except DataError:
            raise
        except Exception as e:
            what = e.args[0] if e.args else e  # WebDataset appends the stream and URL to args
            self._bad_shard(
                url,
                f"the shard cannot be read as a WebDataset tar ({type(e).__name__}: {what})",
                state,
                tolerant,
                cause=e,
            )
        finally:
            if reader is not None:
                reader.close()

    def _bad_shard(
        self,
        url: str,
        what: str,
        state: _WorkerState,
        tolerant: bool,
        integrity: bool = False,
        cause: BaseException | None = None,
    ) -> None:
        """Skip a bad shard (counted, logged) within ``max_bad_shards``, else raise."""
        if tolerant and state.counts["shards_bad"] < self.max_bad_shards:
            state.counts["shards_bad"] += 1
            state.counts["bad_urls"].append(url)
            state.bad.add(url)
            log.error(
                "skipping bad shard %s (%d of max_bad_shards=%d this epoch; samples it gave "
                "before the end of the tar were used): %s",
                url,
                state.counts["shards_bad"],
                self.max_bad_shards,
                what,
            )
            return
        how = "re-run `sarcube shards` to rewrite it" + (
            "; data.max_bad_shards > 0 skips such shards in training" if tolerant else ""
        )
        cls = ShardIntegrityError if integrity else ShardReadError
        raise cls(f"{what}; {how} ({url})", shard=url) from cause

    def _shuffled(self, it: Iterator[dict], rng: np.random.Generator) -> Iterator[dict]:
        size = self.shuffle_buffer
        if size <= 1:
            yield from it
            return
        buf: list[dict] = []
        for s in it:
            if len(buf) < size:
                buf.append(s)
                continue
            i = int(rng.integers(size))
            out, buf[i] = buf[i], s
            yield out
        while buf:
            i = int(rng.integers(len(buf)))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()

    def _worker_samples(self, epoch: int, worker: int, state: _WorkerState) -> Iterator[dict]:
        """Endless raw samples of one logical worker: shuffled passes over its shard list."""
        shards = [self.shards[i] for i in self.worker_shards(epoch, worker)]
        rng = np.random.default_rng([self.seed, int(epoch), self.rank, worker, _TAG_SHUFFLE])
        passes = 0
        while True:
            if passes:
                state.counts["wraps"] += 1
            n = 0
            one_pass = (s for url in shards for s in self._shard_raw(url, state))
            for s in self._shuffled(one_pass, rng):
                n += 1
                yield s
            if n == 0:
                raise ShardReadError(
                    f"rank {self.rank} worker {worker}, epoch {epoch}: its shards "
                    f"{shards} gave no sample in a whole pass"
                )
            passes += 1

    def _worker_batches(
        self, epoch: int, worker: int, start_step: int, opener_stats: bool = True
    ) -> Iterator[dict]:
        """Logical worker ``worker``'s batches from global step ``start_step`` on."""
        state = _WorkerState(opener_stats)
        first, quota = self.worker_quota(worker, start_step), self.worker_quota(worker)
        stream = self._worker_samples(epoch, worker, state)
        try:
            for _ in range(first * self.batch_size):  # fast-forward: no decode
                next(stream)
                state.counts["samples_fast_forwarded"] += 1
            for _ in range(first, quota):
                raw = [next(stream) for _ in range(self.batch_size)]
                batch = self.collate(epoch, raw)
                state.counts["samples_decoded"] += len(raw)
                batch["_stats"] = (worker, state.snapshot())
                yield batch
        finally:
            stream.close()

    # --- decoding -------------------------------------------------------------------------

    def _npy(self, sample: Mapping[str, Any], ext: str, dtype: np.dtype) -> np.ndarray:
        key, url = sample.get("__key__"), sample.get("__url__")
        where = f"sample {key!r} in shard {url}"
        if ext not in sample:
            have = sorted(k for k in sample if not k.startswith("__"))
            need = "" if ext == "sar.npy" else f" (task {self.task!r} needs labels)"
            raise SampleError(f"{where}: no {ext} member{need}; members {have}", key=key, shard=url)
        try:
            arr = load_npy(sample[ext])
        except Exception as e:
            raise SampleError(
                f"{where}: {ext} is not a readable .npy array ({type(e).__name__}: {e})",
                key=key,
                shard=url,
            ) from None
        if (
            not isinstance(arr, np.ndarray)
            or arr.dtype != dtype
            or arr.shape != (self.patch, self.patch)
        ):
            raise SampleError(
                f"{where}: {ext} is {getattr(arr, 'dtype', type(arr).__name__)} "
                f"{getattr(arr, 'shape', '')}, expected {np.dtype(dtype)} "
                f"({self.patch}, {self.patch})",
                key=key,
                shard=url,
            )
        return arr

    def collate(
        self, epoch: int, raw: Sequence[Mapping[str, Any]], augment: bool | None = None
    ) -> dict[str, Any]:
        """Decode and augment (``augment``, default the stream's) raw samples into one batch
        dict; with ``prepare="worker"`` also normalise and weight it (``finish``), else leave
        that to the consumer's device."""
        augment = self.augment if augment is None else augment
        n, p = len(raw), self.patch
        shared = get_worker_info() is not None
        sar_t = _empty((n, 1, p, p), torch.float16, shared)
        sar = sar_t.numpy()[:, 0]  # (B, P, P) view
        lab_t = _empty((n, p, p), torch.uint8, shared) if self.with_labels else None
        lab = None if lab_t is None else lab_t.numpy()
        keys = []
        for i, s in enumerate(raw):
            key = s.get("__key__")
            x = self._npy(s, "sar.npy", np.dtype(np.float16))
            y = self._npy(s, "lulc.npy", np.dtype(np.uint8)) if lab is not None else None
            if augment:
                t = augmentation(self.seed, epoch, key)
                x = apply_augmentation(x, *t)
                y = None if y is None else apply_augmentation(y, *t)
            sar[i] = x
            if lab is not None:
                np.take(self.lut, y, out=lab[i], mode="clip")  # JAXA code -> task class
            keys.append(key)
        out: dict[str, Any] = {"sar": sar_t, "key": keys}
        if lab_t is not None:
            out["label"] = lab_t
        return out if self.prepare == "device" else self.finish(out)

    def finish(
        self, batch: Mapping[str, Any], device: torch.device | str | None = None
    ) -> dict[str, Any]:
        """The full batch (``image``, ``weight``, ``valid``, ``label`` int64, ``key``; see the
        module doc) on ``device`` (default CPU) from a compact one (``sar`` (B, 1, P, P) float16
        augmented dB with NaN for no data, ``label`` (B, P, P) uint8 task classes, ``key``).

        With ``prepare="device"`` the loader ships the compact batch (a third of the bytes of the
        full one) and the training step calls this on the GPU: the z-score and weight map then
        cost the loader processes nothing. A batch that is already full is only moved.
        """
        device = torch.device("cpu" if device is None else device)
        if "sar" not in batch:
            return {
                k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                for k, v in batch.items()
            }
        sar = batch["sar"].to(device, non_blocking=True)  # (B, 1, P, P) float16 dB
        n, shape = sar.shape[0], tuple(sar.shape)
        cpu = device.type == "cpu"
        shared = cpu and get_worker_info() is not None

        def empty(dtype: torch.dtype) -> torch.Tensor:
            return (
                _empty(shape, dtype, shared)
                if cpu
                else torch.empty(shape, dtype=dtype, device=device)
            )

        image, weight, valid = empty(torch.float32), empty(torch.float32), empty(torch.bool)
        if cpu:  # finite <=> exponent bits not all ones (much faster than isfinite on float16)
            torch.ne(sar.view(torch.int16).bitwise_and(0x7C00), 0x7C00, out=valid)
        else:
            torch.isfinite(sar, out=valid)
        all_valid = bool(valid.all())
        # on CPU in chunks of a few samples, so that the chain of element-wise passes stays in
        # cache; on a GPU in one go
        step = _CHUNK if cpu else n
        for a in range(0, n, step):
            b = min(a + step, n)
            x = sar[a:b].float()  # (c, 1, P, P) dB
            if not all_valid:
                x.masked_fill_(~valid[a:b], self.mean)
            torch.sub(x, self.mean, out=image[a:b]).div_(self.std)
            src = x if self.weight_domain == "db" else image[a:b]
            intensity_weight(src, self.weight_k, out=weight[a:b])
        out: dict[str, Any] = {
            "image": image,
            "weight": weight,
            "valid": valid,
            "key": batch["key"],
        }
        if "label" in batch:
            lab = batch["label"].to(device, non_blocking=True)
            label = _empty(tuple(lab.shape), torch.int64, shared) if cpu else None
            label = lab.long() if label is None else label.copy_(lab)  # (B, P, P)
            if not all_valid:
                label.masked_fill_(~valid[:, 0], IGNORE_INDEX)
            out["label"] = label
        return out

    # --- public iteration -----------------------------------------------------------------

    def _check(self, epoch: int, start_step: int) -> None:
        if int(epoch) < 0:
            raise ValueError(f"epoch must be ≥ 0, got {epoch}")
        if not 0 <= int(start_step) <= self.steps_per_epoch:
            raise ValueError(f"start_step must be in [0, {self.steps_per_epoch}], got {start_step}")

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, Any]]:
        """This rank's batches ``start_step … steps_per_epoch - 1`` of ``epoch``, in the calling
        process (the logical workers interleaved as the DataLoader does)."""
        self._check(epoch, start_step)
        self._ensure_opener()
        # all logical workers share this process: worker 0 reports the opener's counters
        gens = [self._worker_batches(epoch, w, start_step, w == 0) for w in range(self._nw)]
        base, latest = self.stats, {}
        try:
            for i in range(start_step, self.steps_per_epoch):
                batch = next(gens[i % self._nw])
                w, snap = batch.pop("_stats")
                latest[w] = snap
                self.stats = _merge_stats(base, list(latest.values()))
                yield batch
        finally:
            for g in gens:
                g.close()

    # --- evaluation -------------------------------------------------------------------------

    def eval_shards(self, rank: int | None = None) -> list[int]:
        """Shards rank ``rank`` reads for evaluation: ``rank, rank + world_size, …`` (manifest
        order). Each shard goes to exactly one rank, so every sample is counted once."""
        rank = self.rank if rank is None else int(rank)
        return list(range(rank, len(self.shards), self.world_size))

    def _eval_batches(self, worker: int, nw: int) -> Iterator[dict[str, Any]]:
        state = _WorkerState(worker == 0)
        buf: list[dict[str, Any]] = []
        for i in self.eval_shards()[worker::nw]:
            for s in self._shard_raw(self.shards[i], state, tolerant=False):
                buf.append(s)
                if len(buf) == self.batch_size:
                    yield self.collate(0, buf, augment=False)
                    buf = []
        if buf:
            yield self.collate(0, buf, augment=False)

    def eval_batches(self) -> Iterator[dict[str, Any]]:
        """This rank's share of the split for evaluation: every sample of its ``eval_shards``
        exactly once, in order, without augmentation, in batches of ``batch_size`` (the last one
        may be short). Unlike the training epoch there is no wrap-around and no equal step count:
        ranks may get different numbers of batches (or none), which is fine for a confusion
        matrix summed once at the end. With ``num_workers > 0`` the rank's shards are dealt to
        DataLoader workers (batch order then follows the workers)."""
        self._ensure_opener()
        mine = self.eval_shards()
        nw = min(self.num_workers, len(mine))
        if nw == 0:
            yield from self._eval_batches(0, 1)
            return
        dl = DataLoader(
            _EvalDataset(self),
            batch_size=None,
            num_workers=nw,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor,
            multiprocessing_context=self.multiprocessing_context,
        )
        it = iter(dl)
        try:
            for batch in it:
                _raise_forwarded(batch)
                yield batch
        finally:
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def loader(self, epoch: int, start_step: int = 0) -> EpochLoader:
        """An iterable of the same batches as ``batches()``, made by ``num_workers`` DataLoader
        processes (in-process when 0); ``len()`` is the number of batches it yields."""
        self._check(epoch, start_step)
        return EpochLoader(self, int(epoch), int(start_step))


class _EpochDataset(IterableDataset):
    def __init__(self, stream: ShardStream, epoch: int, start_step: int):
        self.stream, self.epoch, self.start_step = stream, epoch, start_step

    def __iter__(self):
        info = get_worker_info()
        d, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        if nw != self.stream._nw:
            raise RuntimeError(f"DataLoader has {nw} workers, the stream plans {self.stream._nw}")
        self.stream._ensure_opener()
        yield from _forward_errors(
            self.stream._worker_batches(self.epoch, (d + self.start_step) % nw, self.start_step)
        )


class _EvalDataset(IterableDataset):
    def __init__(self, stream: ShardStream):
        self.stream = stream

    def __iter__(self):
        info = get_worker_info()
        self.stream._ensure_opener()
        yield from _forward_errors(self.stream._eval_batches(info.id, info.num_workers))


def _forward_errors(batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """In a DataLoader worker: a ``DataError`` travels to the main process as an item, which
    raises it there as itself (torch would re-raise a new one whose message is the worker's
    whole traceback)."""
    try:
        yield from batches
    except DataError as e:
        yield {_ERROR: e}


def _raise_forwarded(batch: Mapping[str, Any]) -> None:
    e = batch.get(_ERROR)
    if e is not None:
        raise e


class EpochLoader:
    """One epoch of a ``ShardStream`` through a ``torch.utils.data.DataLoader``."""

    def __init__(self, stream: ShardStream, epoch: int, start_step: int):
        self.stream, self.epoch, self.start_step = stream, epoch, start_step

    def __len__(self) -> int:
        return self.stream.steps_per_epoch - self.start_step

    def __iter__(self) -> Iterator[dict[str, Any]]:
        s = self.stream
        if s.num_workers == 0:
            yield from s.batches(self.epoch, self.start_step)
            return
        dl = DataLoader(
            _EpochDataset(s, self.epoch, self.start_step),
            batch_size=None,
            num_workers=s.num_workers,
            pin_memory=s.pin_memory,
            prefetch_factor=s.prefetch_factor,
            multiprocessing_context=s.multiprocessing_context,
        )
        base, latest, n = s.stats, {}, 0
        it = iter(dl)
        try:
            for batch in it:
                _raise_forwarded(batch)
                w, snap = batch.pop("_stats")
                latest[w] = snap
                s.stats = _merge_stats(base, list(latest.values()))
                n += 1
                yield batch
        finally:
            # stop the workers now: left to the garbage collector after an error (the traceback
            # holds the iterator), torch's shutdown waits out its 5 s join timeout per worker
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        if n != len(self):
            raise RuntimeError(f"the DataLoader gave {n} batches, expected {len(self)}")
