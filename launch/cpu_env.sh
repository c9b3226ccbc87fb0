# Sourced by the CPU entry scripts (quickstart.sh, recipe.sh) from the repository root: the venv, set up on first
# use, and the environment a CPU run needs (all cores, DeepSpeed's CPU accelerator, offline W&B and hub).
bash launch/setup.sh
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)} DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} WANDB_MODE=${WANDB_MODE:-offline}
export HF_HUB_OFFLINE=1
