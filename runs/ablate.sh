#!/usr/bin/env bash
# Ablation of the first user's planned changes at equal training FLOPs, tiny scale, on CPU
# (1-2 minutes per variant on 2 cores, 12 variants).
# Usage: bash runs/ablate.sh [PRETRAIN_DIR]   (holds wikipedia/, books/, reddit/; default ../shared/data/pretrain)
set -euo pipefail
cd "$(dirname "$0")/.."
PRETRAIN=${1:-../shared/data/pretrain}
export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}
TARGET_FLOPS=${TARGET_FLOPS:-2e13}
bash runs/setup.sh
PY=.venv/bin/python
DATA="$PRETRAIN/wikipedia:0.45,$PRETRAIN/books:0.40,$PRETRAIN/reddit:0.15"
# the ablation needs a tokenizer; train a small one on the mix if none exists yet
[ -f "$NANOCHAT_BASE_DIR/tokenizer/meta.json" ] || $PY -m scripts.tok_train --vocab-size=4096 --max-chars=20000000 --data="$DATA"
$PY -m scripts.ablate --data="$DATA" --target-flops=$TARGET_FLOPS
$PY -m nanochat.report generate
