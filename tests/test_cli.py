"""The command line: every subcommand parses --help; bad input is one clear line, exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import rasterio

import sarcube
from sarcube.cli import build_parser

SARCUBE = [sys.executable, "-m", "sarcube.cli"]


def run(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*SARCUBE, *args], capture_output=True, text=True, timeout=300, **kw)


def subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


@pytest.mark.parametrize("command", subcommands())
def test_every_subcommand_has_help(command):
    out = run(command, "--help")
    assert out.returncode == 0 and "usage: sarcube" in out.stdout


def test_every_option_of_every_subcommand_says_what_it_is():
    """A newcomer's --help: every option has a help text (the parser itself, no subprocess)."""
    import argparse

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    bare = [
        f"sarcube {name} {'/'.join(action.option_strings) or action.dest}"
        for name, parser in sub.choices.items()
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction) and not action.help
    ]
    assert bare == []


def test_bad_bbox_is_one_line_no_traceback(tmp_path):
    out = run("synth", "--out", str(tmp_path / "o"), "--bbox", "140.2", "36.0", "140.1", "36.1")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.strip() == (
        "sarcube synth: error: bbox W 140.2 S 36.0 E 140.1 N 36.1 is empty (need W < E and S < N)"
    )


def test_synth_cli_writes_readable_files(tmp_path):
    out = run(
        "synth",
        "--out",
        str(tmp_path / "o"),
        "--bbox",
        "140.30",
        "36.02",
        "140.32",
        "36.035",
        "--dates",
        "2022-10-10",
        "--seed",
        "9",
    )
    assert out.returncode == 0, out.stderr
    tifs = sorted(Path(tmp_path / "o").rglob("*.tif"))
    assert [p.parent.name for p in tifs] == ["lulc", "scenes"]
    for p in tifs:
        with rasterio.open(p) as ds:
            assert ds.crs is not None and ds.nodata == 0


def test_demo_on_a_small_area(small_demo):
    work, out = small_demo
    demo = work / "demo-output"
    assert (demo / "summary.json").exists()
    for png in ("synth_overview.png", "cube_overview.png", "index_report.png"):
        assert (demo / png).stat().st_size > 10_000
    assert (demo / "shards" / "manifest.json").exists()
    assert (demo / "pretrain" / "encoder.pth").exists()
    ft = demo / "finetune"
    assert (ft / "best.pt").exists() and (ft / "test" / "panels.png").stat().st_size > 10_000
    report = (ft / "test" / "report.md").read_text()
    assert "| Method | Water | Built-up |" in report
    assert "| Method | Water | Built-up |" in out.stdout  # the demo prints the test table
    with rasterio.open(demo / "map_lulc.tif") as cog:
        assert cog.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG" and cog.crs.to_epsg() == 4326
    assert "pred_lulc" in sarcube.open_cube(str(demo / "predictions.zarr"))
    assert list(demo.glob("predictions_pred_lulc_*.png"))


# ---------------------------------------------------------------------------------------------
# Every `sarcube …` example in the README parses with the real parser


def _readme_commands() -> list[str]:
    """Command lines starting with ``sarcube `` inside the README's fenced code blocks (line
    continuations joined, comments dropped)."""
    import re

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks, current = [], None  # fenced blocks, opening and closing fences paired line by line
    for line in text.splitlines():
        if line.startswith("```"):
            if current is None:
                current = [] if line.strip() in ("```", "```bash", "```sh") else ["<other>"]
            else:
                if current[:1] != ["<other>"]:
                    blocks.append("\n".join(current))
                current = None
        elif current is not None:
            current.append(line)
    cmds = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" # ")[0].strip()
            if line.startswith("sarcube "):
                cmds.append(line)
    return cmds


def _variants(cmd: str) -> list[list[str]]:
    """Two argv lists per example: optional ``[...]`` groups left out, and put in (the first
    alternative of ``a | b`` groups and of ``x|y`` values)."""
    import re
    import shlex

    def first_alt(m: re.Match) -> str:
        return m.group(1).split(" | ")[0]

    for placeholder, value in (("W S E N", "140.0 35.9 140.4 36.3"), ("YYYY-MM-DD", "2022-09-12")):
        cmd = cmd.replace(placeholder, value)  # documentation placeholders -> sample values
    bare = re.sub(r"\[[^\[\]]*\]", " ", cmd)
    full = re.sub(r"\[([^\[\]]*)\]", first_alt, cmd)
    out = []
    for c in (bare, full):
        c = re.sub(r"\s+\|\s+--\S+(\s+[^-\s]\S*)?", "", c)  # "--a x | --b y" outside brackets
        argv = [
            t.split("|")[0] if "|" in t and not t.startswith(("'", '"')) else t
            for t in shlex.split(c)[1:]
            if t not in ("...", "…")
        ]
        out.append(argv)
    return out


def test_readme_cli_examples_parse():
    cmds = _readme_commands()
    names = {c.split()[1] for c in cmds}
    assert {
        "synth",
        "ingest",
        "sample",
        "shards",
        "pretrain",
        "finetune",
        "evaluate",
        "ablation",
        "predict",
    } <= names, names
    parser = build_parser()
    for cmd in cmds:
        if cmd.split()[1] in ("--help", "-h", "--version"):
            continue
        for argv in _variants(cmd):
            try:
                parser.parse_args(argv)
            except SystemExit as e:
                raise AssertionError(f"README example does not parse: {cmd!r} -> {argv}") from e


@pytest.mark.parametrize(
    "command",
    [
        "synth",
        "ingest",
        "sample",
        "shards",
        "pretrain",
        "finetune",
        "evaluate",
        "ablation",
        "predict",
        "demo",
    ],
)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([command, "--help"])
    assert e.value.code == 0
    assert command in capsys.readouterr().out


def test_launcher_forwards_the_subcommand_arguments_without_nproc():
    """`sarcube finetune --nproc 2 …` hands torchrun's ranks exactly what was typed after the
    subcommand, minus --nproc, and the rank-side parser accepts it."""
    from sarcube.commands import _forwarded
    from training.finetune import build_parser as rank_parser

    raw = [
        "-v",
        "finetune",
        "--manifest",
        "m",
        "--nproc",
        "2",
        "--pretrained",
        "none",
        "--out",
        "o",
        "--nproc=3",
        "--storage-option",
        "endpoint_url=http://h:1",
        "schedule.epochs=1",
    ]
    args = build_parser().parse_args(raw)
    args.argv = raw[2:]
    fwd = _forwarded(args)
    assert fwd == [
        "--manifest",
        "m",
        "--pretrained",
        "none",
        "--out",
        "o",
        "--storage-option",
        "endpoint_url=http://h:1",
        "schedule.epochs=1",
    ]
    ns = rank_parser().parse_intermixed_args(fwd)
    assert ns.overrides == ["schedule.epochs=1"] and ns.storage_option == [
        "endpoint_url=http://h:1"
    ]


def test_overrides_may_follow_options(tmp_path, capsys):
    """`sarcube pretrain … --resume optim.base_lr=1e-5` (the form the non-finite-loss advice
    prints): key=value overrides after options are overrides, not unrecognized arguments."""
    from sarcube.cli import main

    rc = main(
        [
            "pretrain",
            "--manifest",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path / "o"),
            "data.batch_size=2",
            "--resume",
            "optim.base_lr=1e-5",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "unrecognized arguments" not in err
    assert err.strip() == f"sarcube pretrain: error: --manifest {tmp_path / 'none'}: not found"
    with pytest.raises(SystemExit):  # anything else after the options still is an error
        main(["pretrain", "--manifest", "m", "--out", "o", "--bogus"])
