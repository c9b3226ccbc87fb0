#!/usr/bin/env bash
# A three-stage pretraining curriculum on the synthetic world, on CPU (docs/guide.md, "Pretraining recipes"):
#   stage 1: still images;  stage 2: low-resolution video (+ images);  stage 3: larger, longer clips (+ both),
# each stage from the last one's weights (init_from), each scored by sora-eval. Rerunning continues where it
# stopped. Extra arguments are Hydra overrides for every stage, e.g.  optim.steps=100
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
. launch/cpu_env.sh
DATA=data/recipe RUNS=runs/recipe

synth() {  # out dir, extra flags
  [ -f $DATA/$1/captions.jsonl ] || python -m data_tools.synthetic --out $DATA/$1 --seed 2 --min-size 32 --max-size 96 \
    --min-frames 16 --max-frames 48 "${@:2}"
}
encode() {  # captions dir, shards dir, policy flags; a finished encode (its manifest) is kept
  [ -f $DATA/$2/manifest.json ] || python -m data_tools.encode --captions $DATA/$1/captions.jsonl --out $DATA/$2 \
    --span --clips-per-shard 60 --workers 1 --no-progress "${@:3}"
}
synth stills_raw --num-clips 960 --stills
synth videos_raw --num-clips 480
encode stills_raw images --max-pixels 1600 --max-frames 1 --min-frames 1
encode videos_raw video_low --max-pixels 1024 --max-frames 8 --min-frames 8
encode videos_raw video_high --max-pixels 2304 --max-frames 16 --min-frames 16
for stage in 1 2 3; do
  python -m sora_train.train experiment=recipe_stage$stage "$@"
  python -m sora_train.inference.evaluate checkpoint=$RUNS/stage$stage/checkpoints out_dir=$RUNS/stage$stage/eval \
    steps=20 per_pair=1
done
echo "recipe finished in $(( $(date +%s) - start )) s; scores in $RUNS/stage{1,2,3}/eval/report.json"
