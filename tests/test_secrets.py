"""No secret in any output (issue 13): every command of the pipeline run against the S3 server
with distinctive credentials given only as ``--storage-option key=… secret=…`` (the AWS_*
variables removed from the environment, so those options are what is used — by the command,
its Dask workers and its torchrun ranks). Every byte each command prints, every object it
leaves in the bucket and every file in the working directory is searched for the key and the
secret. The working directory stays empty: the outputs of S3 runs go to S3 (no ``runs/``,
``predict-panels/``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import SMALL_BBOX

from sarcube.storage import redact_argv, split_secret_storage_options

REPO = Path(__file__).resolve().parents[1]
KEY = "AKIASARCUBETESTKEY01"
SECRET = "sArCuBe-SeCrEt-0123456789"
NEEDLES = (KEY.encode(), SECRET.encode())
TINY = ["data.batch_size=2", "train.progress=false", "train.tensorboard=false"]


def test_launcher_hands_secrets_over_outside_the_command_line():
    argv = [
        "--manifest",
        "m",
        "--storage-option",
        f"key={KEY}",
        f"--storage-option=secret={SECRET}",
        "--storage-option",
        "endpoint_url=http://h:1",
        "optim.base_lr=1",
    ]
    fwd, secrets = split_secret_storage_options(argv)
    assert fwd == [
        "--manifest",
        "m",
        "--storage-option",
        "endpoint_url=http://h:1",
        "optim.base_lr=1",
    ]
    assert secrets == [f"key={KEY}", f"secret={SECRET}"]
    shown = " ".join(redact_argv(argv))
    assert KEY not in shown and SECRET not in shown
    assert "key=*** --storage-option=secret=***" in shown and "endpoint_url=http://h:1" in shown


def children_with_secrets(parent: int) -> list[str]:
    """The command lines (secrets masked) of the processes other than ``parent`` that have the
    key or secret in /proc/PID/cmdline.

    A process whose command line is byte-identical to the parent's is the parent itself between
    ``fork`` and ``exec`` (every ``subprocess.Popen`` passes through that state for a moment):
    it shows nothing the typed command does not, so it is not counted."""
    try:
        typed = (Path("/proc") / str(parent) / "cmdline").read_bytes()
    except OSError:
        return []
    found = []
    for d in Path("/proc").glob("[0-9]*"):
        if int(d.name) == parent:
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if cmd != typed and any(needle in cmd for needle in NEEDLES):
            shown = cmd.replace(b"\0", b" ").decode(errors="replace")
            found.append(shown.replace(KEY, "<KEY>").replace(SECRET, "<SECRET>"))
    return found


def test_no_secret_in_any_output_and_nothing_in_the_cwd(s3, small_synth, tmp_path):
    fs = s3.fs()
    fs.put(str(small_synth.out), f"{s3.bucket}/synth", recursive=True)
    work = tmp_path / "work"
    work.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
    }
    env.update(
        PYTHONPATH=str(REPO),
        OMP_NUM_THREADS="1",
        AWS_EC2_METADATA_DISABLED="true",
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
    )
    option_args = [
        "--storage-option",
        f"key={KEY}",
        "--storage-option",
        f"secret={SECRET}",
        "--storage-option",
        f"endpoint_url={s3.endpoint}",
    ]
    cube, index, shards = s3.url("cube.zarr"), s3.url("index.parquet"), s3.url("shards")
    printed: list[tuple[str, bytes]] = []

    def sarcube(*argv: str, rc: int = 0) -> subprocess.CompletedProcess:
        """Run a command; meanwhile watch the command lines of its child processes (Dask
        workers, torchrun ranks): only the command as typed may hold the credentials."""
        with (tmp_path / "o").open("w+b") as out, (tmp_path / "e").open("w+b") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "sarcube.cli", *argv],
                cwd=work,
                env=env,
                stdout=out,
                stderr=err,
            )
            seen: list[str] = []
            while proc.poll() is None:
                seen += children_with_secrets(proc.pid)
                time.sleep(0.2)
            out.seek(0), err.seek(0)
            p = subprocess.CompletedProcess(argv, proc.returncode, out.read(), err.read())
        printed.append((argv[0], p.stdout + p.stderr))
        assert p.returncode == rc, (argv[0], p.returncode, p.stdout[-3000:], p.stderr[-5000:])
        assert not seen, (
            f"sarcube {argv[0]}: a child process had the credentials on its command line: {seen}"
        )
        return p

    w, s = SMALL_BBOX[:2]
    sarcube(
        "synth",
        "--out",
        s3.url("synth-mini"),
        "--bbox",
        str(w),
        str(s),
        str(w + 0.02),
        str(s + 0.015),
        "--dates",
        "2022-10-10",
        *option_args,
    )
    sarcube(
        "ingest",
        "--scenes",
        s3.url("synth/scenes"),
        "--lulc",
        s3.url("synth/lulc"),
        "--cube",
        cube,
        "--workers",
        "1",
        *option_args,
    )
    sarcube(
        "sample",
        "--cube",
        cube,
        "--out",
        index,
        "--n-anchors",
        "2000",
        "--block",
        "2",
        *option_args,
    )
    sarcube(
        "shards",
        "--cube",
        cube,
        "--index",
        index,
        "--out",
        shards,
        "--min-shards",
        "2",
        "--shard-size-mb",
        "64",
        "--workers",
        "1",
        *option_args,
    )
    splits = json.loads(fs.cat_file(f"{s3.bucket}/shards/manifest.json"))["splits"]
    p = sarcube(
        "pretrain",
        "--nproc",
        "2",
        "--manifest",
        shards,
        "--out",
        s3.url("runs/pre"),
        *option_args,
        *TINY,
        "schedule.epochs=1",
        "train.max_steps=2",
        "train.figure=false",
    )
    launching = next(ln for ln in p.stdout.decode().splitlines() if ln.startswith("launching:"))
    assert "key=*** --storage-option secret=***" in launching
    assert fs.exists(f"{s3.bucket}/runs/pre/encoder.pth")  # the ranks reached S3 with the options
    split = "test" if "test" in splits else "val"
    sarcube(
        "finetune",
        "--nproc",
        "2",
        "--manifest",
        shards,
        "--pretrained",
        s3.url("runs/pre/encoder.pth"),
        "--out",
        s3.url("runs/ft"),
        *option_args,
        *TINY,
        "seg.eval_batch_size=2",
        "schedule.epochs=1",
        "schedule.warmup_epochs=0",
        f"seg.test_split={split}",
        "seg.panels=1",
    )
    ckpt = s3.url(
        "runs/ft/best.pt" if fs.exists(f"{s3.bucket}/runs/ft/best.pt") else "runs/ft/checkpoint.pt"
    )
    sarcube(
        "evaluate",
        "--checkpoint",
        ckpt,
        "--manifest",
        shards,
        "--split",
        split,
        "--out",
        s3.url("runs/eval"),
        "--device",
        "cpu",
        "--panels",
        "1",
        *option_args,
    )
    bbox = [str(w), str(s + 1792 / 12000), str(w + 256 / 12000), str(s + 2048 / 12000 - 1e-4)]
    sarcube(
        "predict",
        "--cube",
        cube,
        "--checkpoint",
        ckpt,
        "--out",
        s3.url("pred.zarr"),
        "--bbox",
        *bbox,
        "--time",
        "2022-09-01/2022-09-30",
        "--cog",
        s3.url("map.tif"),
        *option_args,
    )
    p = sarcube("unlock", cube, *option_args)
    assert b"not locked" in p.stdout
    p = sarcube(
        "sample",
        "--cube",
        "s3://no-such-bucket-sarcube/cube.zarr",
        "--out",
        index,
        *option_args,
        rc=2,
    )
    assert b"does not exist" in p.stderr and b"Traceback" not in p.stderr

    for cmd, out in printed:
        for needle in NEEDLES:
            assert needle not in out, f"sarcube {cmd} printed {needle!r}"
    objects = fs.find(s3.bucket)
    assert any(o.endswith("pred.zarr/zarr.json") for o in objects)
    assert any(o.endswith(".png") and "/runs/" not in o for o in objects)  # predict's panel
    for obj in objects:
        data = fs.cat_file(obj)
        for needle in NEEDLES:
            assert needle not in data, f"{obj} holds {needle!r}"
    # the outputs of S3 runs went to S3: nothing in the working directory
    assert sorted(p.relative_to(work).as_posix() for p in work.rglob("*")) == []
