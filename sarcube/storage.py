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

SECRET_KEYS = (
    "key",
    "secret",
    "token",
    "aws_access_key_id",
    "aws_secret_access_key",
    "aws_session_token",
    "password",
)


def is_remote(url: str) -> bool:
    """True for URLs with a non-local protocol (``s3://``, ``gs://``, ``memory://`` ...)."""
    scheme = urlparse(str(url)).scheme
    return scheme not in ("", "file") and len(scheme) > 1  # len>1: Windows drive letters


# JAXA delivers products as archives: a scene inside one is addressed as fsspec's chained URL
# ``tar://MEMBER::ARCHIVE`` / ``zip://MEMBER::ARCHIVE`` (ARCHIVE local or s3://), read in place
ARCHIVE_PROTOCOLS = {".zip": "zip", ".tar.gz": "tar", ".tgz": "tar", ".tar": "tar"}
_VSI = {"zip": "/vsizip/", "tar": "/vsitar/"}


def archive_protocol(url: str) -> str | None:
    """``zip`` / ``tar`` for a delivery archive's URL (by its suffix), else None."""
    low = str(url).lower()
    return next((p for suffix, p in ARCHIVE_PROTOCOLS.items() if low.endswith(suffix)), None)


def member_url(archive_url: str, member: str) -> str:
    """The URL of ``member`` inside the archive at ``archive_url``."""
    return f"{archive_protocol(archive_url)}://{member.lstrip('/')}::{archive_url}"


def split_member_url(url: str) -> tuple[str, str, str] | None:
    """``(protocol, member, archive URL)`` of an archive member's URL, else None."""
    head, sep, archive = str(url).partition("::")
    proto, _, member = head.partition("://")
    if not sep or proto not in _VSI:
        return None
    return proto, member, archive


def url_to_fs(url: str, storage_options: Mapping[str, Any] | None = None):
    """(filesystem, path) for a URL; local paths are made absolute; an archive member's URL
    (``tar://MEMBER::ARCHIVE``) gets the storage options for its archive's protocol."""
    import fsspec  # on first use: the command-line parser imports this module (fast --help)

    url = str(url)
    parts = split_member_url(url)
    if parts is not None:
        proto, member, archive = parts
        if not is_remote(archive):
            archive = os.path.abspath(archive.removeprefix("file://"))
        outer = urlparse(archive).scheme if is_remote(archive) else "file"
        kwargs = {outer: dict(storage_options)} if storage_options else {}
        return fsspec.core.url_to_fs(f"{proto}://{member}::{archive}", **kwargs)
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
        partial = dest.with_name(f".{dest.name}.partial")
        yield partial
        os.replace(partial, dest)


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


STORAGE_OPTION_HELP = (
    "fsspec/s3fs option for s3:// URLs, e.g. endpoint_url=http://host:9000, anon=true "
    "(repeatable; credentials also from the usual AWS_* variables)"
)


def add_storage_option_argument(parser, help: str = STORAGE_OPTION_HELP) -> None:
    """Declare ``--storage-option KEY=VALUE`` (repeatable) on an argparse parser: the one
    declaration of every command's storage options, read back by :func:`parse_storage_options`."""
    parser.add_argument(
        "--storage-option", action="append", default=[], metavar="KEY=VALUE", help=help
    )


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
    storage_options = dict(storage_options or {})
    return (
        storage_options.get("endpoint_url")
        or storage_options.get("client_kwargs", {}).get("endpoint_url")
        or os.environ.get("AWS_ENDPOINT_URL")
    )


