#!/usr/bin/env bash
# The main job on the embedded default: synthetic captioned videos -> shards -> a tiny DiT trained
# on CPU -> sample videos. Every step is resumable: rerunning continues where it stopped.
# Extra arguments are Hydra overrides for training, e.g.  optim.steps=1000
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
. launch/cpu_env.sh
DATA=data/quickstart RUN=${RUN:-runs/quickstart}

[ -f $DATA/raw/captions.jsonl ] || python -m data_tools.synthetic --out $DATA/raw --num-clips 480 --seed 0 \
  --min-size 32 --max-size 96 --min-frames 8 --max-frames 48
[ -f $DATA/val_raw/captions.jsonl ] || python -m data_tools.synthetic --out $DATA/val_raw --num-clips 32 --seed 1 \
  --min-size 32 --max-size 96 --min-frames 8 --max-frames 48
encode() {  # captions dir, shards dir; a finished encode (its manifest) is kept as it is
  [ -f $DATA/$2/manifest.json ] || python -m data_tools.encode --captions $DATA/$1/captions.jsonl --out $DATA/$2 --max-pixels 1600 --max-frames 8 \
    --min-frames 8 --span --clips-per-shard 60 --workers 1 --no-progress
}
# The two splits encode side by side, one process each: 480 clips are ~10 s of work on 2 cores, and every
# extra worker process first spends seconds importing torch and loading MiniLM (2 workers for the training
# split took 25-29 s in all, 1 worker 19-23 s: docs/performance.md).
encode val_raw val_shards & val=$!
encode raw shards || { kill $val 2>/dev/null; exit 1; }  # leave no encoder running behind a failure
wait $val
python -m sora_train.train experiment=quickstart out_dir=$RUN data.train=$DATA/shards data.val=$DATA/val_shards "$@"
python -m sora_train.inference.sample checkpoint=$RUN/checkpoints out_dir=$RUN/videos frames=8 height=32 width=32 \
  'prompts=[a red square moving right on a black background,a blue circle moving up on a white background,a green heart beating on a gray background,a yellow triangle moving left on a black background]'
echo
echo "quickstart finished in $(( $(date +%s) - start )) s"
echo "videos: $(ls $RUN/videos/*.mp4 | tr '\n' ' ')"
