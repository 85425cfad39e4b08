#!/usr/bin/env bash
# The reference run: a depth-20 model on one 8-GPU node (base training ~1.5 h of 8xH100 at 40% MFU, planner estimate).
# Usage: bash runs/speedrun.sh            (WANDB_RUN=name to log to wandb; NPROC to change GPU count)
#
# Sizing, from the model itself (python -m scripts.plan --depths=20 prints the same), with the 2026 recipe
# (docs/recipe.md; base_train's defaults):
#   depth 20 -> width 1280, 10 heads, 477M scaling parameters (blocks + head) with the 65,536-token vocab,
#   1.40B in all with the value embeddings (lookup tables: no FLOPs).
#   10.5 tokens per scaling parameter -> 5.0B tokens = 4,778 steps of 2^20 tokens (the batch from the
#   token budget), ~1.5 h of base training at 40% MFU.
#   At ~4.8 characters/token that is ~24B characters; a reference shard holds ~250M characters,
#   so 97 shards are needed for one epoch. We fetch 110 (10% slack; the last one is validation).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}
NPROC=${NPROC:-8}
WANDB_RUN=${WANDB_RUN:-dummy}
DEPTH=20
SHARDS=110

bash runs/setup.sh
PY=.venv/bin/python
$PY -m nanochat.report reset

# Tokenizer on the first 2B characters; the rest of the shards download meanwhile.
$PY -m nanochat.dataset -n 8
$PY -m nanochat.dataset -n $SHARDS &
DOWNLOAD_PID=$!
$PY -m scripts.tok_train --vocab-size=65536 --max-chars=2000000000
$PY -m scripts.tok_eval
wait $DOWNLOAD_PID

$PY -m scripts.plan --gpus=$NPROC --gpu=h100 --depths=$DEPTH
torchrun --standalone --nproc_per_node=$NPROC -m scripts.base_train -- --depth=$DEPTH --run=$WANDB_RUN
torchrun --standalone --nproc_per_node=$NPROC -m scripts.base_loss
torchrun --standalone --nproc_per_node=$NPROC -m scripts.base_eval

torchrun --standalone --nproc_per_node=$NPROC -m scripts.mid_train -- --mixture=reference --run=$WANDB_RUN
torchrun --standalone --nproc_per_node=$NPROC -m scripts.chat_eval -- -i mid
torchrun --standalone --nproc_per_node=$NPROC -m scripts.chat_sft -- --mixture=reference --run=$WANDB_RUN
torchrun --standalone --nproc_per_node=$NPROC -m scripts.chat_eval -- -i sft

$PY -m nanochat.report generate
echo "Chat with it: $PY -m scripts.chat_cli -i sft   or   $PY -m scripts.chat_web -i sft --port 8000"
