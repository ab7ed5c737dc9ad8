#!/usr/bin/env bash
# The whole test suite, twice: under openpi's pinned stack and under the latest releases, each in a fresh venv.
# Each stack also restores what the other wrote (tests/openpi_restore.py). Lint runs once.
set -euo pipefail
cd "$(dirname "$0")/.."
venvs="${OPENPI_MERGE_VENVS:-.venvs}"
python="${PYTHON:-python3}"

make_venv() {  # name, pip args...
  local dir="$venvs/$1"
  shift
  "$python" -m venv --clear "$dir"
  "$dir/bin/pip" install --quiet --disable-pip-version-check "$@" -e ".[test]"
  "$dir/bin/python" -c 'import jax, orbax.checkpoint as o, flax; print(f"{jax.__version__=} {o.__version__=} {flax.__version__=}")'
}

make_venv pinned -c scripts/openpi-pins.txt
make_venv latest --upgrade

"$venvs/latest/bin/ruff" check .
"$venvs/latest/bin/ruff" format --check .

status=0
OPENPI_MERGE_OTHER_PYTHON="$PWD/$venvs/latest/bin/python" "$venvs/pinned/bin/python" -m pytest -q "$@" || status=1
OPENPI_MERGE_OTHER_PYTHON="$PWD/$venvs/pinned/bin/python" "$venvs/latest/bin/python" -m pytest -q "$@" || status=1
exit $status
