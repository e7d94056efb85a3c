"""Verified reads: every shard is checked against its manifest entry while it streams.

The checked fields are the entry's ``name``, ``samples``, ``bytes`` and ``sha256``, with no extra
pass over the data: the tar iterator reads through a ``VerifyingReader`` that counts and
sha256-hashes the bytes (``verify=False``: no hash; ~1 GB/s of one core otherwise), and at the
end of the tar the rest of the file (padding, or everything after a header the parser could not
read) is read too, so a corrupt header in the middle, a flipped payload byte, a truncated or
replaced file or a wrong sample count are all found. The byte size is also checked up front when
the opener knows it (``known_size``: local files, fsspec). ``shard_mismatch`` says what differs.

What the stream does with a mismatch (``training.data.stream``): samples are emitted while the
shard streams, before its hash is known; each is held back until the next one is parsed, so the
shard's last sample (the one a truncation cuts) only comes after the verification. A mismatch is
a ``ShardIntegrityError`` naming the shard, or, within ``max_bad_shards`` (a budget per logical
worker per epoch, like ``skip_errors``), a skip that is logged (ERROR) and counted in
``io_counters`` (``shards_bad``, ``bad_urls``); the skipped shard is not read again in that
epoch and the quota is met by wrapping around. Samples the bad shard gave before the end of its
tar were already used (shards are not buffered: they are 256 MB); ``iter_samples(verify=True)``
or ``sarcube shards`` re-run find such a shard ahead of training. Evaluation (``eval_batches``)
never skips: every sample of the split or an error. Fast-forwarded samples (mid-epoch resume)
are read and hashed like the others; a shard a worker leaves mid-way (its quota met) is not
verified in that epoch.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
from collections.abc import Mapping
from typing import Any

from .opener import MIB

__all__ = ["VerifyingReader", "known_size", "shard_mismatch"]


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


def known_size(raw) -> int | None:
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
