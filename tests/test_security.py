"""TLS for multi-machine Dask clusters (issue 13): ``sarcube.security``.

The certificates come from the real :func:`generate_tls_certs`; a real TLS scheduler and worker
run as subprocesses (``dask scheduler`` / ``dask worker`` with the flags deploy/ uses) on
127.0.0.1 only. Checked: a client with the certificate runs a task; a client without it, a plain
``tcp://`` connection, a TLS connection without a client certificate and a certificate of another
CA are all refused; private keys are 0600 and never printed; ``security_for`` and the CLI.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import ipaddress
import json
import os
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sarcube.errors import InputError
from sarcube.security import (
    CA_CERT,
    CA_KEY,
    CERT,
    KEY,
    TLS_DIR_ENV,
    add_tls_certs_parser,
    dask_security,
    generate_tls_certs,
    security_for,
)

REFUSED = (OSError, TimeoutError)  # CommClosedError is an OSError


def _tls_flags(d: Path) -> list[str]:
    return [
        "--tls-ca-file",
        str(d / CA_CERT),
        "--tls-cert",
        str(d / CERT),
        "--tls-key",
        str(d / KEY),
    ]


def _connect_error(address: str, **kw) -> type[BaseException] | None:
    """Connect a client, ask the scheduler who it is, close it; the exception type it failed
    with, or None. A client whose start failed is collected here and now: left to a later garbage
    collection, its ``__del__`` can run under the loop runners' (class-wide) lock and deadlock."""
    from distributed import Client

    try:
        with Client(address, timeout="3s", set_as_default=False, **kw) as client:
            client.scheduler_info()
    except Exception as e:  # returned to the test
        error: type[BaseException] | None = type(e)
    else:
        error = None
    gc.collect()
    return error


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in reversed(procs):  # the worker first
        if p.poll() is None:
            p.terminate()
    for p in reversed(procs):
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory):
    """A TLS scheduler and one TLS worker on 127.0.0.1 (free port), certificates of a CA made
    for it, and a second CA's certificates. Yields (cert dir, other CA's dir, address)."""
    root = tmp_path_factory.mktemp("tls")
    certs, other = root / "certs", root / "other-ca"
    generate_tls_certs(certs, hosts=["127.0.0.1", "localhost"], days=2)
    generate_tls_certs(other, hosts=["127.0.0.1"], days=2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    env["DASK_TEMPORARY_DIRECTORY"] = str(root / "scratch")
    sched_file = root / "scheduler.json"
    procs: list[subprocess.Popen] = []
    logs = []

    def start(args: list[str], name: str) -> subprocess.Popen:
        log = open(root / f"{name}.log", "wb")  # closed in the finalizer
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", *args], stdout=log, stderr=subprocess.STDOUT, env=env
            )
        )
        return procs[-1]

    def logs_text() -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in root.glob("*.log"))

    try:
        sched = start(
            [
                "distributed.cli.dask_scheduler",
                "--protocol",
                "tls",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--no-dashboard",
                "--scheduler-file",
                str(sched_file),
                "--idle-timeout",
                "300",
                *_tls_flags(certs),
            ],
            "scheduler",
        )
        deadline = time.monotonic() + 30
        address = None
        while address is None:
            assert sched.poll() is None, f"scheduler exited:\n{logs_text()}"
            assert time.monotonic() < deadline, f"scheduler did not start:\n{logs_text()}"
            time.sleep(0.1)
            with contextlib.suppress(OSError, ValueError):  # not there yet, or half-written
                address = json.loads(sched_file.read_text())["address"]
        assert address.startswith("tls://127.0.0.1:"), address
        start(
            [
                "distributed.cli.dask_worker",
                address,
                "--no-nanny",
                "--nthreads",
                "1",
                "--no-dashboard",
                "--death-timeout",
                "30",
                "--memory-limit",
                "0",
                *_tls_flags(certs),
            ],
            "worker",
        )
        yield certs, other, address
    finally:
        _stop(procs)
        for log in logs:
            log.close()


# -- the certificate files -------------------------------------------------------------------------


