#!/usr/bin/env bash
# Sets up (.venv with the test extras, see setup.sh) and runs the whole test suite on CPU.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh diffusers,test
. .venv/bin/activate
export DS_ACCELERATOR=cpu WANDB_MODE=offline HF_HUB_OFFLINE=1
python -m pytest -q -p no:cacheprovider tests "$@"
