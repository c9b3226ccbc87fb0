#!/usr/bin/env bash
# The MFU levers of docs/performance.md, measured through the trainer's step (sora-bench model: build(), the
# DeepSpeed engine, Trainer.train_step, EMA on) in one call: ~8 minutes on one H100/H200, or what fits in
# MFU_BUDGET_S seconds (default 480; after launch/gpu_check.sh in the same lease, what the lease has left): a
# step whose own time limit no longer fits is skipped, in the order below, and the rest still reports.
#   bash launch/mfu_gpu.sh OUT [WHEELS_DIR]
# 1. the 1B preset at 64k tokens, activation checkpointing full | selective | none, eager;
# 2. the same with each block compiled (parallel.compile: the attention kernels stay out of the graph);
# 3. XL and B at 16k (scale), full and none;
# 4. a profile of the fastest 1B configuration of steps 1-2 that fits.
# OUT gets device.txt mfu.log eager.json compiled.json scale.json profile_1b.txt summary.json.
set -u
start=$(date +%s)
budget=${MFU_BUDGET_S:-480}
LOG=mfu.log WORK=${GPU_CHECK_WORK:-/tmp/sora_mfu}
. "$(dirname "$0")/gpu_env.sh"
bench() {
  local limit=$1; shift
  if (( $(date +%s) - start + limit > budget )); then echo "== skipped (budget): sora-bench $*"; return 124; fi
  echo "== sora-bench $*  ($(( $(date +%s) - start )) s)"; timeout "$limit" "$PY" -m sora_train.bench "$@"
}

bench 150 model --model 1B --seq-len 65536 --ac full selective none --steps 3 --warmup 2 --json "$OUT/eager.json"
bench 240 model --model 1B --seq-len 65536 --ac full selective none --steps 3 --warmup 2 \
    --override parallel.compile=true --json "$OUT/compiled.json"
bench 100 model --model XL --seq-len 16384 --ac full none --steps 3 --warmup 2 --json "$WORK/xl.json"
bench 60 model --model B --seq-len 16384 --ac full none --steps 3 --warmup 2 --json "$WORK/b.json"
"$PY" -c "import json, os, sys; print(json.dumps([r for p in sys.argv[1:] if os.path.exists(p) for r in json.load(open(p))], indent=1))" \
    "$WORK/xl.json" "$WORK/b.json" > "$OUT/scale.json"

best=$("$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
rows = []
for name, compiled in (("eager.json", False), ("compiled.json", True)):
    p = Path(sys.argv[1]) / name
    rows += [(r, compiled) for r in (json.loads(p.read_text()) if p.exists() else []) if "step_s" in r]
if rows:
    r, compiled = min(rows, key=lambda rc: rc[0]["step_s"])
    print(r["activation_checkpointing"], "true" if compiled else "false")
EOF
)
if [ -n "$best" ]; then
  set -- $best
  bench 150 model --model 1B --seq-len 65536 --ac "$1" --steps 2 --warmup 2 --override parallel.compile="$2" \
      --profile "$OUT/profile_1b.txt" --json "$WORK/profiled.json" | grep -v '^ '
fi
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
keys = ("model", "seq_len", "activation_checkpointing", "compile", "step_s", "tokens_per_s", "tflops", "mfu", "peak_mem_gib", "error")
summary = {name: [{k: r.get(k) for k in keys if k in r} for r in json.loads((out / name).read_text())]
           for name in ("eager.json", "compiled.json", "scale.json") if (out / name).exists()}
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary, indent=1))
EOF