def test_generated_files_keys_0600_and_certificate_chain(tmp_path):
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    out = tmp_path / "new" / "tls"
    paths = generate_tls_certs(
        out, hosts=["scheduler.example.org", "10.0.0.5", "localhost"], days=30
    )
    assert {p.name for p in out.iterdir()} == {CA_CERT, CA_KEY, CERT, KEY}
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    for name in (CA_KEY, KEY):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600, name
        assert b"PRIVATE KEY" in (out / name).read_bytes()
    for name in (CA_CERT, CERT):
        assert stat.S_IMODE((out / name).stat().st_mode) & 0o077 in (0o044, 0o000)
        assert b"PRIVATE" not in (out / name).read_bytes()
    assert paths["key"] == out / KEY and paths["ca_cert"] == out / CA_CERT

    ca = x509.load_pem_x509_certificate((out / CA_CERT).read_bytes())
    cert = x509.load_pem_x509_certificate((out / CERT).read_bytes())
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(eku)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"scheduler.example.org", "localhost"}
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]
    left = cert.not_valid_after_utc - dt.datetime.now(dt.timezone.utc)
    assert dt.timedelta(days=29) < left <= dt.timedelta(days=30)

    # the keys belong to the certificates
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(out / CA_CERT))
    ctx.load_cert_chain(out / CERT, out / KEY)

    # no silent replacement of a CA that machines already use
    before = (out / CA_CERT).read_bytes()
    with pytest.raises(FileExistsError, match="--force"):
        generate_tls_certs(out)
    assert (out / CA_CERT).read_bytes() == before
    generate_tls_certs(out, overwrite=True)
    assert (out / CA_CERT).read_bytes() != before
    assert stat.S_IMODE((out / KEY).stat().st_mode) == 0o600
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    with pytest.raises(ValueError, match="days"):
        generate_tls_certs(tmp_path / "x", days=0)
    with pytest.raises(ValueError, match="host"):
        generate_tls_certs(tmp_path / "y", hosts=["not a host!"])


def test_keys_are_0600_even_with_a_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        generate_tls_certs(tmp_path / "t")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "t" / KEY).stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "t" / CA_KEY).stat().st_mode) == 0o600


# -- the secured scheduler -------------------------------------------------------------------------


def test_client_with_the_certificate_runs_a_task(tls_cluster):
    from distributed import Client

    certs, _, address = tls_cluster
    with Client(address, security=dask_security(certs), timeout="10s") as client:
        assert client.scheduler_info()["address"] == address
        client.wait_for_workers(1, timeout=30)
        assert all(w.startswith("tls://") for w in client.scheduler_info()["workers"])
        assert client.submit(lambda: 41 + 1, pure=False).result(timeout=30) == 42


def test_client_without_a_certificate_is_refused(tls_cluster):
    _, _, address = tls_cluster
    # no TLS settings at all: Dask will not even try (and the scheduler would not accept it)
    assert issubclass(_connect_error(address), (*REFUSED, TypeError))
    # plain TCP to the TLS port: the TLS handshake fails, the scheduler drops the connection
    assert issubclass(_connect_error(address.replace("tls://", "tcp://")), REFUSED)


def _identity(address: str, ctx: ssl.SSLContext) -> dict:
    """One request on Dask's own comm layer with the given TLS context."""
    from distributed.comm import connect

    async def go() -> dict:
        comm = await connect(address, timeout="3s", ssl_context=ctx)
        try:
            await comm.write({"op": "identity", "reply": True})
            return await asyncio.wait_for(comm.read(), 5)
        finally:
            comm.abort()

    return asyncio.run(go())


def test_tls_without_a_client_certificate_is_refused_by_the_scheduler(tls_cluster):
    """The scheduler itself demands a certificate of its CA (mutual TLS): a client that trusts
    the CA but shows no certificate gets nothing back."""
    certs, _, address = tls_cluster
    with_cert = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(certs / CA_CERT))
    with_cert.check_hostname = False
    with_cert.load_cert_chain(certs / CERT, certs / KEY)
    assert _identity(address, with_cert)["type"] == "Scheduler"  # the probe itself works

    no_cert = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(certs / CA_CERT))
    no_cert.check_hostname = False
    with pytest.raises((*REFUSED, ssl.SSLError)):
        _identity(address, no_cert)


def test_certificate_of_another_ca_is_refused(tls_cluster):
    certs, other, address = tls_cluster
    assert issubclass(_connect_error(address, security=dask_security(other)), REFUSED)
    assert _connect_error(address, security=dask_security(certs)) is None  # the control


