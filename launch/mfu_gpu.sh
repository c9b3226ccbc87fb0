#!/usr/bin/env bash
# The MFU levers of docs/performance.md, measured through the trainer's step (sora-bench model: build(), the
# DeepSpeed engine, Trainer.train_step, EMA on) in one call: ~11 minutes on one H100/H200, or what fits in
# MFU_BUDGET_S seconds (default 600; after launch/gpu_check.sh in the same lease, what the lease has left). The
# calls go most informative first; one whose own time limit no longer fits is skipped and the rest still report.
#   bash launch/mfu_gpu.sh OUT [WHEELS_DIR]
# The baseline (ZeRO-3, eager, full checkpointing) is gpu_check.sh's step 4. On an H200 the 1B preset at 64k
# tokens ran out of memory without checkpointing and with selective checkpointing (MLP only), eager or compiled, and
# was fastest checkpointing all but the attention kernels (docs/performance.md). Each block compiled is one graph,
# attention included (sora_train::packed_attention) and checkpointing inside it, so the compiler takes every
# policy. Here, that preset at 64k (activations by `sora-bench plan --compile`):
#   compiled       compiled, AC elementwise (GEMM and attention outputs kept, the rest recomputed fused: 96 GiB)
#   float8         the same with the blocks' linear layers in float8 (torchao tensorwise)
#   compiled_none  compiled, no checkpointing (136 GiB predicted: at the edge of 141)
#   partial        compiled, full checkpointing on the first 6 of 24 blocks, none on the rest (~114 GiB)
#   compiled_attention  compiled, AC attention (only attention outputs kept: 42 GiB)
#   eager          eager, AC attention (the best eager row; again on this tree)
#   compiled_full  compiled, AC full
#   zero1          ZeRO-1 compiled, AC elementwise (no parameter hooks at all)
#   profile        a profile of the fastest configuration so far
#   parity         float8 vs bf16 loss over 300 steps of the tiny model on synthetic shards encoded here
#   scale          XL and B at 16k tokens, compiled, AC none|elementwise
# MFU_LEVERS (default all, in the order above: compiled float8 compiled_none partial compiled_attention eager
# compiled_full zero1 profile parity scale_xl scale_b) names the calls to make, e.g. to finish in a second call
# what a first one's budget skipped.
# OUT gets device.txt mfu.log rows.json (every measured row, with its lever) summary.json profile_1b.txt (and its
# timeline, profile_1b.txt.trace.json.gz) parity.json.
set -u
start=$(date +%s)
budget=${MFU_BUDGET_S:-600}
LOG=mfu.log WORK=${GPU_CHECK_WORK:-/tmp/sora_mfu}
. "$(dirname "$0")/gpu_env.sh"
LEVERS=" ${MFU_LEVERS:-compiled float8 compiled_none partial compiled_attention eager compiled_full zero1 profile parity
  scale_xl scale_b} "
wanted() { [[ $LEVERS == *" $1 "* ]]; }
fits() { (( $(date +%s) - start + $1 <= budget )) || { echo "== skipped (budget): $2"; return 1; }; }
bench() {  # bench LIMIT LEVER sora-bench-args...
  local limit=$1 lever=$2; shift 2
  wanted "$lever" || return 0
  fits "$limit" "$lever: sora-bench $*" || return 124
  echo "== $lever: sora-bench $*  ($(( $(date +%s) - start )) s)"
  timeout "$limit" "$PY" -m sora_train.bench "$@" --json "$WORK/$lever.json"
}
M1B=(model --model 1B --seq-len 65536 --steps 3 --warmup 2)

COMPILED=(--override parallel.compile=true)
bench 130 compiled "${M1B[@]}" --ac elementwise "${COMPILED[@]}"
bench 130 float8 "${M1B[@]}" --ac elementwise "${COMPILED[@]}" parallel.float8=tensorwise
bench 120 compiled_none "${M1B[@]}" --ac none "${COMPILED[@]}"
bench 150 partial "${M1B[@]}" --ac full "${COMPILED[@]}" parallel.checkpoint_blocks=6
bench 120 compiled_attention "${M1B[@]}" --ac attention "${COMPILED[@]}"
bench 90 eager "${M1B[@]}" --ac attention
bench 120 compiled_full "${M1B[@]}" --ac full "${COMPILED[@]}"
bench 120 zero1 "${M1B[@]}" --ac elementwise "${COMPILED[@]}" parallel.zero_stage=1

