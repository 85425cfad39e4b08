#!/usr/bin/env bash
# The ~$500 tier: a depth-32 model on one 8-GPU node (about 20 hours of 8xH100 at 40% MFU).
# Usage: bash runs/run1000.sh
#
# Sizing (python -m scripts.plan --depths=32), with the 2026 recipe (docs/recipe.md): width 2048, 16 heads,
# 1.74B scaling parameters with the 65,536-token vocab (4.03B in all with the value embeddings);
# 10.5 tokens per scaling parameter -> 18.3B tokens = 17,472 steps of 2^20 tokens, ~19.4 h at 40% MFU.
# At ~4.8 characters/token: ~88B characters = ~352 reference shards of ~250M characters;
# we fetch 390 (10% slack). Device batch 8 x 2048 tokens fits 80 GB at this width; gradient
# accumulation keeps the batch.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}
NPROC=${NPROC:-8}
WANDB_RUN=${WANDB_RUN:-dummy}
DEPTH=32
SHARDS=390

bash runs/setup.sh
PY=.venv/bin/python
$PY -m nanochat.report reset
$PY -m nanochat.dataset -n 16
$PY -m nanochat.dataset -n $SHARDS &
DOWNLOAD_PID=$!
$PY -m scripts.tok_train --vocab-size=65536 --max-chars=4000000000
$PY -m scripts.tok_eval
wait $DOWNLOAD_PID

$PY -m scripts.plan --gpus=$NPROC --gpu=h100 --depths=$DEPTH
torchrun --standalone --nproc_per_node=$NPROC -m scripts.base_train -- --depth=$DEPTH --device-batch-size=8 --run=$WANDB_RUN
torchrun --standalone --nproc_per_node=$NPROC -m scripts.base_loss -- --device-batch-size=8
torchrun --standalone --nproc_per_node=$NPROC -m scripts.base_eval
torchrun --standalone --nproc_per_node=$NPROC -m scripts.mid_train -- --mixture=reference --device-batch-size=8 --run=$WANDB_RUN
torchrun --standalone --nproc_per_node=$NPROC -m scripts.chat_eval -- -i mid
torchrun --standalone --nproc_per_node=$NPROC -m scripts.chat_sft -- --mixture=reference --run=$WANDB_RUN
torchrun --standalone --nproc_per_node=$NPROC -m scripts.chat_eval -- -i sft
$PY -m nanochat.report generate
