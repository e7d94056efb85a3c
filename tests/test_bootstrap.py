"""The set-up step: the torchvision fix is idempotent and leaves timm importable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_fix_torchvision_is_idempotent_and_timm_imports():
    for _ in range(2):
        out = subprocess.run(
            [sys.executable, str(REPO / "tools" / "fix_torchvision.py")],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr
        assert "guarded" not in out.stdout  # already applied by the bootstrap: nothing to do
    out = subprocess.run(
        [sys.executable, "-c", "import timm, torchvision; print(timm.__version__)"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr


def test_bootstrap_second_run_installs_nothing():
    out = subprocess.run(
        ["bash", str(REPO / "tools" / "bootstrap.sh")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    assert "is up to date" in out.stdout
