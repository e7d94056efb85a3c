"""TLS for a Dask cluster that spans machines.

A Dask scheduler runs whatever Python a connected client sends, and its workers hold the S3
credentials, so a scheduler reachable over the network without authentication hands the cluster
(and the keys) to anyone who can reach it. Dask's answer is mutual TLS: every process (scheduler,
workers, clients) presents a certificate signed by the cluster's own CA and accepts only peers
that do the same. This module makes that CA and certificate and the matching
``distributed.security.Security``:

- :func:`generate_tls_certs` writes ``ca.pem`` / ``ca.key`` (the cluster's CA) and ``cluster.pem`` /
  ``cluster.key`` (one certificate for the scheduler, the workers and the clients, signed by the
  CA; server and client use). Private keys are written with mode 0600 and never printed.
- :func:`dask_security` is the ``Security`` for a folder made by it (encryption required).
- :func:`security_for` is what ``sarcube`` commands use: that ``Security`` when the scheduler
  address is ``tls://…`` and ``SARCUBE_TLS_DIR`` names the folder, else ``None`` (Dask's own
  configuration, e.g. ``DASK_DISTRIBUTED__COMM__TLS__CA_FILE``, applies).
- ``sarcube tls-certs --out DIR [--host NAME …] [--days N]`` runs :func:`generate_tls_certs`.

Dask does not check host names (it authenticates peers by the CA alone), so whoever holds
``cluster.key`` is a member of the cluster: copy it only to the machines that run sarcube, and keep
``ca.key`` (needed only to issue certificates again) off them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import ipaddress
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("sarcube.security")

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
CERT = "cluster.pem"
KEY = "cluster.key"
FILES = (CA_CERT, CA_KEY, CERT, KEY)
#: names the certificate is issued for by default: the compose service, and this machine
DEFAULT_HOSTS = ("scheduler", "localhost", "127.0.0.1", "::1")
DEFAULT_DAYS = 365
TLS_DIR_ENV = "SARCUBE_TLS_DIR"

_DNS_NAME = re.compile(
    r"(\*\.)?[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?"
)


def _subject_alt_names(hosts: Iterable[str]) -> list[Any]:
    from cryptography import x509

    names: list[Any] = []
    for host in hosts:
        host = str(host).strip()
        if not host:
            continue
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
        except ValueError:
            if not _DNS_NAME.fullmatch(host) or len(host) > 253:
                raise ValueError(f"--host {host!r}: not a host name or IP address") from None
            names.append(x509.DNSName(host.rstrip(".")))
    if not names:
        raise ValueError("no host names: give at least one --host")
    return names


def _key_usage(**allowed: bool):
    from cryptography import x509

    usages = (
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
        "encipher_only",
        "decipher_only",
    )
    return x509.KeyUsage(**{u: allowed.get(u, False) for u in usages})


def _write(path: Path, data: bytes, private: bool) -> None:
    """Write ``data`` to ``path`` atomically; private files are created with mode 0600 (never
    readable by others, not even for a moment)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o600 if private else 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def generate_tls_certs(
    out_dir: str | os.PathLike,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    days: int = DEFAULT_DAYS,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Make a private CA and one certificate for the whole Dask cluster in ``out_dir``.

    Writes ``ca.pem``, ``ca.key``, ``cluster.pem`` and ``cluster.key`` (ECDSA P-256; the keys
    unencrypted PEM with mode 0600, the folder created with mode 0700). ``cluster.pem`` is valid
    for ``days`` days, for TLS servers and clients, with ``hosts`` (host names or IP addresses) as
    subject alternative names. Existing files are kept (``FileExistsError``) unless
    ``overwrite``: a new CA would lock out every machine that holds the old certificate.
    Returns ``{"ca_cert", "ca_key", "cert", "key"}`` → path."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    days = int(days)
    if days < 1:
        raise ValueError(f"--days {days}: must be at least 1")
    sans = _subject_alt_names(hosts)
    out = Path(out_dir)
    paths = {k: out / f for k, f in zip(("ca_cert", "ca_key", "cert", "key"), FILES, strict=True)}
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{', '.join(existing)} already exist(s); regenerating replaces the CA, so every "
            "machine needs the new files (pass --force to do it)"
        )
    out.mkdir(mode=0o700, parents=True, exist_ok=True)

    now = dt.datetime.now(dt.timezone.utc)
    start = now - dt.timedelta(minutes=5)  # clock skew between machines
    end = now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sarcube Dask cluster CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sarcube-dask")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True, key_agreement=True), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    def private_pem(k) -> bytes:
        return k.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    # keys first: a certificate on disk always has its key beside it
    _write(paths["ca_key"], private_pem(ca_key), private=True)
    _write(paths["key"], private_pem(key), private=True)
    _write(paths["ca_cert"], ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(paths["cert"], cert.public_bytes(serialization.Encoding.PEM), private=False)
    return paths


def dask_security(tls_dir: str | os.PathLike):
    """The ``distributed.security.Security`` of a folder made by :func:`generate_tls_certs`:
    the same certificate for client, scheduler and worker roles, encryption required (a
    ``tcp://`` address is refused). ``FileNotFoundError`` when a file is missing."""
    from distributed.security import Security

    d = Path(tls_dir)
    missing = [str(d / f) for f in (CA_CERT, CERT, KEY) if not (d / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"TLS files missing: {', '.join(missing)} "
            f"(make them with `sarcube tls-certs --out {d}`)"
        )
    ca, cert, key = (str(d / f) for f in (CA_CERT, CERT, KEY))
    return Security(
        tls_ca_file=ca,
        tls_client_cert=cert,
        tls_client_key=key,
        tls_scheduler_cert=cert,
        tls_scheduler_key=key,
        tls_worker_cert=cert,
        tls_worker_key=key,
        require_encryption=True,
    )


def security_for(scheduler_address: str | None, environ: dict[str, str] | None = None):
    """The ``Security`` to connect to ``scheduler_address`` with: :func:`dask_security` of
    ``$SARCUBE_TLS_DIR`` for a ``tls://`` address when that variable is set, else ``None``
    (``distributed.Client`` then uses Dask's configuration, which may hold TLS settings of its
    own). A missing file raises ``InputError`` naming the variable."""
    from .errors import InputError

    env = os.environ if environ is None else environ
    tls_dir = env.get(TLS_DIR_ENV, "").strip()
    if not tls_dir or not scheduler_address:
        return None
    if not str(scheduler_address).startswith("tls://"):
        log.warning(
            "%s is set but the scheduler address %s is not tls://…: connecting without TLS",
            TLS_DIR_ENV,
            scheduler_address,
        )
        return None
    try:
        return dask_security(tls_dir)
    except FileNotFoundError as e:
        raise InputError(f"{TLS_DIR_ENV}={tls_dir}: {e}") from None


# -- `sarcube tls-certs` ---------------------------------------------------------------------------


def _warn_if_git_would_see(out: Path) -> None:
    """Warn when the keys lie in a git work tree that does not ignore them (one `git add .` from
    being committed)."""
    import shutil
    import subprocess

    git = shutil.which("git")
    if git is None:
        return
    try:
        r = subprocess.run(
            [git, "-C", str(out), "check-ignore", "-q", KEY],
            capture_output=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return
    if r.returncode == 1:  # 0: ignored; 128: not a work tree (or git refused to look)
        print(
            f"warning: {out} is in a git work tree and not git-ignored: add it to .gitignore; "
            f"never commit {KEY} or {CA_KEY}",
            file=sys.stderr,
        )


def cmd_tls_certs(args: argparse.Namespace) -> int:
    from .errors import InputError

    hosts = list(DEFAULT_HOSTS) + [h for h in args.host if h not in DEFAULT_HOSTS]
    try:
        paths = generate_tls_certs(args.out, hosts=hosts, days=args.days, overwrite=args.force)
    except (FileExistsError, ValueError) as e:
        raise InputError(str(e)) from None
    d = Path(args.out).resolve()
    print(
        f"wrote {paths['ca_cert']}, {paths['cert']} and the private keys {paths['key']}, "
        f"{paths['ca_key']} (mode 0600); valid {args.days} days for {', '.join(hosts)}"
    )
    _warn_if_git_would_see(d)
    print(
        "\n"
        f"Copy {CA_CERT}, {CERT} and {KEY} (not {CA_KEY}) to every machine of the cluster, "
        "readable only by\n"
        "the user that runs Dask, then:\n"
        f"  scheduler: dask scheduler --protocol tls --tls-ca-file {d}/{CA_CERT} "
        f"--tls-cert {d}/{CERT} --tls-key {d}/{KEY}\n"
        f"  workers:   dask worker tls://SCHEDULER:8786 --tls-ca-file {d}/{CA_CERT} "
        f"--tls-cert {d}/{CERT} --tls-key {d}/{KEY}\n"
        f"  sarcube:   export {TLS_DIR_ENV}={d}; "
        "sarcube ingest ... --scheduler tls://SCHEDULER:8786\n"
        f"  other Dask clients: DASK_DISTRIBUTED__COMM__TLS__CA_FILE={d}/{CA_CERT}\n"
        f"    DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT={d}/{CERT} "
        f"DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY={d}/{KEY}\n"
        "    DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION=True"
    )
    return 0


def add_tls_certs_parser(sub) -> argparse.ArgumentParser:
    """Register ``sarcube tls-certs`` on the CLI's subparsers."""
    p = sub.add_parser(
        "tls-certs",
        help="make the TLS CA and certificate of a multi-machine Dask cluster",
        description="Write a private CA (ca.pem, ca.key) and one certificate for the Dask "
        "scheduler, workers and clients (cluster.pem, cluster.key) signed by it. With them the "
        "scheduler accepts only peers holding the certificate (mutual TLS, tls://host:8786); "
        "without TLS anyone who reaches the scheduler can run code on the cluster. Private keys "
        "get mode 0600. See deploy/README.md, section Security.",
    )
    p.add_argument("--out", required=True, help="folder for the four files (created mode 0700)")
    p.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME",
        help="host name or IP address of the scheduler, added to the certificate "
        f"(repeatable; always: {', '.join(DEFAULT_HOSTS)})",
    )
    p.add_argument(
        "--days", type=int, default=DEFAULT_DAYS, help="validity in days (default %(default)s)"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace existing files (a new CA: redistribute them to every machine)",
    )
    p.set_defaults(func=cmd_tls_certs)
    return p
