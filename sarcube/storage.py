"""Where data lives: fsspec URLs (local paths, ``file://``, ``s3://`` on any endpoint).

One place converts a URL + storage options into an fsspec filesystem, a GDAL path (``/vsis3/``)
and the GDAL configuration that goes with it, and redacts credentials before anything is logged.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import fsspec

SECRET_KEYS = ("key", "secret", "token", "aws_access_key_id", "aws_secret_access_key",
               "aws_session_token", "password")  # fmt: skip


def is_remote(url: str) -> bool:
    """True for URLs with a non-local protocol (``s3://``, ``gs://``, ``memory://`` ...)."""
    scheme = urlparse(str(url)).scheme
    return scheme not in ("", "file") and len(scheme) > 1  # len>1: Windows drive letters


def url_to_fs(url: str, storage_options: Mapping[str, Any] | None = None):
    """(filesystem, path) for a URL; local paths are made absolute."""
    url = str(url)
    if not is_remote(url):
        url = os.path.abspath(url.removeprefix("file://"))
    return fsspec.core.url_to_fs(url, **dict(storage_options or {}))


def join_url(base: str, *parts: str) -> str:
    """Join URL/path components with '/', keeping the protocol."""
    out = str(base).rstrip("/")
    for p in parts:
        out = f"{out}/{str(p).strip('/')}"
    return out


@contextlib.contextmanager
def local_output(url: str, storage_options: Mapping[str, Any] | None = None) -> Iterator[Path]:
    """Yield a local path to write to; on success it ends up at ``url`` (local or remote).

    Writers that need random access (GeoTIFF) write a local file that is moved or uploaded
    whole, so a crash never leaves a truncated object at the destination.
    """
    url = str(url)
    if is_remote(url):
        with tempfile.TemporaryDirectory(prefix="sarcube-") as tmp:
            local = Path(tmp) / Path(urlparse(url).path).name
            yield local
            fs, path = url_to_fs(url, storage_options)
            fs.put_file(str(local), path)
    else:
        dest = Path(url.removeprefix("file://")).absolute()
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.partial")
        yield tmp
        os.replace(tmp, dest)


def is_local_fs(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple | list) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


def put_bytes(fs, path: str, data: bytes) -> None:
    """Write ``data`` at ``path`` of an fsspec filesystem atomically: a temp file + ``os.replace``
    locally, one upload (a single PUT, or a multipart upload completed at once) remotely."""
    if not is_local_fs(fs):
        fs.pipe_file(path, data)
        return
    directory, name = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_bytes(url: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write ``data`` at a URL (local path or ``s3://…``) atomically; see ``put_bytes``."""
    fs, path = url_to_fs(url, storage_options)
    put_bytes(fs, path, data)


def parse_storage_options(pairs: list[str] | None) -> dict[str, Any]:
    """``["key=value", ...]`` from the CLI -> s3fs storage options.

    ``endpoint_url`` / ``region_name`` go to the botocore client; ``anon=true`` etc. are parsed
    as booleans. Credentials may also come from the usual AWS_* environment variables.
    """
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"--storage-option {pair!r}: expected key=value")
        k, v = pair.split("=", 1)
        val: Any = {"true": True, "false": False}.get(v.lower(), v)
        if k in ("endpoint_url", "region_name"):
            out.setdefault("client_kwargs", {})[k] = val
        else:
            out[k] = val
    return out


def endpoint_url(storage_options: Mapping[str, Any] | None) -> str | None:
    so = dict(storage_options or {})
    return (
        so.get("endpoint_url")
        or so.get("client_kwargs", {}).get("endpoint_url")
        or os.environ.get("AWS_ENDPOINT_URL")
    )


def gdal_path(url: str) -> str:
    """A path GDAL opens: ``s3://bucket/key`` -> ``/vsis3/bucket/key``; local paths unchanged."""
    url = str(url)
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        return f"/vsis3/{parsed.netloc}{parsed.path}"
    if parsed.scheme in ("", "file"):
        return url.removeprefix("file://")
    raise ValueError(
        f"{url}: GDAL cannot read the {parsed.scheme}:// protocol (use s3:// or a path)"
    )


def gdal_env(storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """GDAL configuration options (no credentials) for ``/vsis3/`` with these storage options.

    A custom endpoint (``http://127.0.0.1:PORT``) needs AWS_S3_ENDPOINT without the scheme,
    AWS_HTTPS=NO for plain http, and path-style addressing (AWS_VIRTUAL_HOSTING=FALSE).
    """
    so = dict(storage_options or {})
    env: dict[str, Any] = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
                           "CPL_VSIL_GZIP_WRITE_PROPERTIES": "NO"}  # fmt: skip
    ep = endpoint_url(so)
    if ep:
        parsed = urlparse(ep)
        env["AWS_S3_ENDPOINT"] = parsed.netloc or parsed.path
        env["AWS_HTTPS"] = "NO" if parsed.scheme == "http" else "YES"
        env["AWS_VIRTUAL_HOSTING"] = "FALSE"
    if so.get("anon"):
        env["AWS_NO_SIGN_REQUEST"] = "YES"
    region = so.get("client_kwargs", {}).get("region_name")
    if region:
        env["AWS_REGION"] = region
    return env


def rasterio_env(storage_options: Mapping[str, Any] | None = None):
    """A ``rasterio.Env`` that opens ``/vsis3/`` paths with these storage options.

    Credentials go through rasterio's AWSSession (explicit ``key``/``secret``/``token`` or the
    usual AWS_* variables and profiles); the endpoint and addressing style through GDAL options.
    """
    import rasterio
    from rasterio.session import AWSSession

    so = dict(storage_options or {})
    env = gdal_env(so)
    session = AWSSession(
        aws_unsigned=bool(so.get("anon")) or None,
        aws_access_key_id=so.get("key"),
        aws_secret_access_key=so.get("secret"),
        aws_session_token=so.get("token"),
        region_name=so.get("client_kwargs", {}).get("region_name"),
        endpoint_url=env.get("AWS_S3_ENDPOINT"),
    )
    return rasterio.Env(session=session, **env)


def redact(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Copy of storage options / GDAL env safe to log: secrets replaced by '***'."""
    out: dict[str, Any] = {}
    for k, v in dict(options or {}).items():
        if isinstance(v, Mapping):
            out[k] = redact(v)
        elif k.lower() in SECRET_KEYS or "secret" in k.lower() or "token" in k.lower():
            out[k] = "***"
        else:
            out[k] = v
    return out
