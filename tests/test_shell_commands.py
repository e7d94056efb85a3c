"""helpers.shell_commands, the finder of command lines in deploy/ (test_deploy.py), on small
hand-worked inputs: variable expansion (defaults, nesting, substitutions, special parameters),
continuation lines, assignments in file order, control operators, comments and commented
examples, YAML ``command`` / ``args`` lists and embedded scripts, Markdown code blocks.

The expected values are worked out by hand from the rules in the helper's docstring.
"""

from __future__ import annotations

import pytest
from helpers.shell_commands import (
    PLACEHOLDER,
    all_commands,
    commands_in_markdown,
    commands_in_shell,
    commands_in_yaml,
    expand,
    logical_lines,
    match_command,
)


@pytest.mark.parametrize(
    ("text", "known", "expected"),
    [
        ("${A:-${B:-c}}", {}, "c"),  # nested defaults, the inner one first
        ("${A:-${B:-c}}", {"B": "b"}, "b"),
        ("${A:-${B:-c}}", {"A": "a"}, "a"),
        ("${A:=x}/${A-y}", {}, "x/y"),  # := and - take the default as :- does
        ("$HOME/${DIR}", {"HOME": "/h"}, "/h/1"),  # unknown: the placeholder
        ("${MSG:?set MSG}", {}, "1"),
        ("$(hostname):$((1 + 2))", {}, "1:1"),  # command and arithmetic substitution
        ('run "$@" ${ARGS[@]} $1 $#', {}, "run   1 1"),  # "$@" and arrays dropped
    ],
)
def test_expand_by_hand(text, known, expected):
    assert PLACEHOLDER == "1"
    assert expand(text, known) == expected


def test_continuation_lines_are_joined():
    assert logical_lines(["a \\", "  b \\", "c", "d"]) == ["a    b  c", "d"]
    assert logical_lines(["x \\"]) == ["x  "]  # a dangling continuation ends the text


def test_commands_split_at_operators_and_skip_comments():
    text = (
        "# sarcube ingest --not-this\n"
        "OUT=s3://b/run\n"
        "cd /w && sarcube shards --cube c.zarr \\\n"
        '    --out "${OUT}/shards" ; echo done\n'
        "torchrun --nnodes ${NNODES:-2} -m training.pretrain --out $OUT | tee log  # a comment\n"
    )
    assert commands_in_shell(text, "t") == [
        ("t", "sarcube", ["shards", "--cube", "c.zarr", "--out", "s3://b/run/shards"]),
        ("t", "torchrun", ["--nnodes", "2", "-m", "training.pretrain", "--out", "s3://b/run"]),
    ]


def test_commented_examples_only_with_comments():
    text = (
        "# Example:\n"
        "#   sarcube ingest --scenes s3://b/s/ \\\n"
        "#     --cube s3://b/c.zarr\n"
        "sarcube sample --cube s3://b/c.zarr\n"
    )
    assert commands_in_shell(text, "t", comments=True) == [
        ("t", "sarcube", ["ingest", "--scenes", "s3://b/s/", "--cube", "s3://b/c.zarr"])
    ]
    assert commands_in_shell(text, "t") == [("t", "sarcube", ["sample", "--cube", "s3://b/c.zarr"])]


def test_assignments_hold_for_the_lines_after_them():
    text = (
        "A=x\n"
        "sarcube ingest --cube $A\n"
        "A=y\n"
        "sarcube ingest --cube $A\n"
        "CUBE=s3://first\n"
        "CUBE=${CUBE:-s3://default}\n"  # another branch's value must not leak in
        "sarcube ingest --cube $CUBE\n"
        "opts=(--x y)\n"  # an array: not recorded
        "sarcube ingest $opts\n"
        "sarcube finetune --task $TASK\n"  # a job setting: its example value
    )
    assert [argv for _, _, argv in commands_in_shell(text, "t")] == [
        ["ingest", "--cube", "x"],
        ["ingest", "--cube", "y"],
        ["ingest", "--cube", "s3://default"],
        ["ingest", "1"],
        ["finetune", "--task", "lulc"],
    ]


