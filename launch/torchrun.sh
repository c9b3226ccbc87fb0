#!/usr/bin/env bash
# One node, N processes:  launch/torchrun.sh 8 model=XL parallel=zero3_sp parallel.sp=4 data.train=/data/shards
# On CPU (tests, laptops) export DS_ACCELERATOR=cpu first; gloo is used automatically.
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${1:?usage: launch/torchrun.sh NPROC [hydra overrides...]}; shift
[ -x .venv/bin/python ] && . .venv/bin/activate
exec python -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m sora_train.train "$@"
