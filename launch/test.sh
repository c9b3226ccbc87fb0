#!/usr/bin/env bash
# Sets up (.venv with the test extras, see setup.sh) and runs the whole test suite on CPU.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh diffusers,test
. .venv/bin/activate
export DS_ACCELERATOR=cpu WANDB_MODE=offline HF_HUB_OFFLINE=1
# Empty compile caches of the run's own (inductor, triton, C++ extensions), removed after it: a green run means
# green on a machine that has never compiled the project, as CI's and a new user's are.
caches=$(mktemp -d "${TMPDIR:-/tmp}/sora_test_caches.XXXXXX")
trap 'rm -rf "$caches"' EXIT
export TORCHINDUCTOR_CACHE_DIR=$caches/inductor TRITON_CACHE_DIR=$caches/triton TORCH_EXTENSIONS_DIR=$caches/extensions
python -m pytest -q -p no:cacheprovider tests "$@"
