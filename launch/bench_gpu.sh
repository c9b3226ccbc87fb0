#!/usr/bin/env bash
# The GPU figures of docs/performance.md ("GPU"), as they were measured (the model loop: sora-bench model
# --bare; the trainer's own step: launch/gpu_check.sh): ~10 minutes on one H100/H200.
#   bash launch/bench_gpu.sh [OUT_DIR]      (the package importable: pip install -e . or PYTHONPATH)
# Kernels are named (varlen:torch_varlen, varlen:sdpa) where a row of the table was measured with one,
# so that the auto choice (`varlen`, which picks by sample length) does not change what is compared.
# Each command has its own time limit, so a slow one costs only itself; each result is printed as a
# JSON line when measured and written to OUT_DIR/*.json when its command ends.
set -u
out=${1:-runs/bench_gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
bench() { local limit=$1; shift; echo "== sora-bench $*"; timeout "$limit" python3 -m sora_train.bench "$@"; }

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv | tee "$out/device.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$out/device.txt"
python3 -c "import flash_attn; print('flash_attn', flash_attn.__version__)" 2>/dev/null | tee -a "$out/device.txt"

# 1. bf16 numerics of every backend against the float32 reference, and attention-only speed
bench 90 attention --seq-len 4096 8192 --heads 16 --head-dim 64 --attention sdpa flex varlen:torch_varlen \
    --json "$out/attention.json"
# 2. which varlen kernel wins, by sample length (16 samples of ~256 / ~1k / ~4k tokens; the 1B mix at 64k)
for hd in "24 64" "12 128"; do
    set -- $hd
    for sn in "4096 256" "16384 1024" "65536 4096"; do
        set -- $hd $sn
        bench 30 attention --seq-len "$3" --segment-tokens "$4" --heads "$1" --head-dim "$2" --no-check \
            --attention varlen:torch_varlen varlen:sdpa --json "$out/attention_${3}_${2}.json"
    done
    bench 40 attention --seq-len 65536 --heads "$1" --head-dim "$2" --no-check \
        --attention varlen:torch_varlen varlen:sdpa --json "$out/attention_1b_mix_${2}.json"
done
# 3. the presets, per backend (1B with its old 24 heads of 64 too)
bench 170 model --bare --model 1B --override model.heads=24 --seq-len 16384 65536 --attention flex varlen:torch_varlen \
    --ac full --steps 3 --json "$out/1b_24heads.json"
bench 90 model --bare --model 1B --seq-len 65536 --attention varlen:torch_varlen varlen:sdpa --ac full --steps 3 \
    --json "$out/1b.json" --profile "$out/profile_1b_64k.txt" | grep -v '^ '
bench 130 model --bare --model XL --seq-len 16384 --attention sdpa flex varlen:torch_varlen --ac full --steps 3 --json "$out/xl.json"
bench 60 model --bare --model XL --seq-len 65536 --attention varlen:torch_varlen --ac full --steps 3 --json "$out/xl_64k.json"
bench 110 model --bare --model B --seq-len 16384 65536 --attention sdpa flex varlen:torch_varlen --ac none --steps 3 \
    --json "$out/b.json"
