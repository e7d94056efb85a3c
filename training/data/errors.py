"""The loader's error types and the classification of storage errors as transient.

Malformed input is a ``DataError``; every ``DataError`` is a ``SarcubeError``, so the command line
prints it as one line and exits with status 2, and errors in DataLoader worker processes reach
the main process as themselves (``training.data.loaders`` forwards them):

- ``SampleError``: a malformed sample (undecodable npy, wrong shape or dtype, no ``sar.npy``,
  or no ``lulc.npy`` for a fine-tuning task), naming the sample key and the shard URL.
- ``ShardReadError``: a shard that cannot be read (absent, not a tar, or a transient error that
  outlasted the opener's retries while ``skip_errors`` is spent), naming the shard URL;
  ``ShardIntegrityError`` (a subclass): its bytes differ from the manifest
  (``training.data.verify``).
- ``TransientReadError``: what the opener (``training.data.opener``) raises when a transient
  error outlasts its retries.

``is_transient`` decides which errors the opener retries: connection refused/reset, timeouts,
HTTP 5xx/429.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Mapping

from sarcube.errors import SarcubeError

__all__ = [
    "DataError",
    "SampleError",
    "ShardIntegrityError",
    "ShardReadError",
    "TransientReadError",
    "is_transient",
]


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


_TRANSIENT_TYPES: tuple[type[BaseException], ...] = (
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
