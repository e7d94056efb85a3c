#!/usr/bin/env bash
# Create or refresh the project's virtual environment (.venv) — the set-up step behind
# `make demo` and `make test`. Idempotent: a second run with unchanged inputs installs nothing.
#
# - uv (from PyPI) does the install: ~4x faster than pip here.
# - A wheel folder named in pip's configuration (find-links) is passed on to uv, which ignores
#   pip's configuration. When that folder holds a torch wheel (a CPU build), torch is pinned to
#   exactly that version; otherwise torch comes from the index as usual (a CUDA box, a laptop).
# - tools/fix_torchvision.py repairs a CUDA torchvision on CPU torch, only where it is needed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

# Wheel folders from pip's configuration (all scopes); never hard-coded.
find_links=$("$PYTHON" -m pip config list 2>/dev/null \
  | sed -n "s/^[^=]*find-links='\(.*\)'$/\1/p" | tr ' ' '\n' | sort -u | tr '\n' ' ' || true)
fl_args=()
constraints=""
for d in $find_links; do
  [ -d "$d" ] || continue
  fl_args+=(--find-links "$d")
  wheel=$(ls "$d"/torch-*.whl 2>/dev/null | sort | tail -n 1 || true)
  if [ -n "$wheel" ]; then
    # torch-2.13.0+cpu-cp311-... -> torch==2.13.0+cpu
    constraints="torch==$(basename "$wheel" | cut -d- -f2)"
  fi
done

stamp_inputs() {
  "$PYTHON" --version 2>&1
  echo "$find_links $constraints"
  cat pyproject.toml tools/bootstrap.sh tools/fix_torchvision.py
}
want=$(stamp_inputs | sha256sum | cut -d' ' -f1)
stamp="$VENV/.sarcube-env-stamp"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/sarcube" ]; then
  echo "bootstrap: $VENV is up to date"
  exit 0
fi

echo "bootstrap: setting up $VENV (python: $("$PYTHON" --version 2>&1); ${constraints:-torch from the index})"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
[ -x "$VENV/bin/uv" ] || "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check uv

cargs=()
if [ -n "$constraints" ]; then
  cfile="$VENV/constraints.txt"
  echo "$constraints" >"$cfile"
  cargs=(--constraint "$cfile")
fi
"$VENV/bin/uv" pip install --python "$VENV/bin/python" --compile-bytecode \
  "${fl_args[@]}" "${cargs[@]}" -e ".[test]"
"$VENV/bin/python" tools/fix_torchvision.py
echo "$want" >"$stamp"
echo "bootstrap: done"
