#!/usr/bin/env bash
# Rebuild the shipped shapes demo model (src/diffusers_lightbagel/assets/lightbagel-shapes) from a seed.
#
# Phase 1 trains the VAE (3000 steps) and then the DiT and fusion blocks (4000 steps). Phases 2 to 4 train the DiT
# and fusion blocks further (3250, 1250 and 14000 steps). Each starts from the previous phase's moving-average
# weights and draws new examples. Phase 4 lowers the learning rate to zero along a half cosine. The VLM is the tiny
# random Qwen2.5-VL of diffusers_lightbagel.tiny and stays frozen. Every phase writes into a temporary folder; the
# result is moved into place at the end, so an interrupted run leaves the previous model intact. These are the
# settings of the shipped model. On two CPU cores the whole run takes about two and a half hours.
#
# Usage: bash scripts/build_demo_model.sh [SEED] [OUTPUT_DIR]
set -euo pipefail

SEED="${1:-0}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUTPUT="${2:-$ROOT/src/diffusers_lightbagel/assets/lightbagel-shapes}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
THREADS="${THREADS:-2}"
WORK_DIR="$(mktemp -d)"
trap 'rm -rf "$WORK_DIR"' EXIT

"$PYTHON" -m diffusers_lightbagel.demo.train \
    --output "$WORK_DIR/phase1" --work-dir "$WORK_DIR/stage1" --seed "$SEED" \
    --vae-steps 3000 --vae-batch-size 32 --vae-learning-rate 2e-3 --kl-weight 1e-4 \
    --steps 4000 --batch-size 32 --learning-rate 1e-3 --caption-dropout 0.1 --ema-decay 0.998 \
    --num-captions 6000 --num-edits 4000 --save-every 4000 --threads "$THREADS"

"$PYTHON" -m diffusers_lightbagel.demo.train \
    --output "$WORK_DIR/phase2" --work-dir "$WORK_DIR/stage2" --seed "$SEED" --stage transformer \
    --resume-from "$WORK_DIR/phase1" --data-seed $((SEED + 100)) \
    --steps 3250 --batch-size 32 --learning-rate 1e-3 --caption-dropout 0.1 --ema-decay 0.998 \
    --num-captions 8000 --num-edits 6000 --save-every 3250 --threads "$THREADS"

"$PYTHON" -m diffusers_lightbagel.demo.train \
    --output "$WORK_DIR/phase3" --work-dir "$WORK_DIR/stage3" --seed "$SEED" --stage transformer \
    --resume-from "$WORK_DIR/phase2" --data-seed $((SEED + 200)) \
    --steps 1250 --batch-size 32 --learning-rate 1e-3 --caption-dropout 0.1 --ema-decay 0.998 \
    --num-captions 8000 --num-edits 6000 --save-every 1250 --threads "$THREADS"

"$PYTHON" -m diffusers_lightbagel.demo.train \
    --output "$WORK_DIR/phase4" --work-dir "$WORK_DIR/stage4" --seed "$SEED" --stage transformer \
    --resume-from "$WORK_DIR/phase3" --data-seed $((SEED + 300)) \
    --steps 14000 --batch-size 32 --learning-rate 1e-3 --lr-schedule cosine --caption-dropout 0.1 --ema-decay 0.998 \
    --num-captions 16000 --num-edits 12000 --save-every 14000 --threads "$THREADS"

mkdir -p "$(dirname "$OUTPUT")"
if [ -e "$OUTPUT" ]; then
    mv "$OUTPUT" "$WORK_DIR/previous"
fi
mv "$WORK_DIR/phase4" "$OUTPUT"
echo "wrote $OUTPUT"