rows() { "$PY" - "$WORK" <<'EOF'
import json, sys
from pathlib import Path
rows = []
for p in sorted(Path(sys.argv[1]).glob("*.json")):
    if p.stem not in ("parity", "profiled"):
        rows += [{"lever": p.stem, **r} for r in json.loads(p.read_text())]
print(json.dumps(rows, indent=1))
EOF
}
best=$(rows | "$PY" -c "
import json, sys
rows = [r for r in json.load(sys.stdin) if r.get('seq_len') == 65536 and 'step_s' in r]
if rows:
    r = min(rows, key=lambda r: r['step_s'])
    print(r['activation_checkpointing'], 'parallel.checkpoint_blocks=%d' % r['checkpoint_blocks'],
          'parallel.compile=%s' % str(r['compile']).lower(), 'parallel.zero_stage=%d' % r['zero_stage'],
          'parallel.float8=' + r['float8'], 'parallel.zero3_gather=' + r['zero3_gather'])")
if [ -n "$best" ] && wanted profile && fits 120 "profile"; then
  set -- $best
  ac=$1; shift
  echo "== profile: --ac $ac --override $*"
  timeout 120 "$PY" -m sora_train.bench "${M1B[@]}" --steps 2 --ac "$ac" --override "$@" \
      --profile "$OUT/profile_1b.txt" --json "$WORK/profiled.json" | grep -v '^ '
fi

# float8's loss against bf16: the quickstart's tiny model as a cluster run (AdamW, bf16, ZeRO-3) for 300 steps
if wanted parity && fits 240 "parity"; then
  echo "== parity: float8 vs bf16, 300 steps  ($(( $(date +%s) - start )) s)"
  timeout 60 "$PY" -m data_tools.synthetic --out "$WORK/raw" --num-clips 96 --seed 0 --min-size 32 --max-size 96 \
    --min-frames 8 --max-frames 24 >/dev/null &&
  timeout 90 "$PY" -m data_tools.encode --captions "$WORK/raw/captions.jsonl" --out "$WORK/shards" --max-pixels 4096 \
    --max-frames 8 --min-frames 8 --span --clips-per-shard 24 --workers 1 --no-progress "${TEXT_ARGS[@]}" >/dev/null
  for f8 in none tensorwise; do
    timeout 120 "$PY" -m sora_train.train experiment=quickstart data.train="$WORK/shards" optim.name=adamw \
      optim.lr=1e-3 optim.steps=300 parallel.zero_stage=3 parallel.precision=bf16 parallel.float8=$f8 \
      data.seq_len=4096 checkpoint.every=0 logging.every=10 logging.val_every=0 logging.wandb.mode=disabled \
      out_dir="$WORK/parity_$f8" 2>&1 | grep -E "^sora-train|^step +(100|200|300) |Error"
  done
  "$PY" - "$WORK" "$OUT" <<'EOF'
import json, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
def losses(name):
    p = work / f"parity_{name}" / "metrics.jsonl"
    return {r["step"]: r["loss"] for r in map(json.loads, open(p)) if "loss" in r} if p.exists() else {}
bf16, fp8 = losses("none"), losses("tensorwise")
steps = sorted(set(bf16) & set(fp8))
last = [s for s in steps if s > 200]
mean = lambda d: sum(d[s] for s in last) / max(len(last), 1)
res = {"steps": len(steps), "bf16_mean_loss_201_300": mean(bf16), "float8_mean_loss_201_300": mean(fp8),
       "rel_diff": (mean(fp8) - mean(bf16)) / mean(bf16) if last else None,
       "curves": {"bf16": [bf16[s] for s in steps], "float8": [fp8[s] for s in steps]}}
(out / "parity.json").write_text(json.dumps(res))
print({k: v for k, v in res.items() if k != "curves"})
EOF
fi

bench 100 scale_xl model --model XL --seq-len 16384 --ac none elementwise --steps 3 --warmup 2 --override parallel.compile=true
bench 60 scale_b model --model B --seq-len 16384 --ac none elementwise --steps 3 --warmup 2 --override parallel.compile=true

rows > "$OUT/rows.json"
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
keys = ("lever", "model", "seq_len", "activation_checkpointing", "checkpoint_blocks", "compile", "float8", "zero_stage",
        "zero3_gather", "step_s", "phases_s", "tokens_per_s", "tflops", "mfu", "peak_mem_gib", "planned_gib", "graphs",
        "graph_breaks", "compiled_frames", "error")
summary = [{k: r.get(k) for k in keys if k in r} for r in json.loads((out / "rows.json").read_text())]
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary, indent=1))
EOF
