#!/usr/bin/env bash
# Sets up (.venv, see setup.sh) and runs the whole test suite on CPU. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
. .venv/bin/activate
export DS_ACCELERATOR=cpu WANDB_MODE=offline HF_HUB_OFFLINE=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}
python -m pytest -q -p no:cacheprovider tests "$@"
