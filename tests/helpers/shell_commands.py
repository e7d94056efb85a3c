"""Find the ``sarcube …``, ``torchrun …`` and ``python -m training.…`` command lines written in
shell scripts, YAML files (Kubernetes / compose ``command`` + ``args`` lists, embedded scripts,
commented examples) and Markdown code blocks, as argument vectors for the real argparse parsers
(test_deploy.py parses every one of them).

Why a parser of its own: the deploy/ scripts use bash arrays (``opts=(…)``) and arithmetic
expansion (``$((…))``), which ``bashlex`` (the bash parser on PyPI) rejects, and no library
chooses values for the variables a command line refers to. The approach here is deliberately
small: join continuation lines, record ``NAME=value`` assignments in file order, expand variable
references (a known value, the ``${NAME:-default}`` default, else :data:`PLACEHOLDER`), split the
line with :mod:`shlex` (POSIX rules, shell punctuation as separate tokens) and cut it into simple
commands at the control operators. Branches are not followed, so each assignment holds for the
lines after it.

A found command is a tuple ``(source, kind, argv)``: ``source`` names the file, ``kind`` is
``"sarcube"``, ``"torchrun"`` or the training module (``"training.pretrain"``), and ``argv`` the
arguments after the program (after ``-m module`` for a training module).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import re
import shlex
from pathlib import Path

import yaml

TRAINING_MODULES = ("training.pretrain", "training.finetune")
PLACEHOLDER = "1"  # an unknown value: parses as a path, a string or a number

# Settings the HPC scripts take only from the job's environment (qsub -v): example values.
JOB_SETTINGS = {"TASK": "lulc", "PRETRAINED": "none"}

_VAR_ARRAY = re.compile(r'"?\$\{[A-Za-z_][A-Za-z0-9_]*\[[@*]\]\}"?')
_VAR_BRACED = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*|[0-9])(?:(:?[-=?+])([^{}]*))?\}")
_CMD_SUBST = re.compile(r"\$\(\([^()]*\)\)|\$\([^()]*\)")
_VAR_PLAIN = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")
_ASSIGN = re.compile(r"^\s*(?:export\s+|local\s+)?([A-Za-z_][A-Za-z0-9_]*)=(\S.*)?$")

# A line that mentions one of the commands: one that cannot be split is an error, not a skip.
_TRIGGER = re.compile(
    r"(^|[\s\"'/])(sarcube\s+[a-z]|torchrun\s|-m\s+training\.|torchrun-node\.sh\s)"
)
_OPERATORS = {"&&", "||", ";", "|", "&", "(", ")", ">", "<", ">>", ";;", "|&"}


def expand(text: str, known: dict[str, str]) -> str:
    """Shell / Kubernetes / compose variable references -> their defaults, a known value, or "1".

    Args:
        text: a command line or a word of one.
        known: values of variables assigned earlier (``NAME -> value``).

    Returns:
        ``text`` with ``"${arr[@]}"`` and ``"$@"`` removed, special parameters (``$?``, ``$1`` …)
        and command substitutions (``$(…)``, ``$((…))``) replaced by :data:`PLACEHOLDER`, and
        ``$NAME`` / ``${NAME}`` / ``${NAME:-default}`` (nested too) by the known value, else the
        default, else :data:`PLACEHOLDER`.
    """
    text = _VAR_ARRAY.sub("", text).replace('"$@"', "").replace("$@", "")
    text = re.sub(r"\$[?#!*0-9]", PLACEHOLDER, text)

    def braced(m: re.Match) -> str:
        name, op, word = m.group(1), m.group(2), m.group(3)
        if op in (":-", "-", ":=", "=") and word is not None:
            return known.get(name) or word
        return known.get(name, PLACEHOLDER)

    for _ in range(5):  # nested ${A:-${B:-c}}
        new = _CMD_SUBST.sub(PLACEHOLDER, _VAR_BRACED.sub(braced, text))
        if new == text:
            break
        text = new
    return _VAR_PLAIN.sub(lambda m: known.get(m.group(1), PLACEHOLDER), text)


def logical_lines(lines: list[str]) -> list[str]:
    """Physical lines joined at trailing backslashes (the backslash replaced by a space)."""
    out, buf = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        out.append(buf + line)
        buf = ""
    if buf:
        out.append(buf)
    return out


def record_assignment(line: str, known: dict[str, str]) -> None:
    """Record ``NAME=value`` (the value expanded as far as known) for the lines after it.

    Args:
        line: a logical line; anything but an assignment (or an array assignment) is ignored.
        known: the variables known so far, updated in place.
    """
    m = _ASSIGN.match(line)
    if m and m.group(2) and not m.group(2).startswith("("):
        # NAME=${NAME:-default}: the default (branches are not followed, so an earlier
        # assignment to NAME in another branch must not leak into this one)
        others = {k: v for k, v in known.items() if k != m.group(1)}
        with contextlib.suppress(ValueError):
            known[m.group(1)] = " ".join(shlex.split(expand(m.group(2), others)))


def commands_in_shell(text: str, source: str, comments: bool = False) -> list[tuple]:
    """Command lines in shell text; with ``comments``, example commands in comment lines.

    Args:
        text: shell text (a script, an embedded script, a Markdown code block).
        source: the name the found commands carry.
        comments: look only at comment lines indented as examples (``#   sarcube ingest … \\``).

    Returns:
        The ``(source, kind, argv)`` of each command found, in text order.

    Raises:
        AssertionError: a line that mentions a command but cannot be split.
    """
    raw = text.splitlines()
    if comments:  # indented examples: `#   sarcube ingest ... \`
        raw = [re.sub(r"^\s*#", "", ln) if ln.lstrip().startswith("#") else "" for ln in raw]
        lines = [
            ln
            for ln in logical_lines(raw)
            if re.match(r"\s{2,}(sarcube|torchrun|mpirun|srun|python3? -m training)\s", ln)
        ]
    else:
        lines = [ln for ln in logical_lines(raw) if not ln.lstrip().startswith("#")]
    known = dict(JOB_SETTINGS)
    found = []
    for ln in lines:
        record_assignment(ln, known)
        try:
            lex = shlex.shlex(expand(ln, known), posix=True, punctuation_chars=True)
            lex.whitespace_split = True
            lex.commenters = "#"
            tokens = list(lex)
        except ValueError:
            assert not _TRIGGER.search(ln), f"{source}: cannot split {ln!r}"
            continue
        simple: list[str] = []
        for tok in [*tokens, ";"]:
            if tok in _OPERATORS:
                found += match_command(simple, source)
                simple = []
            else:
                simple.append(tok)
    return found


def match_command(tokens: list[str], source: str) -> list[tuple]:
    """The first sarcube / torchrun / training-module invocation among the tokens.

    Args:
        tokens: the words of one simple command (``env X=1 sarcube ingest …`` is fine).
        source: the name the found command carries.

    Returns:
        ``[(source, kind, argv)]``, or ``[]`` when the tokens hold none.
    """
    subcommands = sarcube_subcommands()
    for i, tok in enumerate(tokens):
        rest = tokens[i + 1 :]
        if (tok == "sarcube" or tok.endswith("/sarcube")) and rest and rest[0] in subcommands:
            return [(source, "sarcube", rest)]
        if tok == "torchrun" or (tok == "-m" and rest[:1] == ["torch.distributed.run"]):
            return [(source, "torchrun", rest if tok == "torchrun" else rest[1:])]
        if (
            tok in ("python", "python3")
            and rest[:1] == ["-m"]
            and rest[1:2]
            and rest[1] in TRAINING_MODULES
        ):
            return [(source, rest[1], rest[2:])]
        if tok.endswith("torchrun-node.sh") and rest[:1] and rest[0] in TRAINING_MODULES:
            return [(source, rest[0], rest[1:])]
    return []


def commands_in_yaml(path: Path, root: Path) -> list[tuple]:
    """Commands in a YAML file: commented examples, ``command`` + ``args`` lists (Kubernetes,
    compose) and multi-word strings (embedded scripts).

    Args:
        path: the YAML file (one or more documents).
        root: the directory the commands' ``source`` is relative to.
    """
    source = str(path.relative_to(root))
    found = commands_in_shell(path.read_text(), source, comments=True)

    def walk(node) -> None:
        if isinstance(node, dict):
            cmd, args = node.get("command"), node.get("args")
            if isinstance(cmd, list) or isinstance(args, list):
                argv = [
                    expand(str(a), {})
                    for a in [*(cmd or []), *(args or [])]
                    if isinstance(a, str | int)
                ]
                found.extend(match_command(argv, source))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
        elif isinstance(node, str) and re.search(r"\s", node.strip()):
            found.extend(commands_in_shell(node, source))

    for doc in yaml.safe_load_all(path.read_text()):
        if doc is not None:
            walk(doc)
    return found


def commands_in_markdown(path: Path, root: Path) -> list[tuple]:
    """Commands in a Markdown file's ``bash`` / ``sh`` / ``shell`` / ``console`` code blocks;
    ``source`` relative to ``root``."""
    blocks = re.findall(r"```(?:bash|sh|shell|console)\n(.*?)```", path.read_text(), re.DOTALL)
    return [c for b in blocks for c in commands_in_shell(b, str(path.relative_to(root)))]


@functools.cache
def sarcube_subcommands() -> dict[str, argparse.ArgumentParser]:
    """The ``sarcube`` CLI's subcommand parsers by name."""
    from sarcube.cli import build_parser

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def all_commands(directory: Path, root: Path) -> list[tuple]:
    """Every command in the YAML, shell (also commented examples), Dockerfile (commented
    examples) and Markdown files under ``directory``, each ``(source, kind, argv)`` once.

    Args:
        directory: the tree to search (deploy/).
        root: the directory the commands' ``source`` is relative to (the repository).
    """
    found = []
    for p in sorted(directory.rglob("*")):
        if p.suffix in (".yaml", ".yml"):
            found += commands_in_yaml(p, root)
        elif p.suffix == ".sh":
            src = str(p.relative_to(root))
            found += commands_in_shell(p.read_text(), src)
            found += commands_in_shell(p.read_text(), src, comments=True)
        elif p.name == "Dockerfile":
            found += commands_in_shell(p.read_text(), str(p.relative_to(root)), comments=True)
        elif p.suffix == ".md":
            found += commands_in_markdown(p, root)
    unique = {(s, k, tuple(a)): (s, k, a) for s, k, a in found}
    return list(unique.values())