def test_match_command_by_hand():
    assert match_command(["env", "X=1", "/usr/bin/sarcube", "ingest", "--a"], "s") == [
        ("s", "sarcube", ["ingest", "--a"])
    ]
    argv = ["python3", "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    assert match_command([*argv, "-m", "training.finetune"], "s") == [
        ("s", "torchrun", ["--nproc_per_node", "2", "-m", "training.finetune"])
    ]
    node = ["bash", "deploy/hpc/torchrun-node.sh", "training.pretrain", "--config", "x"]
    assert match_command(node, "s") == [("s", "training.pretrain", ["--config", "x"])]
    assert match_command(["python", "-m", "training.finetune", "--out", "o"], "s") == [
        ("s", "training.finetune", ["--out", "o"])
    ]
    assert match_command(["sarcube", "no-such-command"], "s") == []
    assert match_command(["echo", "sarcube"], "s") == []


def test_a_command_line_that_cannot_be_split_fails():
    assert commands_in_shell('echo "oops\n', "t") == []  # not a command line: skipped
    with pytest.raises(AssertionError, match="cannot split"):
        commands_in_shell('sarcube ingest --cube "unterminated\n', "t")


def test_yaml_lists_scripts_and_commented_examples(tmp_path):
    f = tmp_path / "k8s" / "job.yaml"
    f.parent.mkdir()
    f.write_text(
        "# A commented example:\n"
        "#   sarcube sample --cube s3://b/c.zarr --out s3://b/i.parquet\n"
        "spec:\n"
        "  containers:\n"
        '    - command: ["torchrun"]\n'
        '      args: ["--nnodes", "$(NNODES)", "-m", "training.pretrain", "--config", "x"]\n'
        '    - command: ["bash", "-c"]\n'
        "      args:\n"
        "        - |\n"
        "          set -e\n"
        '          sarcube shards --cube "${CUBE:-s3://b/c.zarr}" --out s3://b/shards\n'
    )
    assert commands_in_yaml(f, tmp_path) == [
        (
            "k8s/job.yaml",
            "sarcube",
            ["sample", "--cube", "s3://b/c.zarr", "--out", "s3://b/i.parquet"],
        ),
        ("k8s/job.yaml", "torchrun", ["--nnodes", "1", "-m", "training.pretrain", "--config", "x"]),
        (
            "k8s/job.yaml",
            "sarcube",
            ["shards", "--cube", "s3://b/c.zarr", "--out", "s3://b/shards"],
        ),
    ]


def test_markdown_shell_blocks_only(tmp_path):
    f = tmp_path / "README.md"
    f.write_text(
        "Not in a block: `sarcube ingest --no`.\n\n"
        "```bash\n"
        "sarcube synth --out /tmp/x && python -m training.finetune --config finetune_tiny\n"
        "```\n\n"
        "```python\n"
        "sarcube ingest --no\n"
        "```\n"
    )
    assert commands_in_markdown(f, tmp_path) == [
        ("README.md", "sarcube", ["synth", "--out", "/tmp/x"]),
        ("README.md", "training.finetune", ["--config", "finetune_tiny"]),
    ]


def test_all_commands_walks_the_tree_once_per_command(tmp_path):
    d = tmp_path / "deploy"
    d.mkdir()
    (d / "run.sh").write_text(
        "sarcube ingest --cube c\nsarcube ingest --cube c\n#   sarcube sample --cube c\n"
    )
    (d / "Dockerfile").write_text("#   sarcube shards --cube c\nRUN sarcube ingest --cube x\n")
    (d / "notes.txt").write_text("sarcube ingest --cube t\n")  # not a kind of file searched
    assert all_commands(d, tmp_path) == [
        ("deploy/Dockerfile", "sarcube", ["shards", "--cube", "c"]),
        ("deploy/run.sh", "sarcube", ["ingest", "--cube", "c"]),
        ("deploy/run.sh", "sarcube", ["sample", "--cube", "c"]),
    ]
