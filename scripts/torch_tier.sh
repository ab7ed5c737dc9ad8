#!/usr/bin/env bash
# The PyTorch export's framework tier (tests/test_torch_export.py, the tests marked "torch"): openpi's own PyTorch
# model judges the export. Builds .venvs/torch once (idempotent: a stamp of this script's requirements), on openpi's
# pinned stack: CPU torch, transformers 4.53.2 with openpi's transformers_replace files copied over the installed
# package (openpi's own install step), and what openpi's JAX and PyTorch code import. Then runs the tier.
# Usage: scripts/torch_tier.sh [pytest args...]    Env: OPENPI_SRC (default ../shared/openpi/src), PYTHON,
# OPENPI_MERGE_TORCH_BUILD_ONLY (build the venv, run nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${OPENPI_MERGE_VENVS:-.venvs}/torch"
python="${PYTHON:-python3.11}"
openpi_src="${OPENPI_SRC:-$PWD/../shared/openpi/src}"

# torch 2.13.0+cpu is the one CPU-only build the registry serves (others pull GBs of CUDA libraries).
reqs=(
  "torch==2.13.0+cpu" "transformers==4.53.2" "safetensors"
  einops "jaxtyping==0.2.36" "beartype==0.19.0" augmax "chex==0.1.90" etils tyro optax sentencepiece dm-tree
  equinox tqdm-loggable "numpydantic<2" pillow websockets msgpack
)
stamp="$venv/.openpi-merge-torch-tier"
want="$(printf '%s\n' "${reqs[@]}" "$python" && sha256sum pyproject.toml scripts/openpi-pins.txt \
  "$openpi_src"/openpi/models_pytorch/transformers_replace/models/*/*.py 2>/dev/null || true)"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  "$python" -m venv --clear "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -c scripts/openpi-pins.txt "${reqs[@]}" -e ".[test]" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  if [[ -d "$openpi_src/openpi/models_pytorch/transformers_replace" ]]; then
    site="$("$venv/bin/python" -c 'import os, transformers; print(os.path.dirname(transformers.__file__))')"
    cp -r "$openpi_src"/openpi/models_pytorch/transformers_replace/* "$site/"
  fi
  printf '%s' "$want" >"$stamp"
fi
[[ -z "${OPENPI_MERGE_TORCH_BUILD_ONLY:-}" ]] || exit 0  # scripts/lerobot_tier.sh: the venv, not the tier.
"$venv/bin/python" -c 'import torch, transformers, jax; print(f"{torch.__version__=} {transformers.__version__=} {jax.__version__=}")'
measurements="$(mktemp)"
trap 'rm -f "$measurements"' EXIT
status=0
OPENPI_SRC="$openpi_src" OPENPI_MERGE_TORCH_MEASUREMENTS="$measurements" \
  "$venv/bin/python" -m pytest -q -p no:warnings tests/test_torch_export.py "$@" || status=$?
cat "$measurements"
exit $status
