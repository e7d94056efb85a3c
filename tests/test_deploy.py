"""deploy/ (issue 9), checked offline: the image definition, the compose stack, the Kubernetes
manifests, the HPC job scripts and every command line written in them.

- compose: the Compose Specification schema (check-jsonschema's vendored copy) and the stack's shape
  (scalable workers, dashboard port, GPU reservation in a profile, credentials from the env file);
- Kubernetes: built-in kinds with ``kubernetes-validate --strict``; the custom resources
  (DaskCluster, DaskJob, TrainJob) against ``deploy/k8s/schemas/crds.schema.json``, their embedded
  pod and service specs wrapped into a ``Pod`` / ``Service`` and validated strictly as well;
  cross-references (Secret / ConfigMap names and keys, scheduler selectors, rendezvous names);
- shell: ``bash -n`` and ``shellcheck`` (also the scripts embedded in manifests), and the HPC
  scripts run for real with stand-ins for ``mpirun`` / ``srun`` / ``torchrun``;
- YAML: ``yamllint`` with ``deploy/.yamllint``;
- Dockerfile: variant build argument, non-root user, no credentials, the README's install command;
- every ``sarcube …``, ``torchrun …`` and ``python -m training.…`` line (found by
  ``helpers.shell_commands``): the real argument parsers, and config overrides against the
  training config.

Each validator is also shown a broken input, so a check that silently passes everything fails.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from helpers.shell_commands import (
    PLACEHOLDER,
    TRAINING_MODULES,
    all_commands,
    commands_in_shell,
    expand,
    sarcube_subcommands,
)

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
BIN = Path(sys.executable).parent
CRD_KINDS = ("DaskCluster", "DaskJob", "TrainJob")
INSTALL_COMMAND = "bash tools/bootstrap.sh"  # what `make demo` / `make test` run (Makefile `env`)


def _tool(name: str) -> list[str]:
    """A validator of the test extras, from this interpreter's environment."""
    modules = {"check-jsonschema": "check_jsonschema", "yamllint": "yamllint"}
    if name in modules:
        return [sys.executable, "-m", modules[name]]
    exe = BIN / name
    assert exe.exists(), f"{exe} missing: install the test extras (pip install -e '.[test]')"
    return [str(exe)]


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("cwd", REPO)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


def _yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _k8s_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in sorted(K8S.glob("*.yaml")) for d in _yaml_docs(p)]


# -- YAML and shell ------------------------------------------------------------------------------