def gdal_path(url: str) -> str:
    """A path GDAL opens: ``s3://bucket/key`` -> ``/vsis3/bucket/key``; local paths unchanged;
    an archive member ``tar://M::A`` -> ``/vsitar/{A as GDAL opens it}/M`` (zip: ``/vsizip/``)."""
    url = str(url)
    parts = split_member_url(url)
    if parts is not None:
        proto, member, archive = parts
        return f"{_VSI[proto]}{gdal_path(archive)}/{member}"
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

    CPL_VSIL_CURL_NON_CACHED=/vsis3/: GDAL's process-wide /vsicurl/ cache otherwise outlives the
    dataset, so a later open in the same process (a Dask worker, a notebook) is served what an
    earlier one saw: an object replaced on S3 keeps its old bytes (defeating the hashes sarcube
    checks), and a read that failed during an S3 outage makes the object "not a supported file
    format" until the process ends. Blocks are still cached while a dataset is open.
    """
    storage_options = dict(storage_options or {})
    env: dict[str, Any] = {
        "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
        "CPL_VSIL_GZIP_WRITE_PROPERTIES": "NO",
        "CPL_VSIL_CURL_NON_CACHED": "/vsis3/",
    }
    ep = endpoint_url(storage_options)
    if ep:
        parsed = urlparse(ep)
        env["AWS_S3_ENDPOINT"] = parsed.netloc or parsed.path
        env["AWS_HTTPS"] = "NO" if parsed.scheme == "http" else "YES"
        env["AWS_VIRTUAL_HOSTING"] = "FALSE"
    if storage_options.get("anon"):
        env["AWS_NO_SIGN_REQUEST"] = "YES"
    region = storage_options.get("client_kwargs", {}).get("region_name")
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

    storage_options = dict(storage_options or {})
    env = gdal_env(storage_options)
    session = AWSSession(
        aws_unsigned=bool(storage_options.get("anon")) or None,
        aws_access_key_id=storage_options.get("key"),
        aws_secret_access_key=storage_options.get("secret"),
        aws_session_token=storage_options.get("token"),
        region_name=storage_options.get("client_kwargs", {}).get("region_name"),
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


# ---------------------------------------------------------------------------------------------
# Secrets on command lines, and storage errors as one line

SECRET_OPTIONS_ENV = "SARCUBE_SECRET_STORAGE_OPTIONS"


def is_secret_key(key: str) -> bool:
    """True for a storage-option key whose value must not be printed (``key``, ``secret`` …)."""
    k = str(key).strip().lower()
    return k in SECRET_KEYS or "secret" in k or "token" in k or "password" in k


def split_secret_storage_options(argv: list[str]) -> tuple[list[str], list[str]]:
    """``(argv without the secret --storage-option pairs, those KEY=VALUE pairs)``: both the
    ``--storage-option K=V`` and the ``--storage-option=K=V`` forms."""
    out: list[str] = []
    secrets: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--storage-option" and i + 1 < len(argv):
            pair = argv[i + 1]
            if is_secret_key(pair.split("=", 1)[0]):
                secrets.append(pair)
            else:
                out += [tok, pair]
            i += 2
            continue
        if tok.startswith("--storage-option="):
            pair = tok.split("=", 1)[1]
            if is_secret_key(pair.split("=", 1)[0]):
                secrets.append(pair)
                i += 1
                continue
        out.append(tok)
        i += 1
    return out, secrets


def redact_argv(argv: list[str]) -> list[str]:
    """A copy of a command line safe to print: secret ``--storage-option K=V`` values as ``***``."""
    out: list[str] = []
    for i, tok in enumerate(argv):
        if tok.startswith("--storage-option="):
            k = tok.split("=", 2)[1]
            tok = f"--storage-option={k}=***" if is_secret_key(k) else tok
        elif i > 0 and argv[i - 1] == "--storage-option" and is_secret_key(tok.split("=", 1)[0]):
            tok = tok.split("=", 1)[0] + "=***"
        out.append(tok)
    return out


def secret_storage_options_from_env() -> list[str]:
    """The ``KEY=VALUE`` pairs a launcher handed to its ranks in :data:`SECRET_OPTIONS_ENV`
    (a JSON list; not on the command line, where every user of the machine could read them)."""
    import json

    raw = os.environ.get(SECRET_OPTIONS_ENV)
    if not raw:
        return []
    try:
        pairs = json.loads(raw)
    except ValueError:
        return []
    return [str(p) for p in pairs] if isinstance(pairs, list) else []


def storage_error_message(exc: BaseException) -> str | None:
    """One line describing a storage failure (missing bucket/object, access denied, no
    credentials, unreachable endpoint), naming the path when the exception carries one; ``None``
    when ``exc`` (and what caused it) is not a storage error."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        msg = _describe_storage_error(e)
        if msg is not None:
            return msg
        e = e.__cause__ or e.__context__
    return None


