#!/usr/bin/env bash
# GPU acceptance: one command, under 8 minutes on one H100/H200, from the repository root.
#   bash launch/gpu_check.sh OUT [WHEELS_DIR]
# Where the image has torch but not this project's other dependencies, they are installed offline from
# WHEELS_DIR (default .whl; made on a CPU machine by launch/gpu_wheels.sh). Where the MiniLM package is
# missing, a tiny random text encoder of its width stands in (data_tools/tiny_text_encoder.py).
# Then, each step with its own time limit so that a slow one costs only itself:
#   1. pytest -m gpu (tests/test_gpu.py): backends vs float32 in bf16, packing invariance, to_tokens,
#      the zero.Init build, the trainer's collectives under NCCL, ZeRO-0 = ZeRO-3;
#   2. sora-train end to end on CUDA from shards encoded here: bf16, varlen, activation checkpointing,
#      ZeRO-3, EMA, a checkpoint at step 10; a second run stopped at 10 and resumed to 20 equal to the first
#      (deterministic=true);
#   3. sora-sample to mp4 from that run;
#   4. sora-bench model --model 1B --seq-len 65536 through Trainer.train_step and --bare, side by side.
# OUT gets (8 files at most, for the device tool): device.txt gpu_check.log pytest.log metrics_straight.jsonl
# metrics_resumed.jsonl bench.json sample.mp4 summary.json.
set -u
start=$(date +%s)
declare -A RESULT
step() { echo; echo "== $1  ($(( $(date +%s) - start )) s)"; }
LOG=gpu_check.log WORK=${GPU_CHECK_WORK:-/tmp/sora_gpu_check}
. "$(dirname "$0")/gpu_env.sh"

step "1. pytest -m gpu"
timeout 270 "$PY" -m pytest -q -p no:cacheprovider --durations=8 -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/pytest.log"
RESULT[pytest]=${PIPESTATUS[0]}

step "2. sora-train on CUDA from real shards, checkpoint and resume"
timeout 60 "$PY" -m data_tools.synthetic --out "$WORK/raw" --num-clips 96 --seed 0 --min-size 32 --max-size 96 \
  --min-frames 8 --max-frames 24 >/dev/null &&
timeout 90 "$PY" -m data_tools.encode --captions "$WORK/raw/captions.jsonl" --out "$WORK/shards" --max-pixels 4096 \
  --max-frames 8 --min-frames 8 --span --clips-per-shard 24 --workers 1 --no-progress "${TEXT_ARGS[@]}"
RESULT[encode]=$?
# The quickstart's tiny model, but as a cluster run: ZeRO-3, bf16, activation checkpointing, AdamW, EMA;
# deterministic kernels, so that the resumed run can be held to the uninterrupted one exactly (without them two
# fresh runs part by 1e-3 within 20 steps on an H200: flash attention's backward sums with atomics).
TRAIN=(experiment=quickstart deterministic=true data.train="$WORK/shards" data.val="$WORK/shards" optim.name=adamw
       optim.lr=1e-3 optim.decay=constant optim.warmup_steps=5 parallel.zero_stage=3 parallel.precision=bf16
       parallel.activation_checkpointing=full model.attention=varlen data.seq_len=4096 ema.enabled=true
       checkpoint.every=10 logging.every=1 logging.val_every=10 logging.wandb.mode=disabled)
train() { timeout 150 "$PY" -m sora_train.train "${TRAIN[@]}" "$@"; }
train out_dir="$WORK/straight" optim.steps=20 && RESULT[train]=0 || RESULT[train]=$?
train out_dir="$WORK/resumed" optim.steps=10 && train out_dir="$WORK/resumed" optim.steps=20 \
  && RESULT[resume_run]=0 || RESULT[resume_run]=$?
cp "$WORK/straight/metrics.jsonl" "$OUT/metrics_straight.jsonl" 2>/dev/null
cp "$WORK/resumed/metrics.jsonl" "$OUT/metrics_resumed.jsonl" 2>/dev/null

step "3. sora-sample to mp4"
timeout 90 "$PY" -m sora_train.inference.sample checkpoint="$WORK/straight/checkpoints" out_dir="$WORK/videos" frames=8 \
  height=64 width=64 steps=20 'prompts=[a red square moving right on a black background]'
RESULT[sample]=$?
cp "$WORK"/videos/*.mp4 "$OUT/sample.mp4" 2>/dev/null

step "4. sora-bench: the 1B preset at 64k tokens, trainer step vs bare loop"
timeout 150 "$PY" -m sora_train.bench model --model 1B --seq-len 65536 --ac full --steps 3 --warmup 2 \
  --json "$WORK/bench_trainer.json"
RESULT[bench_trainer]=$?
timeout 90 "$PY" -m sora_train.bench model --model 1B --seq-len 65536 --ac full --steps 3 --warmup 2 --bare \
  --json "$WORK/bench_bare.json"
RESULT[bench_bare]=$?

step "summary"
for k in "${!RESULT[@]}"; do echo "$k=${RESULT[$k]}"; done > "$WORK/results.txt"
"$PY" - "$WORK" "$OUT" "$(( $(date +%s) - start ))" <<'EOF'
import json, sys
from pathlib import Path
work, out, seconds = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
codes = dict(line.split("=") for line in (work / "results.txt").read_text().split())
def losses(path):
    rows = [json.loads(l) for l in open(path)] if path.exists() else []
    return {r["step"]: r["loss"] for r in rows if "loss" in r}
straight, resumed = losses(out / "metrics_straight.jsonl"), losses(out / "metrics_resumed.jsonl")
after = [s for s in range(11, 21) if s in straight and s in resumed]
diffs = [abs(straight[s] - resumed[s]) / max(abs(straight[s]), 1e-12) for s in after]
bench = []
for name in ("bench_trainer.json", "bench_bare.json"):
    p = work / name
    bench += json.loads(p.read_text()) if p.exists() else []
(out / "bench.json").write_text(json.dumps(bench, indent=1))
summary = {"seconds": seconds, "exit_codes": {k: int(v) for k, v in codes.items()},
           "resume": {"steps_compared": after, "equal": bool(after) and max(diffs) == 0.0,
                      "max_rel_diff": max(diffs) if diffs else None},
           "bench": [{k: r.get(k) for k in ("path", "step_s", "phases_s", "tokens_per_s", "tflops", "mfu",
                                             "peak_mem_gib", "kernel", "error")} for r in bench]}
summary["green"] = (all(v == 0 for v in summary["exit_codes"].values()) and summary["resume"]["equal"]
                    and len(after) == 10)
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary, indent=1))
sys.exit(0 if summary["green"] else 1)
EOF