def test_every_yaml_file_passes_yamllint(tmp_path):
    files = sorted({*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")})
    assert {p.name for p in files} >= {"compose.yaml", "daskcluster.yaml", "trainjob.yaml"}
    out = _run([*_tool("yamllint"), "-c", "deploy/.yamllint", "-f", "parsable", *map(str, files)])
    assert out.returncode == 0, out.stdout + out.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: 1\na: 2\nb:  [1,2]\n")  # duplicate key, spacing
    out = _run([*_tool("yamllint"), "-c", "deploy/.yamllint", str(bad)])
    assert out.returncode != 0


def _shell_scripts() -> list[Path]:
    return sorted(DEPLOY.rglob("*.sh"))


def test_shell_scripts_parse_and_pass_shellcheck(tmp_path):
    scripts = _shell_scripts()
    assert {p.name for p in scripts} >= {"pbs_torchrun.sh", "pbs_mpirun.sh", "slurm_torchrun.sh"}
    for p in scripts:
        out = _run(["bash", "-n", str(p)])
        assert out.returncode == 0, f"{p}: {out.stderr}"
    # scripts embedded in manifests (`bash -c` / `sh -c` containers)
    embedded = []
    for path, doc in _k8s_docs():
        for i, c in enumerate(_containers(doc)):
            cmd = list(c.get("command") or []) + list(c.get("args") or [])
            if len(cmd) >= 3 and cmd[0] in ("bash", "sh") and cmd[1] == "-c":
                f = tmp_path / f"{path.stem}-{i}.sh"
                f.write_text(f"#!/bin/{cmd[0]}\n{cmd[2]}")
                embedded.append(f)
    assert embedded, "the DaskJob runner script was not found"
    rel = [str(p.relative_to(REPO)) for p in scripts]
    out = _run([*_tool("shellcheck"), "--external-sources", *rel, *map(str, embedded)])
    assert out.returncode == 0, out.stdout + out.stderr
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/bin/bash\nrm $1\n")  # unquoted expansion
    assert _run([*_tool("shellcheck"), str(bad)]).returncode != 0


# -- Dockerfile, .dockerignore, lock -------------------------------------------------------------


def _project() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in path.read_text().splitlines():
        s = line.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        if buf and s.startswith("#"):
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        buf += s
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


SECRET_NAME = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL)", re.IGNORECASE)


def test_dockerfile_variant_user_no_credentials_and_documented_install():
    ins = _dockerfile_instructions(DEPLOY / "Dockerfile")
    kinds = [k for k, _ in ins]
    assert kinds.count("FROM") == 1
    args = dict(a.partition("=")[::2] for k, a in ins if k == "ARG")
    assert args.get("VARIANT") == "cpu", "build argument VARIANT (cpu | cuda) with default cpu"
    runs = [a for k, a in ins if k == "RUN"]
    variant_run = next(r for r in runs if "VARIANT" in r)
    assert re.search(r"cpu\)", variant_run) and re.search(r"cuda\)", variant_run)
    assert "https://download.pytorch.org/whl/" in variant_run

    # torch within the project's requirement, and the torchvision release built for it
    # (torchvision 0.N+15 goes with torch 2.N)
    from packaging.requirements import Requirement

    torch_req = next(r for r in map(Requirement, _project()["dependencies"]) if r.name == "torch")
    assert torch_req.specifier.contains(args["TORCH_VERSION"])
    t_major, t_minor = map(int, args["TORCH_VERSION"].split(".")[:2])
    assert [int(x) for x in args["TORCHVISION_VERSION"].split(".")[:2]] == [0, t_minor + 15]
    assert t_major == 2

    # install step: the README's set-up command, constrained by the lock, run as the user
    assert INSTALL_COMMAND in (REPO / "Makefile").read_text()
    assert "tools/bootstrap.sh" in (REPO / "README.md").read_text()
    install = [i for i, (k, a) in enumerate(ins) if k == "RUN" and INSTALL_COMMAND in a]
    assert len(install) == 1, f"one RUN with `{INSTALL_COMMAND}`"
    assert "deploy/requirements.lock" in ins[install[0]][1]
    users = [(i, a) for i, (k, a) in enumerate(ins) if k == "USER"]
    assert users and users[-1][1].split(":")[0] not in ("root", "0"), "final USER must not be root"
    assert min(i for i, _ in users) < install[0], "install as the non-root user"

    # no credentials baked in
    for k, a in ins:
        if k in ("ENV", "ARG", "LABEL"):
            for name in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", a) or [a.split()[0]]:
                assert not SECRET_NAME.search(name), f"{k} {name}: credentials are run-time only"
        if k in ("COPY", "ADD"):
            assert ".env" not in a.split() and ".aws" not in a
    assert not re.search(r"AKIA[0-9A-Z]{16}", (DEPLOY / "Dockerfile").read_text())


def _dockerignore_excludes(rel: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore semantics, enough for this file: last matching rule wins, `!`
    re-includes, `**` spans directories, a match on a parent directory excludes its contents."""

    def rx(p: str) -> re.Pattern:
        out = ""
        i = 0
        while i < len(p):
            if p.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif p.startswith("**", i):
                out, i = out + ".*", i + 2
            elif p[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif p[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(p[i]), i + 1
        return re.compile(out + r"\Z")

    parts = rel.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for pat in patterns:
        neg = pat.startswith("!")
        r = rx(pat.lstrip("!").strip("/"))
        if any(r.match(c) for c in candidates):
            excluded = not neg
    return excluded


def test_dockerignore_keeps_sources_and_drops_secrets_and_environments():
    patterns = [
        ln.strip()
        for ln in (REPO / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.strip().startswith("#")
    ]
    for rel in (
        ".venv/bin/python",
        ".git/HEAD",
        "deploy/.env",
        ".env",
        "notebooks/.env",
        "demo-output/cube.zarr/zarr.json",
        "sarcube/__pycache__/cli.cpython-311.pyc",
        "sarcube.egg-info/PKG-INFO",
    ):
        assert _dockerignore_excludes(rel, patterns), f"{rel} must not reach the build context"
    for rel in (
        "pyproject.toml",
        "README.md",
        "Makefile",
        "tools/bootstrap.sh",
        "tools/fix_torchvision.py",
        "sarcube/cli.py",
        "training/configs/simmim_paper.yaml",
        "deploy/requirements.lock",
        "deploy/create_bucket.py",
        "training/data/__init__.py",
    ):
        assert (REPO / rel).exists(), rel
        assert not _dockerignore_excludes(rel, patterns), f"{rel} is needed by the image"


def test_requirements_lock_pins_every_dependency_except_the_variant_ones():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lines = [
        ln.strip()
        for ln in (DEPLOY / "requirements.lock").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    pins = {}
    for ln in lines:
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", ln)
        assert m, f"not an exact pin: {ln!r}"
        name = canonicalize_name(m.group(1))
        assert name not in pins, f"{name} pinned twice"
        pins[name] = m.group(2)
    for name in pins:
        assert not re.fullmatch(r"torch|torchvision|triton|pip|nvidia-.*", name), name
    project = _project()
    wanted = [*project["dependencies"], *project["optional-dependencies"]["test"], "jupyterlab"]
    for spec in wanted:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        if name == "torch":
            continue
        assert name in pins, f"{name} missing from deploy/requirements.lock (bash deploy/lock.sh)"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"lock pins {name}=={pins[name]}, pyproject wants {req.specifier}: bash deploy/lock.sh"
        )


# -- compose -------------------------------------------------------------------------------------


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_file_matches_the_compose_specification(tmp_path):
    check = [*_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec"]
    out = _run([*check, str(DEPLOY / "compose.yaml")])
    assert out.returncode == 0, out.stdout + out.stderr
    broken = _compose()
    broken["services"]["worker"]["comand"] = ["dask", "worker"]  # a typo the schema must catch
    bad = tmp_path / "compose.yaml"
    bad.write_text(yaml.safe_dump(broken))
    assert _run([*check, str(bad)]).returncode != 0


def test_compose_stack_shape():
    c = _compose()
    s = c["services"]
    assert {"s3", "createbucket", "scheduler", "worker", "jupyter", "trainer"} <= set(s)
    assert "minio" not in json.dumps(c).lower()
    assert "seaweedfs" in s["s3"]["image"] and "-s3" in s["s3"]["command"]
    # scalable workers: no fixed name, no host ports; the scheduler's dashboard is published
    assert "container_name" not in s["worker"] and "ports" not in s["worker"]
    assert "tcp://scheduler:8786" in s["worker"]["command"]
    assert any(str(p).endswith(":8787") for p in s["scheduler"]["ports"])
    assert any(str(p).endswith(":8888") for p in s["jupyter"]["ports"])
    assert any(v.startswith("../notebooks:") for v in s["jupyter"]["volumes"])
    # GPU trainer only with --profile gpu
    t = s["trainer"]
    assert t["profiles"] == ["gpu"]
    (dev,) = t["deploy"]["resources"]["reservations"]["devices"]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
    assert t["build"]["args"]["VARIANT"] == "cuda" and t.get("shm_size")
    assert s["createbucket"]["command"][:2] == ["python", "deploy/create_bucket.py"]
    for name in ("worker", "jupyter"):
        assert (
            s[name]["depends_on"]["createbucket"]["condition"] == "service_completed_successfully"
        )
    # every sarcube container gets the env file; nothing secret is written in the compose file
    for name, svc in s.items():
        if name == "s3":
            continue
        assert svc["env_file"][0]["path"] == ".env", name
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile" and svc["build"]["context"] == ".."
        env = svc.get("environment", {})
        assert not any(SECRET_NAME.search(k) for k in env), f"{name}: credentials belong in .env"
    identities = c["configs"]["s3-identities"]["content"]
    assert "${AWS_ACCESS_KEY_ID" in identities and "${AWS_SECRET_ACCESS_KEY" in identities


def test_env_example_lists_the_compose_variables_and_env_is_git_ignored():
    text = (DEPLOY / "compose.yaml").read_text() + (DEPLOY / "compose.tls.yaml").read_text()
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", text))
    example = dict(
        ln.split("=", 1)
        for ln in (DEPLOY / "env.example").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    )
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "JUPYTER_TOKEN"):
        assert key in example, key
    assert used <= set(example), f"not in deploy/env.example: {sorted(used - set(example))}"
    assert "change-me" in example["AWS_SECRET_ACCESS_KEY"]  # a placeholder, not a key
    assert example["AWS_ENDPOINT_URL"] == "http://s3:8333"  # the compose service
    assert ".env" in (DEPLOY / ".gitignore").read_text().split()
    if (REPO / ".git").exists():  # a checkout (not an unpacked archive): ask git itself
        ignored = _run(["git", "check-ignore", "-q", "deploy/.env"])
        assert ignored.returncode == 0, "deploy/.env must be git-ignored"
        assert _run(["git", "check-ignore", "-q", "deploy/env.example"]).returncode == 1


def _env_example() -> dict[str, str]:
    return dict(
        ln.split("=", 1)
        for ln in (DEPLOY / "env.example").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    )


def _published_ip(port, known: dict[str, str]) -> str | None:
    """The host address a compose port entry publishes on (None: every interface)."""
    if isinstance(port, dict):  # long syntax
        return expand(str(port.get("host_ip", "")), known) or None
    spec = expand(str(port), known).split("/")[0]
    if spec.startswith("["):  # [::1]:8786:8786
        return spec[1 : spec.index("]")]
    parts = spec.split(":")
    return parts[0] if len(parts) == 3 else None  # HOST:CONTAINER or CONTAINER: all interfaces


def _compose_files() -> dict[str, dict]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted(DEPLOY.glob("compose*.yaml"))}


def test_compose_publishes_every_port_on_loopback_by_default():
    """A Dask scheduler runs any Python a client sends: nothing may listen beyond this machine
    unless the user opts in (SARCUBE_BIND), with the defaults of compose.yaml and of env.example
    (the deploy/.env a user starts from)."""
    files = _compose_files()
    assert {"compose.yaml", "compose.tls.yaml"} <= set(files)
    example = _env_example()
    published = 0
    for name, doc in files.items():
        for svc_name, svc in doc["services"].items():
            where = f"{name} service {svc_name}"
            assert svc.get("network_mode") != "host", f"{where}: host networking publishes all"
            for port in svc.get("ports", []):
                published += 1
                for known in ({}, example):
                    ip = _published_ip(port, known)
                    assert ip == "127.0.0.1", f"{where}: {port!r} publishes on {ip or 'all'}"
    assert published >= 4  # s3, scheduler, dashboard, jupyter
    ports = {str(p) for p in files["compose.yaml"]["services"]["scheduler"]["ports"]}
    assert any(p.startswith("${SARCUBE_BIND:-127.0.0.1}:") for p in ports)  # the opt-in
    for var in ("SARCUBE_BIND", "DASK_DASHBOARD_BIND", "JUPYTER_BIND"):
        assert example[var] == "127.0.0.1", var
    # the check itself catches the usual forms of "every interface"
    for bad in (
        "8786:8786",
        "${DASK_SCHEDULER_PORT:-8786}:8786",
        "8786",
        "0.0.0.0:8786:8786",
        "${SARCUBE_BIND:-0.0.0.0}:8786:8786",
        {"target": 8786, "published": 8786},
    ):
        assert _published_ip(bad, {}) != "127.0.0.1", bad
    assert _published_ip({"target": 1, "host_ip": "127.0.0.1"}, {}) == "127.0.0.1"


def _dask_cli(argv: list[str], tls_dir: Path, where: str) -> dict:
    """``dask scheduler …`` / ``dask worker …`` parsed by Dask's own command (click), the
    in-container certificate folder mapped onto ``tls_dir`` (the options need existing files)."""
    from distributed.cli import dask_scheduler, dask_worker

    assert argv[0] == "dask" and argv[1] in ("scheduler", "worker"), where
    cmd = {"scheduler": dask_scheduler.main, "worker": dask_worker.main}[argv[1]]
    args = [
        re.sub(r"^(/etc/sarcube/tls|/run/sarcube-tls)/", f"{tls_dir}/", expand(str(a), {}))
        for a in argv[2:]
    ]
    try:
        return cmd.make_context(f"dask {argv[1]}", args).params
    except Exception as e:  # click's usage errors
        pytest.fail(f"{where}: {shlex.join(argv)}: {e}")


def _check_dask_tls(argv: list[str], tls_dir: Path, where: str, scheduler: str | None = None):
    params = _dask_cli(argv, tls_dir, where)
    assert params["tls_ca_file"] == str(tls_dir / "ca.pem"), where
    assert params["tls_cert"] == str(tls_dir / "cluster.pem"), where
    assert params["tls_key"] == str(tls_dir / "cluster.key"), where
    if argv[1] == "scheduler":
        assert params["protocol"] == "tls", f"{where}: the scheduler must listen on tls:// only"
    else:
        assert params["scheduler"] == scheduler, where
        assert params["scheduler"].startswith("tls://"), where
    return params


def test_compose_tls_override_secures_every_dask_process(tmp_path):
    from sarcube.security import generate_tls_certs

    tls = tmp_path / "tls"
    generate_tls_certs(tls)
    check = [*_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec"]
    out = _run([*check, str(DEPLOY / "compose.tls.yaml")])
    assert out.returncode == 0, out.stdout + out.stderr
    files = _compose_files()
    base, over = files["compose.yaml"]["services"], files["compose.tls.yaml"]["services"]
    assert set(over) <= set(base), "the override only changes services of compose.yaml"
    assert {"scheduler", "worker", "jupyter", "sarcube"} <= set(over)
    # base commands run without TLS, on the stack's own network
    _dask_cli(base["scheduler"]["command"], tls, "compose.yaml scheduler")
    _dask_cli(base["worker"]["command"], tls, "compose.yaml worker")
    _check_dask_tls(over["scheduler"]["command"], tls, "compose.tls.yaml scheduler")
    w = _check_dask_tls(
        over["worker"]["command"], tls, "compose.tls.yaml worker", scheduler="tls://scheduler:8786"
    )
    assert w["nthreads"] == 2 and w["memory_limit"] == "4GiB"  # same settings as compose.yaml
    for name, svc in over.items():
        env = svc["environment"]
        assert env["DASK_SCHEDULER_ADDRESS"] == "tls://scheduler:8786", name
        assert env["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"] == "True", name
        for key, f in (
            ("CA_FILE", "ca.pem"),
            ("CLIENT__CERT", "cluster.pem"),
            ("CLIENT__KEY", "cluster.key"),
        ):
            assert env[f"DASK_DISTRIBUTED__COMM__TLS__{key}"] == f"/run/sarcube-tls/{f}", name
        assert env["SARCUBE_TLS_DIR"] == "/run/sarcube-tls", name
        (mount,) = [v for v in svc["volumes"] if ":/run/sarcube-tls" in v]
        assert mount == "${TLS_DIR:-./tls}:/run/sarcube-tls:ro", name
    # the certificates: deploy/tls by default, never in git, never in the build context
    assert _env_example()["TLS_DIR"] == "./tls"
    assert "tls/" in (DEPLOY / ".gitignore").read_text().split()
    patterns = [
        ln.strip()
        for ln in (REPO / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.strip().startswith("#")
    ]
    for f in ("ca.pem", "ca.key", "cluster.pem", "cluster.key"):
        assert _dockerignore_excludes(f"deploy/tls/{f}", patterns), f
    if (REPO / ".git").exists():
        assert _run(["git", "check-ignore", "-q", "deploy/tls/cluster.key"]).returncode == 0


def test_create_bucket_script_against_a_real_s3_server(s3, monkeypatch, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("create_bucket", DEPLOY / "create_bucket.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    monkeypatch.setenv("SARCUBE_BUCKET", "sarcube-deploy")
    assert mod.main(["--timeout", "20"]) == 0
    first = capsys.readouterr()
    assert "created" in first.out and s3.fs().exists("sarcube-deploy")
    assert mod.main([]) == 0 and "exists" in capsys.readouterr().out  # idempotent
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in first.out + first.err
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert mod.main([]) == 1 and "AWS_SECRET_ACCESS_KEY" in capsys.readouterr().err


# -- Kubernetes ----------------------------------------------------------------------------------


def _containers(doc: dict) -> Iterator[dict]:
    for spec in _pod_specs(doc).values():
        yield from spec.get("containers", [])


def _pod_specs(doc: dict) -> dict[str, dict]:
    """Every PodSpec of a manifest, by its path; a TrainJob's trainer as the Pod it becomes."""
    kind, spec = doc.get("kind"), doc.get("spec", {})
    if kind == "Job":
        return {"spec.template.spec": spec["template"]["spec"]}
    if kind == "DaskCluster":
        return {
            "spec.worker.spec": spec["worker"]["spec"],
            "spec.scheduler.spec": spec["scheduler"]["spec"],
        }
    if kind == "DaskJob":
        cl = spec["cluster"]["spec"]
        return {
            "spec.job.spec": spec["job"]["spec"],
            "spec.cluster.spec.worker.spec": cl["worker"]["spec"],
            "spec.cluster.spec.scheduler.spec": cl["scheduler"]["spec"],
        }
    if kind == "TrainJob":
        return {"spec.trainer": _trainjob_pod(doc)}
    return {}


def _trainjob_pod(doc: dict) -> dict:
    """The node Pod a TrainJob makes: the trainer's container plus its runtime patches."""
    tr = doc["spec"]["trainer"]
    node = {"name": "node", "image": tr["image"], "command": tr["command"]}
    for key, field in (("args", "args"), ("env", "env"), ("resourcesPerNode", "resources")):
        if key in tr:
            node[field] = copy.deepcopy(tr[key])
    pod: dict = {"containers": [node]}
    for patch in doc["spec"].get("runtimePatches", []):
        jobs = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
        for job in jobs:
            if job["name"] != "node":
                continue
            pspec = copy.deepcopy(job["template"]["spec"]["template"]["spec"])
            for c in pspec.pop("containers", []):
                assert c["name"] == "node", "runtime patches here target the node container"
                node.update({k: v for k, v in c.items() if k != "name"})
            pod.update(pspec)
    return pod


def _scheduler_services(doc: dict) -> dict[str, dict]:
    if doc.get("kind") == "DaskCluster":
        return {"spec.scheduler.service": doc["spec"]["scheduler"]["service"]}
    if doc.get("kind") == "DaskJob":
        return {
            "spec.cluster.spec.scheduler.service": doc["spec"]["cluster"]["spec"]["scheduler"][
                "service"
            ]
        }
    return {}


def _kubernetes_validate(files: list[Path]) -> subprocess.CompletedProcess:
    return _run([*_tool("kubernetes-validate"), "--strict", *map(str, files)])


def test_kubernetes_manifests_validate_strictly(tmp_path):
    docs = _k8s_docs()
    kinds = {d["kind"] for _, d in docs}
    assert {"Secret", "ConfigMap", "Job", "Service", *CRD_KINDS} <= kinds
    files = []
    for n, (path, doc) in enumerate(docs):
        if doc["kind"] in CRD_KINDS:
            # embedded specs, as the operators will create them
            for where, spec in _pod_specs(doc).items():
                pod = {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": f"{doc['metadata']['name']}-{n}"},
                    "spec": spec,
                }
                files.append(tmp_path / f"{path.stem}-{n}-{where}.yaml")
                files[-1].write_text(yaml.safe_dump(pod))
            for where, svc in _scheduler_services(doc).items():
                service = {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {"name": f"{doc['metadata']['name']}-scheduler"},
                    "spec": svc,
                }
                files.append(tmp_path / f"{path.stem}-{n}-{where}.yaml")
                files[-1].write_text(yaml.safe_dump(service))
        else:
            files.append(tmp_path / f"{path.stem}-{n}.yaml")
            files[-1].write_text(yaml.safe_dump(doc))
    out = _kubernetes_validate(files)
    assert out.returncode == 0, out.stdout + out.stderr
    passed = [ln for ln in (out.stdout + out.stderr).splitlines() if " passed " in ln]
    assert len(passed) == len(files), out.stdout + out.stderr  # none skipped as unknown

    bad = copy.deepcopy(next(d for _, d in docs if d["kind"] == "Job"))
    bad["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []  # typo
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(bad))
    assert _kubernetes_validate([f]).returncode != 0


def test_custom_resources_match_their_schema():
    import jsonschema

    schema = json.loads((K8S / "schemas" / "crds.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    crds = [d for _, d in _k8s_docs() if d["kind"] in CRD_KINDS]
    assert sorted(d["kind"] for d in crds) == sorted(CRD_KINDS)
    for doc in crds:
        errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc)]
        assert not errors, f"{doc['kind']} {doc['metadata']['name']}: {errors}"

    def fails(doc: dict) -> bool:
        return any(True for _ in validator.iter_errors(doc))

    by_kind = {d["kind"]: d for d in crds}
    broken = copy.deepcopy(by_kind["DaskCluster"])
    del broken["spec"]["worker"]
    assert fails(broken)
    broken = copy.deepcopy(by_kind["DaskJob"])
    broken["spec"]["cluster"]["spec"]["scheduler"]["service"]["ports"] = []
    assert fails(broken)
    broken = copy.deepcopy(by_kind["TrainJob"])
    broken["spec"]["trainer"]["numNode"] = 2  # typo
    assert fails(broken)
    broken = copy.deepcopy(by_kind["TrainJob"])
    broken["apiVersion"] = "kubeflow.org/v1"
    assert fails(broken)


def test_kubernetes_references_resources_and_rendezvous_agree():
    docs = [d for _, d in _k8s_docs()]
    data = {
        (d["kind"], d["metadata"]["name"]): d.get("stringData") or d.get("data") or {}
        for d in docs
        if d["kind"] in ("Secret", "ConfigMap")
    }
    assert set(data[("Secret", "sarcube-s3")]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert all(v == "CHANGE_ME" for v in data[("Secret", "sarcube-s3")].values())  # a template
    for doc in docs:
        for c in _containers(doc):
            where = f"{doc['kind']} {doc['metadata']['name']} container {c['name']}"
            for src in c.get("envFrom", []):
                for kind, key in (("Secret", "secretRef"), ("ConfigMap", "configMapRef")):
                    if key in src:
                        assert (kind, src[key]["name"]) in data, where
            names = {e["name"] for e in c.get("env", [])}
            for e in c.get("env", []):
                ref = e.get("valueFrom", {})
                for kind, key in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
                    if key in ref:
                        assert ref[key]["key"] in data[(kind, ref[key]["name"])], where
            for src in c.get("envFrom", []):
                for kind, key in (("Secret", "secretRef"), ("ConfigMap", "configMapRef")):
                    if key in src:
                        names |= set(data[(kind, src[key]["name"])])
            if c["name"] != "scheduler":  # the Dask scheduler never touches the data
                assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= names, where
                assert not any(
                    "value" in e and SECRET_NAME.search(e["name"]) for e in c.get("env", [])
                ), f"{where}: literal credentials"
            res = c.get("resources", {})
            assert res.get("requests") and res.get("limits"), f"{where}: requests and limits"
            for ref in re.findall(r"\$\(([A-Z_][A-Z0-9_]*)\)", json.dumps(c)):
                assert ref in names | {"DASK_WORKER_NAME"}, f"{where}: $({ref}) is not defined"
        for spec in _pod_specs(doc).values():
            assert spec.get("securityContext", {}).get("runAsNonRoot") is True, doc["kind"]

    by_kind: dict[str, list[dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    # scheduler services select the scheduler of their own cluster (a DaskJob's is the job's name)
    for d in by_kind["DaskCluster"] + by_kind["DaskJob"]:
        (svc,) = _scheduler_services(d).values()
        assert svc["selector"]["dask.org/cluster-name"] == d["metadata"]["name"]
    # training pods: RAM-backed /dev/shm for the DataLoader workers, GPUs = ranks per node
    for d in by_kind["Job"] + by_kind["TrainJob"]:
        (spec,) = _pod_specs(d).values()
        shm = {
            v["name"] for v in spec["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"
        }
        mounts = spec["containers"][0]["volumeMounts"]
        assert any(m["mountPath"] == "/dev/shm" and m["name"] in shm for m in mounts), d["kind"]
    (tj,) = by_kind["TrainJob"]
    tr = tj["spec"]["trainer"]
    assert tj["spec"]["runtimeRef"]["name"] == "torch-distributed"
    assert int(tr["resourcesPerNode"]["limits"]["nvidia.com/gpu"]) == tr["numProcPerNode"]
    # indexed Job: pod i is <job>-i.<service>; node rank = completion index; sizes agree
    (job,) = by_kind["Job"]
    (svc,) = [s for s in by_kind["Service"] if s["metadata"]["name"] == job["metadata"]["name"]]
    js, pod = job["spec"], job["spec"]["template"]["spec"]
    assert js["completionMode"] == "Indexed" and js["completions"] == js["parallelism"]
    assert svc["spec"]["clusterIP"] == "None" and pod["subdomain"] == svc["metadata"]["name"]
    assert svc["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    c = pod["containers"][0]
    ta = _torchrun_args(c["command"] + c["args"])
    assert ta.master_addr == f"{job['metadata']['name']}-0.{svc['metadata']['name']}"
    assert int(ta.nnodes) == js["completions"] and ta.node_rank == "$(JOB_COMPLETION_INDEX)"
    assert int(ta.nproc_per_node) == int(c["resources"]["limits"]["nvidia.com/gpu"])
    assert ta.master_port == svc["spec"]["ports"][0]["port"]


def test_kubernetes_dask_clusters_use_tls(tmp_path):
    """Every Dask scheduler in the manifests listens on tls:// only, every worker connects with
    the certificate, and the pipeline runner has it too (Secret sarcube-dask-tls)."""
    from sarcube.security import generate_tls_certs

    tls = tmp_path / "tls"
    generate_tls_certs(tls)
    docs = [d for _, d in _k8s_docs() if d["kind"] in ("DaskCluster", "DaskJob")]
    assert sorted(d["kind"] for d in docs) == ["DaskCluster", "DaskJob"]
    for doc in docs:
        name = doc["metadata"]["name"]
        for where, spec in _pod_specs(doc).items():
            where = f"{doc['kind']} {name} {where}"
            (c,) = spec["containers"]
            tls_volumes = {
                v["name"]
                for v in spec.get("volumes", [])
                if v.get("secret", {}).get("secretName") == "sarcube-dask-tls"
            }
            mounts = [m for m in c.get("volumeMounts", []) if m["name"] in tls_volumes]
            assert [(m["mountPath"], m.get("readOnly")) for m in mounts] == [
                ("/etc/sarcube/tls", True)
            ], where
            # the files are group-readable by the container user only
            (vol,) = [v for v in spec["volumes"] if v["name"] in tls_volumes]
            assert vol["secret"]["defaultMode"] & 0o007 == 0, where
            assert spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsUser"]
            argv = [*(c.get("command") or []), *(c.get("args") or [])]
            if c["name"] == "scheduler":
                _check_dask_tls(argv, tls, where)
            elif c["name"] == "worker":
                _check_dask_tls(argv, tls, where, scheduler=f"tls://{name}-scheduler:8786")
            else:  # the DaskJob runner: sarcube connects with SARCUBE_TLS_DIR
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                assert env["SARCUBE_TLS_DIR"] == "/etc/sarcube/tls", where
                script = argv[-1]
                assert 'sched="tls://${DASK_SCHEDULER_ADDRESS#*://}"' in script, where
                assert script.count('--scheduler "$sched"') == 2, where
    # the check catches a plain scheduler, a plain worker and a mistyped option
    for argv in (
        ["dask", "scheduler", "--port", "8786"],
        [
            "dask",
            "worker",
            "tcp://s:8786",
            "--tls-ca-file",
            "/etc/sarcube/tls/ca.pem",
            "--tls-cert",
            "/etc/sarcube/tls/cluster.pem",
            "--tls-key",
            "/etc/sarcube/tls/cluster.key",
        ],
        ["dask", "scheduler", "--protocol", "tls", "--tls-ca", "/etc/sarcube/tls/ca.pem"],
    ):
        with pytest.raises((AssertionError, pytest.fail.Exception)):
            _check_dask_tls(argv, tls, "broken", scheduler="tls://s:8786")


def _torchrun_args(argv: list[str]) -> argparse.Namespace:
    from torch.distributed.run import get_args_parser

    assert argv[0] == "torchrun"
    ns = get_args_parser().parse_args([expand(a, {}) for a in argv[1:]])
    raw = dict(a.split("=", 1) for a in argv if a.startswith("--node_rank="))
    if raw:  # keep the un-expanded reference for the check above
        ns.node_rank = raw["--node_rank"]
    return ns


# -- command lines -------------------------------------------------------------------------------


# (found in the files by helpers.shell_commands; parsed here with the real parsers)


def _parse(parser: argparse.ArgumentParser, argv: list[str], where: str, intermixed: bool = False):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_intermixed_args(argv) if intermixed else parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: {shlex.join(argv)}\n{err.getvalue()}")


def _check_config(config: str, overrides: list[str], method: str | None, where: str) -> None:
    from training.config import ConfigError, load_config

    if config == PLACEHOLDER:  # a variable without a default
        return
    try:
        load_config(config, [o for o in overrides if o != PLACEHOLDER], method=method)
    except ConfigError as e:
        pytest.fail(f"{where}: {e}")


def _check_module(module: str, argv: list[str], where: str) -> argparse.Namespace:
    import importlib

    from sarcube.storage import parse_storage_options

    ns = _parse(importlib.import_module(module).build_parser(), argv, where, intermixed=True)
    parse_storage_options([s for s in ns.storage_option if "=" in s])
    if module == "training.pretrain":
        _check_config(ns.config, ns.overrides, ns.method, where)
    else:
        task = [f"seg.task={ns.task}"] if ns.task else []
        _check_config(ns.config, task + ns.overrides, "finetune", where)
    return ns


def test_every_command_line_in_deploy_parses_with_the_real_parsers():
    from torch.distributed.run import get_args_parser

    from sarcube.cli import build_parser
    from sarcube.storage import parse_storage_options

    commands = all_commands(DEPLOY, REPO)
    seen = set()
    for source, kind, argv in commands:
        where = f"{source} ({kind})"
        if kind == "sarcube":
            ns = _parse(build_parser(), argv, where)
            parse_storage_options([s for s in getattr(ns, "storage_option", []) if "=" in s])
            if ns.command == "pretrain":
                _check_config(ns.config, ns.overrides, ns.method, where)
            elif ns.command in ("finetune", "ablation"):
                task = [f"seg.task={ns.task}"] if getattr(ns, "task", None) else []
                _check_config(ns.config, task + ns.overrides, "finetune", where)
            seen.add((source, ns.command))
        elif kind == "torchrun":
            ns = _parse(get_args_parser(), argv, where)
            if ns.module and ns.training_script in TRAINING_MODULES:
                _check_module(ns.training_script, ns.training_script_args, where)
                seen.add((source, f"torchrun {ns.training_script}"))
            else:
                seen.add((source, "torchrun"))
        else:
            _check_module(kind, argv, where)
            seen.add((source, kind))
    # the extraction found what the files contain (it must not pass vacuously)
    expected = {
        ("deploy/compose.yaml", "pretrain"),
        ("deploy/k8s/daskjob-pipeline.yaml", "ingest"),
        ("deploy/k8s/daskjob-pipeline.yaml", "sample"),
        ("deploy/k8s/daskjob-pipeline.yaml", "shards"),
        ("deploy/k8s/daskcluster.yaml", "ingest"),
        ("deploy/k8s/trainjob.yaml", "torchrun training.pretrain"),
        ("deploy/k8s/train-indexed-job.yaml", "torchrun training.pretrain"),
        ("deploy/hpc/pbs_torchrun.sh", "training.pretrain"),
        ("deploy/hpc/pbs_mpirun.sh", "training.pretrain"),
        ("deploy/hpc/pbs_mpirun.sh", "training.finetune"),
        ("deploy/hpc/slurm_torchrun.sh", "torchrun training.pretrain"),
        ("deploy/hpc/torchrun-node.sh", "torchrun"),
        *(("deploy/README.md", c) for c in ("synth", "ingest", "sample", "shards", "pretrain")),
    }
    if "tls-certs" in sarcube_subcommands():  # sarcube.security.add_tls_certs_parser
        expected |= {
            ("deploy/README.md", "tls-certs"),
            ("deploy/k8s/daskcluster.yaml", "tls-certs"),
            ("deploy/compose.tls.yaml", "tls-certs"),
        }
    assert expected <= seen, f"not found: {sorted(expected - seen)}"


def test_command_checks_catch_a_broken_line():
    cmds = commands_in_shell(
        "sarcube ingest --scenes s3://b/x/ --cube s3://b/c.zarr --workers two\n"
        "torchrun --nnodes 2 -m training.pretrain --config simmim_paper --out o\n"
        "python -m training.pretrain --config simmim_paper --manifest m --out o schedule.epoch=3\n",
        "inline",
    )
    assert [k for _, k, _ in cmds] == ["sarcube", "torchrun", "training.pretrain"]
    from sarcube.cli import build_parser

    with pytest.raises(pytest.fail.Exception):
        _parse(build_parser(), cmds[0][2], "inline")  # --workers wants an int
    from torch.distributed.run import get_args_parser

    ns = _parse(get_args_parser(), cmds[1][2], "inline")
    with pytest.raises(pytest.fail.Exception):
        _check_module(ns.training_script, ns.training_script_args, "inline")  # no --manifest
    with pytest.raises(pytest.fail.Exception):
        _check_module("training.pretrain", cmds[2][2], "inline")  # unknown config key
    assert expand("${A:-x} $B ${C:?no} $(D) ${E[@]}", {"B": "b"}).split() == ["x", "b", "1", "1"]


# -- HPC scripts, run with stand-ins for the launchers ---------------------------------------------

_RECORDER = """#!/bin/bash
log="$STUB_DIR/$(basename "$0")"
printf '%s\\0' "$@" >"$log.argv"
env >"$log.env"
for ((i = 1; i < $#; i++)); do
  if [ "${!i}" = --hostfile ]; then j=$((i + 1)); cp "${!j}" "$log.hostfile"; fi
done
"""


@pytest.fixture
def stubs(tmp_path):
    d = tmp_path / "stubs"
    d.mkdir()
    for name in ("mpirun", "srun", "torchrun"):
        (d / name).write_text(_RECORDER)
        (d / name).chmod(0o755)
    (d / "scontrol").write_text('#!/bin/bash\nprintf "gpu01\\ngpu02\\n"\n')
    (d / "scontrol").chmod(0o755)
    creds = tmp_path / "s3.env"
    creds.write_text(
        "AWS_ACCESS_KEY_ID=AKIDSTUB\nAWS_SECRET_ACCESS_KEY=stub-secret-value\n"
        "AWS_ENDPOINT_URL=http://127.0.0.1:9\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "OMPI_", "PMI_"))}
    env.update(
        PATH=f"{d}:{BIN}:{os.environ['PATH']}",
        STUB_DIR=str(d),
        SARCUBE_S3_ENV=str(creds),
        SARCUBE_HOME=str(REPO),
        VIRTUAL_ENV=str(BIN.parent),
    )
    return d, env


def _recorded(stub_dir: Path, name: str) -> tuple[list[str], dict[str, str]]:
    argv = (stub_dir / f"{name}.argv").read_text().split("\0")[:-1]
    env = dict(
        ln.split("=", 1) for ln in (stub_dir / f"{name}.env").read_text().splitlines() if "=" in ln
    )
    return argv, env


def test_pbs_torchrun_script_starts_one_torchrun_per_node(stubs, tmp_path):
    d, env = stubs
    nodes = tmp_path / "nodes"
    nodes.write_text("cn01\ncn01\ncn02\ncn02\n")
    out = tmp_path / "run"
    env.update(
        PBS_NODEFILE=str(nodes),
        PBS_O_WORKDIR=str(REPO),
        OUT=str(out),
        OVERRIDES="schedule.epochs=100 data.batch_size=128",
    )
    r = _run(["bash", "deploy/hpc/pbs_torchrun.sh"], env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    argv, menv = _recorded(d, "mpirun")
    assert argv[:4] == ["-np", "2", "-npernode", "1"]
    assert (d / "mpirun.hostfile").read_text().split() == ["cn01", "cn02"]
    assert "stub-secret-value" not in " ".join(argv)  # forwarded by name only
    assert "AWS_SECRET_ACCESS_KEY" in argv and "AWS_ENDPOINT_URL" in argv
    assert menv["MASTER_ADDR"] == "cn01" and menv["NNODES"] == "2"
    node_cmd = argv[argv.index("bash") + 1 :]
    assert node_cmd[0] == "deploy/hpc/torchrun-node.sh"

    # what mpirun would start on the second node
    node_env = {
        **env,
        **{k: menv[k] for k in ("NNODES", "GPUS_PER_NODE", "MASTER_ADDR", "MASTER_PORT")},
        "OMPI_COMM_WORLD_RANK": "1",
    }
    r = _run(["bash", *node_cmd], env=node_env)
    assert r.returncode == 0, r.stdout + r.stderr
    targv, _ = _recorded(d, "torchrun")
    ta = _torchrun_args(["torchrun", *targv])
    assert (ta.nnodes, ta.nproc_per_node, ta.node_rank) == ("2", "8", 1)
    assert (ta.master_addr, ta.master_port) == ("cn01", 29500)
    assert ta.module and ta.training_script == "training.pretrain"
    ns = _check_module("training.pretrain", ta.training_script_args, "pbs_torchrun")
    assert (ns.config, ns.out, ns.resume) == ("simmim_paper", str(out), False)
    assert ns.overrides == ["schedule.epochs=100", "data.batch_size=128"]
    assert ns.storage_option == ["endpoint_url=http://127.0.0.1:9"]

    # a resubmitted job finds the checkpoint and resumes
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"x")
    assert _run(["bash", "deploy/hpc/pbs_torchrun.sh"], env=env).returncode == 0
    argv, _ = _recorded(d, "mpirun")
    assert "--resume" in argv


def test_pbs_mpirun_script_starts_one_rank_per_gpu(stubs, tmp_path):
    d, env = stubs
    nodes = tmp_path / "nodes"
    nodes.write_text("cn07\ncn08\n")
    env.update(PBS_NODEFILE=str(nodes), PBS_O_WORKDIR=str(REPO), OUT=str(tmp_path / "run"))
    r = _run(["bash", "deploy/hpc/pbs_mpirun.sh"], env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    argv, menv = _recorded(d, "mpirun")
    assert argv[:4] == ["-np", "16", "-npernode", "8"]
    assert (d / "mpirun.hostfile").read_text().splitlines() == ["cn07 slots=8", "cn08 slots=8"]
    assert (menv["MASTER_ADDR"], menv["MASTER_PORT"]) == ("cn07", "29500")
    i = argv.index("python")
    assert argv[i + 1 : i + 3] == ["-m", "training.pretrain"]
    _check_module("training.pretrain", argv[i + 3 :], "pbs_mpirun")

    env.update(TASK="water", PRETRAINED="none")
    r = _run(["bash", "deploy/hpc/pbs_mpirun.sh"], env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    argv, _ = _recorded(d, "mpirun")
    i = argv.index("python")
    assert argv[i + 1 : i + 3] == ["-m", "training.finetune"]
    ns = _check_module("training.finetune", argv[i + 3 :], "pbs_mpirun finetune")
    assert (ns.task, ns.config, ns.pretrained) == ("water", "finetune_paper", "none")


def test_slurm_script_runs_srun_torchrun_with_c10d_rendezvous(stubs, tmp_path):
    d, env = stubs
    env.update(
        SLURM_NNODES="2",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="gpu[01-02]",
        SLURM_SUBMIT_DIR=str(REPO),
        OUT=str(tmp_path / "run"),
        CONFIG="mixmae_paper",
    )
    r = _run(["bash", "deploy/hpc/slurm_torchrun.sh"], env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    argv, senv = _recorded(d, "srun")
    assert argv[0] == "--kill-on-bad-exit=1" and argv[1] == "torchrun"
    ta = _torchrun_args(argv[1:])
    assert (ta.nnodes, ta.nproc_per_node, ta.rdzv_backend) == ("2", "8", "c10d")
    assert (ta.rdzv_endpoint, ta.rdzv_id) == ("gpu01:29500", "4242")
    ns = _check_module(ta.training_script, ta.training_script_args, "slurm")
    assert ns.config == "mixmae_paper"
    assert senv["AWS_SECRET_ACCESS_KEY"] == "stub-secret-value"  # srun passes the environment on
