#!/usr/bin/env bash
# Ablation of the first user's planned changes at equal training FLOPs, tiny scale, on CPU: every variant
# (the reference, each change alone, all together) over SEEDS seeds, text bpb and assistant-turn bpb after a
# short SFT on english-chat, differences marked beyond seed noise or not, compute multipliers, a plot.
# Depth 3 (width 192, 4 heads of 48), 40 steps of 8192 tokens: 12 variants x 3 seeds = 36 runs, ~1 min each on
# 2 cores on a slow day, 34 min in all (docs/ablation.md). SUITE=recipe: the 2026 pretraining recipe changes
# instead (docs/recipe.md), e.g. DEPTH=4 HEAD_DIM=64 TARGET_FLOPS=1.4e13 or DEPTH=6 HEAD_DIM=64 TARGET_FLOPS=4e13 (60 steps).
# Usage: bash runs/ablate.sh [PRETRAIN_DIR]   (holds wikipedia/, books/, reddit/; default ../shared/data/pretrain)
set -euo pipefail
cd "$(dirname "$0")/.."
PRETRAIN=${1:-../shared/data/pretrain}
export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}
TARGET_FLOPS=${TARGET_FLOPS:-4.7e12}   # 40 steps of 8192 tokens for the depth-3 reference
SEEDS=${SEEDS:-3}
SFT_STEPS=${SFT_STEPS:-20}
SUITE=${SUITE:-planned}
DEPTH=${DEPTH:-3}
HEAD_DIM=${HEAD_DIM:-48}
bash runs/setup.sh
PY=.venv/bin/python
DATA="$PRETRAIN/wikipedia:0.45,$PRETRAIN/books:0.40,$PRETRAIN/reddit:0.15"
# the ablation needs a tokenizer; train a small one on the mix if none exists yet
[ -f "$NANOCHAT_BASE_DIR/tokenizer/meta.json" ] || $PY -m scripts.tok_train --vocab-size=4096 --max-chars=20000000 --data="$DATA"
$PY -m scripts.ablate --suite=$SUITE --depth=$DEPTH --head-dim=$HEAD_DIM --data="$DATA" --target-flops=$TARGET_FLOPS --seeds=$SEEDS --sft-steps=$SFT_STEPS
$PY -m nanochat.report generate