# -- security_for / the CLI ------------------------------------------------------------------------


def test_security_for_uses_sarcube_tls_dir_for_tls_addresses(tmp_path, caplog):
    certs = tmp_path / "certs"
    generate_tls_certs(certs)
    env = {TLS_DIR_ENV: str(certs)}
    sec = security_for("tls://scheduler.example.org:8786", env)
    assert sec.require_encryption and sec.tls_ca_file == str(certs / CA_CERT)
    assert sec.tls_client_cert == str(certs / CERT) and sec.tls_client_key == str(certs / KEY)
    assert sec.tls_worker_key == str(certs / KEY) and sec.tls_scheduler_cert == str(certs / CERT)
    assert security_for("tls://h:8786", {}) is None  # Dask's own configuration applies
    assert security_for(None, env) is None  # a LocalCluster
    with caplog.at_level("WARNING", logger="sarcube.security"):
        assert security_for("tcp://h:8786", env) is None
    assert "not tls://" in caplog.text
    with pytest.raises(InputError, match=TLS_DIR_ENV):
        security_for("tls://h:8786", {TLS_DIR_ENV: str(tmp_path / "missing")})
    with pytest.raises(FileNotFoundError, match="sarcube tls-certs"):
        dask_security(tmp_path / "missing")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sarcube")
    sub = parser.add_subparsers(dest="command", required=True)
    add_tls_certs_parser(sub)
    return parser


def test_tls_certs_command_writes_files_and_prints_no_key(tmp_path, capsys):
    from cryptography import x509

    out = tmp_path / "tls"
    args = _parser().parse_args(
        [
            "tls-certs",
            "--out",
            str(out),
            "--host",
            "dask.example.org",
            "--host",
            "192.0.2.7",
            "--days",
            "10",
        ]
    )
    assert args.func(args) == 0
    printed = capsys.readouterr()
    key_lines = {ln for f in (KEY, CA_KEY) for ln in (out / f).read_text().splitlines()[1:-1]}
    assert "PRIVATE KEY" not in printed.out + printed.err
    assert not any(ln in printed.out + printed.err for ln in key_lines)
    assert "tls://" in printed.out and "DASK_DISTRIBUTED__COMM__TLS__CA_FILE" in printed.out
    cert = x509.load_pem_x509_certificate((out / CERT).read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"dask.example.org", "scheduler", "localhost"} <= set(
        san.get_values_for_type(x509.DNSName)
    )
    # existing files: an input error (exit status 2 in the CLI), unless --force
    with pytest.raises(InputError, match="--force"):
        args.func(args)
    args = _parser().parse_args(["tls-certs", "--out", str(out), "--force"])
    assert args.func(args) == 0
    assert "warning" not in capsys.readouterr().err  # not in a git work tree


def test_tls_certs_command_warns_when_git_would_see_the_keys(tmp_path, capsys):
    import shutil

    if shutil.which("git") is None:
        pytest.skip("git not installed")
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True, timeout=30)
    args = _parser().parse_args(["tls-certs", "--out", str(repo / "tls")])
    assert args.func(args) == 0
    assert "not git-ignored" in capsys.readouterr().err
    (repo / ".gitignore").write_text("tls/\n")
    args = _parser().parse_args(["tls-certs", "--out", str(repo / "tls"), "--force"])
    assert args.func(args) == 0
    assert "warning" not in capsys.readouterr().err


def test_sarcube_cli_has_the_tls_certs_command():
    from sarcube.cli import build_parser

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert "tls-certs" in sorted(sub.choices), (
        "sarcube/cli.py build_parser: add_tls_certs_parser(sub)"
    )


def test_dask_client_connects_to_a_tls_scheduler_with_sarcube_tls_dir(tls_cluster, monkeypatch):
    """What `sarcube ingest/shards/predict --scheduler tls://…` do: sarcube.cluster.dask_client
    takes the certificates from SARCUBE_TLS_DIR (sarcube.security.security_for)."""
    from sarcube.cluster import dask_client

    certs, _, address = tls_cluster
    monkeypatch.setenv(TLS_DIR_ENV, str(certs))
    with dask_client(scheduler=address) as client:
        assert client.submit(lambda: 6 * 7, pure=False).result(timeout=30) == 42
