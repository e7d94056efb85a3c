"""The analyst notebooks (notebooks/): executed top to bottom against a small demo's outputs.

One ``sarcube demo`` on ``SMALL_BBOX`` (about a minute) feeds every notebook; each runs in a fresh
``python3`` kernel of this interpreter (ipykernel) with its parameters in environment variables,
as an analyst would run it, once with the cube on the test S3 server. The notebooks in git must
carry no outputs.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from unittest import mock

import nbformat
import pytest
from conftest import REPO

NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = ("01_datacube_tour.ipynb", "02_sampling.ipynb", "03_training_and_maps.ipynb")


@pytest.fixture(scope="module")
def python3_kernel(tmp_path_factory):
    """A ``python3`` kernelspec running this interpreter, first on JUPYTER_PATH for the module
    (so that a user-level ``python3`` kernel of another Python cannot be picked up)."""
    base = tmp_path_factory.mktemp("jupyter")
    spec = base / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel = {"argv": argv, "display_name": "Python 3 (sarcube tests)", "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(kernel))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(base))
        yield "python3"


@pytest.fixture(scope="module")
def workdir(small_demo, python3_kernel) -> Path:
    """A folder holding ``demo-output/``: the session's demo on the small area (``SMALL_BBOX``)."""
    return small_demo[0]


def execute(name: str, cwd: Path, **env: str) -> nbformat.NotebookNode:
    """Run notebook ``name`` in ``cwd`` with ``env`` (and no other SARCUBE_* variables).

    The kernel inherits this process's environment, so the parameters cell sees ``env``.
    A failing cell raises ``CellExecutionError`` with its traceback.
    """
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    with mock.patch.dict(os.environ, env):
        for key in [k for k in os.environ if k.startswith("SARCUBE_") and k not in env]:
            del os.environ[key]
        client = NotebookClient(
            nb,
            timeout=180,
            startup_timeout=120,
            kernel_name="python3",
            resources={"metadata": {"path": str(cwd)}},
        )
        client.execute()
    return nb


def outputs(nb: nbformat.NotebookNode) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


def n_figures(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in o.get("data", {}) for o in outputs(nb))


def text(nb: nbformat.NotebookNode) -> str:
    """Everything the notebook printed or displayed as text (streams, plain text, Markdown)."""
    parts = []
    for o in outputs(nb):
        if o.output_type == "stream":
            parts.append(o.text)
        for mime in ("text/plain", "text/markdown"):
            parts.append(o.get("data", {}).get(mime, ""))
    return "\n".join(parts)


def assert_ran_clean(nb: nbformat.NotebookNode) -> None:
    errors = [o for o in outputs(nb) if o.output_type == "error"]
    assert not errors, [f"{e.ename}: {e.evalue}" for e in errors]
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), "a code cell did not run"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_in_git_is_cleared_and_parametrised(name):
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    for cell in code:
        assert cell.outputs == [], f"{name}: a cell has outputs (clear them before committing)"
        assert cell.execution_count is None, f"{name}: a cell has an execution count"
    first = code[0]
    assert "parameters" in first.metadata.get("tags", []), f"{name}: first cell not tagged"
    assert 'os.environ.get("SARCUBE_DEMO"' in first.source
    assert any(c.cell_type == "markdown" for c in nb.cells)


@pytest.mark.slow  # the module's demo takes about a minute
def test_datacube_tour(workdir):
    nb = execute("01_datacube_tour.ipynb", workdir)  # default paths: ./demo-output
    assert_ran_clean(nb)
    assert n_figures(nb) >= 3  # SAR | labels, time series, per-class histograms
    out = text(nb)
    assert "demo-output/cube.zarr: 1024 × 1024 cells, CRS EPSG:4326" in out
    assert "2022-09-12" in out and "forest" in out


@pytest.mark.slow  # the module's demo takes about a minute
def test_datacube_tour_on_s3(workdir, s3):
    s3.fs().put(
        str(workdir / "demo-output" / "cube.zarr"), f"{s3.bucket}/cube.zarr", recursive=True
    )
    url = s3.url("cube.zarr")
    nb = execute(
        "01_datacube_tour.ipynb",
        workdir,
        SARCUBE_CUBE=url,
        SARCUBE_STORAGE_OPTIONS=json.dumps(s3.storage_options),
    )
    assert_ran_clean(nb)
    assert n_figures(nb) >= 3
    assert f"{url}: 1024 × 1024 cells" in text(nb)


@pytest.mark.slow  # the module's demo takes about a minute
def test_sampling(workdir):
    nb = execute("02_sampling.ipynb", workdir, SARCUBE_N_CHECK="3")
    assert_ran_clean(nb)
    assert n_figures(nb) >= 3  # class shares, patches on the map, a re-cut sample
    out = text(nb)
    assert "recut check OK: 3 samples of split 'train'" in out
    assert "cube (before)" in out and "solar panel" in out


@pytest.mark.slow  # the module's demo takes about a minute
def test_training_and_maps(workdir):
    nb = execute("03_training_and_maps.ipynb", workdir)
    assert_ran_clean(nb)
    assert n_figures(nb) >= 3  # curves, test IoU per class, map vs truth
    out = text(nb)
    assert "| Method | Water | Built-up |" in out  # the evaluation table (Markdown)
    assert "pixel accuracy" in out and "mIoU" in out
    assert "note:" not in out  # every output of the demo is there


@pytest.mark.slow  # the module's demo takes about a minute
def test_training_and_maps_without_optional_outputs(workdir, tmp_path):
    """A run without pretraining and without a map: notes instead of errors."""
    demo = tmp_path / "partial"
    demo.mkdir()
    for name in ("cube.zarr", "finetune"):
        (demo / name).symlink_to(workdir / "demo-output" / name)
    nb = execute("03_training_and_maps.ipynb", tmp_path, SARCUBE_DEMO=str(demo))
    assert_ran_clean(nb)
    out = text(nb)
    assert f"note: no pretraining log at {demo}/pretrain/metrics.jsonl" in out
    assert f"note: no predictions at {demo}/predictions.zarr" in out
    assert n_figures(nb) >= 2  # the fine-tuning curves and the test IoU are still shown
