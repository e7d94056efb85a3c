"""``sarcube info``: its figures against independent reads (zarr.json, os.walk, tarfile)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

SARCUBE = [sys.executable, "-m", "sarcube"]


def _info(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SARCUBE, "info", *args], capture_output=True, text=True)


def test_info_of_a_cube_matches_its_files(small_cube):
    p = _info(small_cube, "--json")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    registry = json.loads((Path(small_cube) / "sarcube" / "zarr.json").read_text())["attributes"]
    assert d["kind"] == "cube"
    assert d["dates"] == {
        k: {"status": v["status"], "time_index": v["time_index"]}
        for k, v in registry["slices"].items()
    }
    hh = json.loads((Path(small_cube) / "hh_db" / "zarr.json").read_text())
    assert d["variables"]["hh_db"]["shape"] == hh["shape"]
    assert d["labels"]["status"] == "complete"
    on_disk = sum(
        os.path.getsize(os.path.join(root, f))
        for root, _, files in os.walk(small_cube)
        for f in files
    )
    assert d["bytes_on_disk"] == on_disk
    text = _info(small_cube).stdout
    assert all(f"{date}  complete" in text for date in registry["slices"])


def test_info_of_a_shard_set_counts_what_the_tars_hold(small_shards):
    d = json.loads(_info(str(small_shards), "--json").stdout)
    assert d["kind"] == "shards"
    for split, s in d["splits"].items():
        tars = sorted(Path(small_shards).glob(f"{split}-*.tar"))
        assert s["shards"] == len(tars)
        keys = set()
        for t in tars:
            with tarfile.open(t) as tf:
                keys |= {m.name.split(".", 1)[0] for m in tf.getmembers()}
        assert s["samples"] == len(keys)
        assert s["bytes"] == sum(t.stat().st_size for t in tars)


def test_info_of_something_else_is_one_line(tmp_path):
    p = _info(str(tmp_path))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip() == (
        f"sarcube info: error: {tmp_path}: neither a sarcube cube / predictions store (no "
        "zarr.json) nor a shard set (no manifest.json)"
    )
