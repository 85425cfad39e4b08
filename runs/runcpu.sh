#!/usr/bin/env bash
# The tiny CPU pipeline, end to end, on local text: tokenizer, base training, base evaluation,
# midtraining, SFT, chat evaluation, conversation quality after each model stage, report. About 15-25
# minutes on 2 cores.
# Usage: bash runs/runcpu.sh [DATA_DIR]
#   DATA_DIR holds pretrain/{wikipedia,books,reddit} and eval/core (default ../shared/data).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR=${1:-../shared/data}
PRETRAIN=$DATA_DIR/pretrain
export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}
export NANOCHAT_DATA_DIR=${NANOCHAT_DATA_DIR:-$DATA_DIR}   # chat and eval task data
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}

# Sizes of each stage: small enough for a 2-core laptop.
VOCAB_SIZE=${VOCAB_SIZE:-4096}          # tokenizer vocabulary
TOK_MAX_CHARS=${TOK_MAX_CHARS:-20000000} # characters the tokenizer trains on
DEPTH=${DEPTH:-4}                       # base model: 4 layers, width 256
SEQ_LEN=${SEQ_LEN:-256}                 # context length
BASE_STEPS=${BASE_STEPS:-200}           # base training steps of 8,192 tokens
MID_STEPS=${MID_STEPS:-60}              # midtraining steps
SFT_STEPS=${SFT_STEPS:-40}              # SFT steps
EVAL_ITEMS=${EVAL_ITEMS:-16}            # CORE items per task / chat problems per task / replies generated

DATA="$PRETRAIN/wikipedia:0.45,$PRETRAIN/books:0.40,$PRETRAIN/reddit:0.15"
# conversation quality (docs/chat_quality.md): bpb on 4 x EVAL_ITEMS held-out conversations, EVAL_ITEMS replies
QUALITY="--max-conversations=$((4 * EVAL_ITEMS)) --max-replies=$EVAL_ITEMS --max-new-tokens=64"
for d in wikipedia books reddit; do
    [ -d "$PRETRAIN/$d" ] || { echo "missing $PRETRAIN/$d: pass the folder that holds pretrain/{wikipedia,books,reddit}"; exit 1; }
done

bash runs/setup.sh
PY=.venv/bin/python
$PY -m nanochat.report reset

# 1. Tokenizer: train on the English mix, then measure its compression.
$PY -m scripts.tok_train --vocab-size=$VOCAB_SIZE --max-chars=$TOK_MAX_CHARS --data="$DATA"
$PY -m scripts.tok_eval --data="$DATA"

# 2. Base model.
$PY -m scripts.base_train --depth=$DEPTH --head-dim=64 --max-seq-len=$SEQ_LEN --device-batch-size=8 \
    --total-batch-size=8192 --num-iterations=$BASE_STEPS --eval-every=50 --eval-tokens=65536 \
    --sample-every=$BASE_STEPS --data="$DATA"
$PY -m scripts.base_loss --device-batch-size=8 --split-tokens=65536 --data="$DATA"
$PY -m scripts.base_eval --max-per-task=$EVAL_ITEMS --eval-dir="$DATA_DIR/eval/core"
$PY -m scripts.chat_quality -i base $QUALITY

# 3. Midtraining and SFT on conversations, each followed by the chat evaluation and conversation quality.
$PY -m scripts.mid_train --num-iterations=$MID_STEPS --device-batch-size=8 --total-batch-size=8192 \
    --eval-every=-1 --eval-conversations=200 --eval-max-problems=$EVAL_ITEMS
$PY -m scripts.chat_eval -i mid -a "ARC-Easy|MMLU|GSM8K" --max-problems=$EVAL_ITEMS --max-new-tokens=64
$PY -m scripts.chat_quality -i mid $QUALITY
$PY -m scripts.chat_sft --num-iterations=$SFT_STEPS --device-batch-size=4 --examples-per-step=16 \
    --eval-every=-1 --eval-metrics-every=-1 --eval-conversations=200 --eval-max-problems=$EVAL_ITEMS
$PY -m scripts.chat_eval -i sft -a "ARC-Easy|MMLU|GSM8K" --max-problems=$EVAL_ITEMS --max-new-tokens=64
$PY -m scripts.chat_quality -i sft $QUALITY

# 4. The report card.
$PY -m nanochat.report generate
echo
echo "Done. Report: $NANOCHAT_BASE_DIR/report/report.md"
echo "Chat with it:  $PY -m scripts.chat_cli -i sft"
echo "         or:   $PY -m scripts.chat_web -i sft --port 8000   (then open http://127.0.0.1:8000)"
