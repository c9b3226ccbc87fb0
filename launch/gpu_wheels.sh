#!/usr/bin/env bash
# Run on a CPU machine with this project's venv: puts into .whl/ the wheels a GPU machine whose image has
# torch but not our other dependencies needs (Python 3.12, x86-64; no network there). launch/gpu_check.sh
# installs them offline. ~46 MB: PyAV 36 MB (video files), torchao 3.4 MB (parallel.float8), DeepSpeed 2.2 MB
# (built here from its sdist), Hydra/OmegaConf/antlr, webdataset, pydantic (DeepSpeed's config). W&B is left out: the check runs
# with logging.wandb.mode=disabled, and wandb is imported only when logging is on.
#   bash launch/gpu_wheels.sh [DIR]        (DIR default .whl, ignored by git)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
mkdir -p "$DIR"
PY=${PYTHON:-.venv/bin/python}
get() {  # binary wheels for CPython 3.12 on manylinux x86-64
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DIR" "$@"
}
get av==18.1.0 torchao==0.18.0 webdataset==1.0.2 braceexpand==0.1.7 hydra-core==1.3.8 omegaconf==2.3.1 hjson==3.1.0 \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
# Published as source only: build pure wheels here.
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DIR" deepspeed==0.19.8 antlr4-python3-runtime==4.9.3
du -sh "$DIR"
