#!/usr/bin/env bash
# One device lease, one command: the GPU acceptance check, then the MFU levers in the time left, packed into at most
# 8 files under OUT (the device tool brings back 8). From the repository root, with the wheels of
# launch/gpu_wheels.sh in .whl:
#   bash launch/gpu_lease.sh OUT [SECONDS]      (SECONDS: this command's own limit, default 570)
# OUT gets check_summary.json mfu_summary.json sample.mp4 results.tgz (every log, JSON and profile of both).
set -u
OUT=${1:?usage: $0 OUT [SECONDS]}
limit=${2:-570}
start=$(date +%s)
cd "$(dirname "$0")/.."
R=$(mktemp -d /tmp/gpu_lease.XXXX)
# gpu_check.sh takes ~310 s on an H200 (2026-11-28); its own steps stop it well before this
timeout $(( limit * 3 / 4 )) bash launch/gpu_check.sh "$R/check"
echo "gpu_check rc=$? at $(( $(date +%s) - start )) s"
MFU_BUDGET_S=$(( limit - 15 - ($(date +%s) - start) )) bash launch/mfu_gpu.sh "$R/mfu"
echo "mfu_gpu rc=$? at $(( $(date +%s) - start )) s"
mkdir -p "$OUT"
cp "$R/check/summary.json" "$OUT/check_summary.json" 2>/dev/null
cp "$R/mfu/summary.json" "$OUT/mfu_summary.json" 2>/dev/null
cp "$R/check/sample.mp4" "$OUT/sample.mp4" 2>/dev/null
tar czf "$OUT/results.tgz" -C "$R" .
