"""Regenerate the README's "Bad input → message" table from the test cases.

Runs the cases of ``tests/test_cli_errors.py`` (each one a real ``sarcube`` process) and writes
the messages they print into README.md between the ``bad-input-table`` markers. The same test
module fails when the table and the program disagree, so the table cannot drift.

Usage: ``python tools/bad_input_table.py`` (about two minutes on 2 cores).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    env = {**os.environ, "SARCUBE_UPDATE_README": "1"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "tests/test_cli_errors.py",
        "-k",
        "bad_input_is_one_line or readme_bad_input_table",
    ]
    return subprocess.call(cmd, cwd=REPO, env=env)


if __name__ == "__main__":
    sys.exit(main())