def _describe_storage_error(e: BaseException) -> str | None:
    try:
        import botocore.exceptions as bx
    except ImportError:  # pragma: no cover - s3fs brings botocore
        bx = None
    if bx is not None:
        if isinstance(e, bx.NoCredentialsError | bx.PartialCredentialsError):
            return (
                "no S3 credentials (pass --storage-option key=... --storage-option secret=..., "
                "set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or --storage-option anon=true)"
            )
        if isinstance(e, bx.EndpointConnectionError | bx.ConnectTimeoutError):
            return f"cannot reach the storage endpoint: {e}"
        if isinstance(e, bx.ClientError):
            err = (getattr(e, "response", None) or {}).get("Error", {})
            return f"{err.get('Code', 'error')}: {err.get('Message') or e}"
        if isinstance(e, bx.BotoCoreError):
            return str(e)
    if isinstance(e, OSError):
        text = e.strerror or (str(e.args[0]) if e.args else "") or type(e).__name__
        if isinstance(e, PermissionError):
            text = f"access denied ({text})"
        elif isinstance(e, FileNotFoundError) and "not found" not in text.lower():
            text = f"not found ({text})"
        where = e.filename
        if where is not None and str(where) not in text:
            return f"{text} ({where})"
        return text
    return None


def _bucket_check(url: str, fs, path: str, what: str) -> None:
    """For ``s3://``: the bucket exists and these credentials may use it (HEAD bucket)."""
    bucket = path.split("/", 1)[0]
    try:
        fs.call_s3("head_bucket", Bucket=bucket)
    except FileNotFoundError:
        raise _storage_error(f"{what} {url}: the bucket {bucket!r} does not exist") from None
    except PermissionError:
        raise _storage_error(
            f"{what} {url}: access to the bucket {bucket!r} is denied (check "
            "the credentials: --storage-option key=/secret= or AWS_*)"
        ) from None
    except TypeError as e:  # an option s3fs / botocore does not take
        raise _storage_error(
            f"{what} {url}: a --storage-option the S3 client does not accept ({e})"
        ) from None
    except Exception as e:
        msg = storage_error_message(e)
        if msg is None:
            raise
        raise _storage_error(f"{what} {url}: {msg}") from None


def _storage_error(msg: str):
    from .errors import StorageError

    return StorageError(msg)


def check_readable(
    url: str, storage_options: Mapping[str, Any] | None = None, what: str = ""
) -> None:
    """Raise :class:`sarcube.errors.StorageError` naming ``url`` unless something is there and
    can be reached (a file, object, directory or prefix). Cheap: one or two metadata calls."""
    url = str(url)
    label = f"{what} " if what else ""
    try:
        fs, path = url_to_fs(url, storage_options)
    except (ValueError, ImportError) as e:
        raise _storage_error(f"{label}{url}: {e}") from None
    if is_remote(url) and "s3" in (
        fs.protocol if isinstance(fs.protocol, tuple | list) else (fs.protocol,)
    ):
        _bucket_check(url, fs, path, label.strip())
    try:
        ok = fs.exists(path)
    except Exception as e:
        msg = storage_error_message(e)
        if msg is None:
            raise
        raise _storage_error(f"{label}{url}: {msg}") from None
    if not ok:
        raise _storage_error(f"{label}{url}: not found")


def check_writable(
    url: str, storage_options: Mapping[str, Any] | None = None, what: str = "", kind: str = "dir"
) -> None:
    """Raise :class:`sarcube.errors.StorageError` naming ``url`` when it clearly cannot be
    written as ``kind`` (``"dir"``: a directory/prefix/store; ``"file"``): an S3 bucket that is
    missing or denied; locally an existing file where a directory is wanted (or the reverse), a
    parent that is a file, or a directory without write permission. Writes nothing."""
    url = str(url)
    label = f"{what} " if what else ""
    if is_remote(url):
        try:
            fs, path = url_to_fs(url, storage_options)
        except (ValueError, ImportError) as e:
            raise _storage_error(f"{label}{url}: {e}") from None
        protocols = fs.protocol if isinstance(fs.protocol, tuple | list) else (fs.protocol,)
        if "s3" in protocols:
            _bucket_check(url, fs, path, label.strip())
        return
    p = Path(url.removeprefix("file://")).expanduser().absolute()
    if kind == "dir" and p.is_file():
        raise _storage_error(f"{label}{url}: an existing file, not a directory")
    if kind == "file" and p.is_dir():
        raise _storage_error(f"{label}{url}: an existing directory, not a file")
    anc = p if p.exists() else p.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise _storage_error(f"{label}{url}: {anc} is a file, not a directory")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise _storage_error(f"{label}{url}: no permission to write in {anc}")


class RedactedOptions(dict):
    """Storage options whose ``repr``/``str`` hide the secrets (``redact``): what Dask prints of a
    failed task's arguments, a dataclass's repr or a traceback's locals then shows ``***``.
    Otherwise a plain dict (pickles, compares and unpacks as one); ``dict(x)`` drops the
    protection, so pass the object itself along."""

    def __repr__(self) -> str:
        return repr(redact(self))

    __str__ = __repr__
