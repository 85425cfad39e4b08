#!/usr/bin/env bash
# The reference ~$100 run: a depth-20 model on one 8-GPU node (about 4 hours of 8xH100).
# Usage: bash runs/speedrun.sh            (WANDB_RUN=name to log to wandb; NPROC to change GPU count)
#
# Sizing, from the model itself (python -m scripts.plan --depths=20 prints the same):
#   depth 20 -> width 1280, 10 heads, 560,988,160 parameters with the 65,536-token vocab.
#   Chinchilla: 20 tokens/param -> 11.2B tokens = 21,400 steps of 524,288 tokens.
#   At ~4.8 characters/token that is ~54B characters; a reference shard holds ~250M characters,
#   so 216 shards are needed for one epoch. We fetch 240 (10% slack; the last one is validation).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}
NPROC=${NPROC:-8}
WANDB_RUN=${WANDB_RUN:-dummy}
DEPTH=20
SHARDS=240

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
