#!/usr/bin/env bash
# The GPU acceptance run (issue 18.4): one table of what the first GPU must settle. bench/acceptance.py
# has the steps; this script brings what the GPU image lacks and keeps the whole run under 8 minutes.
#
#   bash bench/gpu_acceptance.sh --fetch-wheels   # on a machine with PyPI: wheels into bench/wheels/ (not in git)
#   bash bench/gpu_acceptance.sh                  # on the GPU machine (no network): install the wheels, run
#   bash bench/gpu_acceptance.sh --cpu-smoke      # the same steps on CPU, tiny sizes
#                                                 # (CI: tests/test_acceptance_smoke.py)
#
# Options: --dir DIR (work folder), --python PY (default: python3, or .venv/bin/python when there is one),
# PYVER=3.11 for --fetch-wheels (the GPU image's Python), WITH_ARROW=1 to bring pyarrow and pandas too.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=gpu
args=()
py=python3
[[ -x .venv/bin/python ]] && py=.venv/bin/python
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cpu-smoke) mode=smoke; args+=(--cpu-smoke) ;;
    --fetch-wheels) mode=fetch ;;
    --dir) args+=(--dir "$2"); shift ;;
    --python) py="$2"; shift ;;
    *) echo "usage: $0 [--cpu-smoke | --fetch-wheels] [--dir DIR] [--python PY]" >&2; exit 2 ;;
  esac
  shift
done

# What the run imports besides torch, at the versions this repository is tested with (the venv's).
packages() {
  "$py" - <<'EOF'
from importlib.metadata import version
names = ["trl", "datasets", "dill", "multiprocess", "xxhash", "fsspec", "transformers", "tokenizers",
         "huggingface_hub", "hf_xet", "kernels", "safetensors", "accelerate", "psutil", "rich", "markdown_it_py",
         "mdurl", "pygments", "submitit", "cloudpickle", "pyyaml", "typer", "shellingham"]
import os
if os.environ.get("WITH_ARROW"):
    names += ["pyarrow", "pandas"]
print(" ".join(f"{n}=={version(n.replace('_', '-'))}" for n in names))
EOF
}

if [[ $mode == fetch ]]; then
  mkdir -p bench/wheels
  # shellcheck disable=SC2046
  "$py" -m pip download --no-deps -d bench/wheels --only-binary=:all: --python-version "${PYVER:-3.11}" \
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
      $(packages)
  du -sh bench/wheels
  echo "carry bench/wheels to the GPU machine (run: carry=[\"bench/wheels\"]) and run bash bench/gpu_acceptance.sh"
  exit 0
fi

if [[ $mode == gpu ]]; then
  # Install from bench/wheels only what is missing, or outside the versions pyproject.toml supports, with the
  # wheels it needs (--no-deps: nothing else of the image changes).
  if [[ -d bench/wheels ]]; then
    wheels=$("$py" bench/acceptance.py --wheels-needed bench/wheels)
    if [[ -n $wheels ]]; then
      echo "[acceptance] installing from bench/wheels: $wheels" >&2
      # shellcheck disable=SC2086
      "$py" -m pip install -q --no-index --no-deps $wheels
    fi
  fi
  "$py" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device: use --cpu-smoke"'
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The whole run stays under 8 minutes on one H100/H200; the CPU smoke gets 15 (a loaded 2-core machine).
limit=${ACCEPTANCE_TIMEOUT_S:-$([[ $mode == smoke ]] && echo 900 || echo 480)}
exec timeout --signal=TERM --kill-after=20 "$limit" "$py" bench/acceptance.py ${args[@]+"${args[@]}"}
