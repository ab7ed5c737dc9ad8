#!/usr/bin/env bash
# The LeRobot export's framework tier (tests/test_lerobot_export.py, the tests marked "framework"): LeRobot 0.6.1's own
# PI0Policy/PI05Policy and processors load the export, and its actions are openpi's PyTorch model's (run in the torch
# tier's venv, which scripts/torch_tier.sh builds; this script builds it too unless OPENPI_MERGE_TORCH_PYTHON names one).
#
# Builds .venvs/lerobot once (idempotent: a stamp of this script's requirements). LeRobot 0.6.1 needs Python >= 3.12 and
# torch < 2.12; the only torch the registry serves for that Python is the CUDA build, whose CUDA libraries torch links
# against even on a CPU (import fails without them). So: torch, torchvision and lerobot without their dependency lists,
# then only the CUDA libraries torch links (not triton, cuda-toolkit, cuda-bindings, nor lerobot's cmake), and what
# lerobot's pi0/pi05 policies and processors import, resolved normally, and openpi-merge itself.
# Usage: scripts/lerobot_tier.sh [pytest args...]    Env: PYTHON (a 3.12), OPENPI_SRC, OPENPI_MERGE_TORCH_PYTHON,
# OPENPI_MERGE_LEROBOT_BUILD_ONLY (build the venv, run nothing), OPENPI_MERGE_TIER_OPTIONAL (no Python >= 3.12: skip).
set -euo pipefail
cd "$(dirname "$0")/.."
venvs="${OPENPI_MERGE_VENVS:-.venvs}"
venv="$venvs/lerobot"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then  # The first Python >= 3.12 that runs (a pyenv shim may exist and fail).
  for candidate in python3.12 python3.13 /root/.pyenv/versions/3.12.1/bin/python3.12; do
    if "$candidate" -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null; then python="$candidate" && break; fi
  done
fi
if [[ -z "$python" ]]; then
  echo "lerobot_tier: LeRobot 0.6.1 needs Python >= 3.12: set PYTHON" >&2
  # scripts/test.sh: a machine without one skips the tier, saying so, rather than failing the suite.
  [[ -n "${OPENPI_MERGE_TIER_OPTIONAL:-}" ]] && { echo "lerobot tier SKIPPED: no Python >= 3.12" >&2; exit 0; }
  exit 2
fi

no_deps=(
  "torch==2.11.0" "torchvision==0.26.0" "lerobot==0.6.1"
  # What torch 2.11.0's shared libraries link (readelf -d torch/lib/*.so): the CUDA 13 libraries of its metadata.
  "nvidia-cudnn-cu13==9.19.0.56" "nvidia-cusparselt-cu13==0.8.0" "nvidia-nccl-cu13==2.28.9" "nvidia-nvshmem-cu13==3.4.5"
  "nvidia-cublas==13.1.0.3" "nvidia-cuda-cupti==13.0.85" "nvidia-cuda-nvrtc==13.0.88" "nvidia-cuda-runtime==13.0.96"
  "nvidia-cufft==12.0.0.61" "nvidia-cufile==1.15.1.6" "nvidia-curand==10.4.0.35" "nvidia-cusolver==12.0.4.66"
  "nvidia-cusparse==12.6.3.3" "nvidia-nvjitlink==13.0.88" "nvidia-nvtx==13.0.85"
)
reqs=(
  # torch's own Python dependencies.
  filelock "typing-extensions>=4.10" "sympy>=1.13.3" networkx jinja2 fsspec "setuptools>=71,<82"
  # lerobot 0.6.1's dependencies that its pi0/pi05 policies and processors import, in its ranges ([pi] extra:
  # transformers), and the test runner.
  "numpy==2.2.6" "transformers==5.5.4" "draccus==0.11.6" "einops>=0.8,<0.9" "huggingface-hub>=1.6,<2"
  "safetensors>=0.4.3,<1" "packaging>=24.2,<26" "pillow>=10,<13" "gymnasium>=1.1.1,<2"
  "opencv-python-headless>=4.9,<4.14" "requests>=2.32,<3" "termcolor>=2.4,<4" "tqdm>=4.66,<5" "pytest>=8"
)
stamp="$venv/.openpi-merge-lerobot-tier"
want="$(printf '%s\n' "${no_deps[@]}" "${reqs[@]}" "$python" && sha256sum pyproject.toml)"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  "$python" -m venv --clear "$venv"
  quiet=(--quiet --disable-pip-version-check)
  "$venv/bin/pip" install "${quiet[@]}" --no-deps "${no_deps[@]}" 2> >(grep -v "is ignored: it is neither" >&2)
  # numpy pinned for lerobot's range while openpi-merge's own dependencies resolve (jax, orbax: the latest).
  "$venv/bin/pip" install "${quiet[@]}" "${reqs[@]}" -e . \
    2> >(grep -v "is ignored: it is neither\|requires triton\|requires cuda-\|requires cmake\|dependency resolver\|^torch 2" >&2)
  printf '%s' "$want" >"$stamp"
fi
[[ -z "${OPENPI_MERGE_LEROBOT_BUILD_ONLY:-}" ]] || exit 0  # scripts/test.sh builds while the stacks run.
"$venv/bin/python" -c 'import torch, transformers, lerobot, jax; print(f"{torch.__version__=} {transformers.__version__=} {lerobot.__version__=} {jax.__version__=}")'

# openpi's PyTorch model needs transformers 4.53.2 with openpi's replacements: another venv, the torch tier's.
if [[ -z "${OPENPI_MERGE_TORCH_PYTHON:-}" ]]; then
  OPENPI_MERGE_TORCH_BUILD_ONLY=1 scripts/torch_tier.sh
  export OPENPI_MERGE_TORCH_PYTHON="$PWD/$venvs/torch/bin/python"
fi
measurements="$(mktemp)"
trap 'rm -f "$measurements"' EXIT
status=0
OPENPI_MERGE_LEROBOT_MEASUREMENTS="$measurements" \
  "$venv/bin/python" -m pytest -q -p no:warnings tests/test_lerobot_export.py "$@" || status=$?
cat "$measurements"
exit $status
