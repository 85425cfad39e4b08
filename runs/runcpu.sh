#!/usr/bin/env bash
# The tiny CPU pipeline, end to end, on local text. Usage: bash runs/runcpu.sh [PRETRAIN_DIR]
# PRETRAIN_DIR holds wikipedia/, books/ and reddit/ (default ../shared/data/pretrain).
set -euo pipefail
cd "$(dirname "$0")/.."
PRETRAIN=${1:-../shared/data/pretrain}
export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}

# Sizes of each stage: small enough for a 2-core laptop.
VOCAB_SIZE=4096          # tokenizer vocabulary
TOK_MAX_CHARS=20000000   # characters of text the tokenizer trains on

DATA="$PRETRAIN/wikipedia:0.45,$PRETRAIN/books:0.40,$PRETRAIN/reddit:0.15"
for d in wikipedia books reddit; do
    [ -d "$PRETRAIN/$d" ] || { echo "missing $PRETRAIN/$d: pass the folder that holds wikipedia/, books/, reddit/"; exit 1; }
done

bash runs/setup.sh
PY=.venv/bin/python

# 1. Tokenizer: train on the English mix, then measure its compression.
$PY -m scripts.tok_train --vocab-size=$VOCAB_SIZE --max-chars=$TOK_MAX_CHARS --data="$DATA"
$PY -m scripts.tok_eval --data="$DATA"

echo "Done. Artifacts are in $NANOCHAT_BASE_DIR; the report sections are in $NANOCHAT_BASE_DIR/report/."
