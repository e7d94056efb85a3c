"""The import layers the README's Layout section states, checked on the source (ast, every import
statement, including those inside functions): ``sarcube`` (data) ← ``training`` (models) ← the
application modules ``sarcube.cli``, ``sarcube.commands``, ``sarcube.demo``."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).parents[1]
APPLICATION = {"sarcube/cli.py", "sarcube/commands.py", "sarcube/demo.py"}


def _imports(path: Path) -> set[str]:
    """Absolute module names that ``path`` imports (relative imports resolved)."""
    parts = path.relative_to(REPO).parts if path.is_relative_to(REPO) else path.parts[-1:]
    package = ".".join(Path(*parts).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[: len(base) - node.level + 1] if node.level else []
            mod = ".".join([*base, node.module] if node.module else base)
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    return out


def _modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def test_the_data_side_never_imports_the_model_side_or_torch():
    offenders = []
    for path in _modules("sarcube"):
        rel = str(path.relative_to(REPO))
        for mod in _imports(path):
            top = mod.split(".")[0]
            if top == "training" and rel not in APPLICATION:
                offenders.append(f"{rel} imports {mod}")
            if top == "torch" and rel not in APPLICATION:
                offenders.append(f"{rel} imports {mod}")
    assert offenders == []


def test_the_model_side_never_imports_the_application_layer():
    app = {p.removesuffix(".py").replace("/", ".") for p in APPLICATION}
    offenders = [
        f"{path.relative_to(REPO)} imports {mod}"
        for path in _modules("training")
        for mod in _imports(path)
        if any(mod == a or mod.startswith(a + ".") for a in app)
    ]
    assert offenders == []


def test_prediction_and_fine_tuning_share_the_segmenter_not_each_other():
    for a, b in (("predict", "finetune"), ("finetune", "predict"), ("evaluation", "finetune")):
        paths = _modules(f"training/{a}") if (REPO / "training" / a).is_dir() else []
        paths += [REPO / "training" / f"{a}.py"] if (REPO / "training" / f"{a}.py").exists() else []
        assert paths, a
        for path in paths:
            bad = [
                m for m in _imports(path) if m == f"training.{b}" or m.startswith(f"training.{b}.")
            ]
            assert bad == [], f"{path.relative_to(REPO)} imports {bad}"


def test_the_checker_sees_an_upward_import(tmp_path):
    """The checker itself can fail: an import inside a function and a relative one are seen."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from training.engine import Trainer\n    import torch.nn\n")
    assert {"training.engine", "torch.nn"} <= _imports(probe)


def test_the_parser_and_the_argument_checks_load_without_torch():
    """``sarcube --help`` and the training commands' checks stay fast: no torch in the process."""
    import subprocess
    import sys

    code = (
        "import sys, sarcube.cli, training.arguments, training.config\n"
        "sarcube.cli.build_parser()\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:5]\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0, p.stderr[-2000:]
