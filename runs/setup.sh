#!/usr/bin/env bash
# Create .venv and install nanochat into it, with the dev and web extras.
# A torch that already satisfies the requirement is reused. Where none is installed and no
# NVIDIA GPU is visible we pin the CPU build first, so pip never resolves `torch>=2.8`
# to several GB of CUDA wheels. Override the pin with NANOCHAT_TORCH_SPEC (e.g. "torch==2.9.1").
set -euo pipefail
cd "$(dirname "$0")/.."
# The sandbox for model-written code (nanochat/sandbox.py, docs/sandbox.md) needs bubblewrap, util-linux's
# prlimit/setpriv and a system python3 readable by an unprivileged user. Installed here when we are root
# with apt-get; otherwise we say what to install (without them, running model code is refused).
need=()
command -v bwrap >/dev/null 2>&1 || need+=(bubblewrap)
{ command -v prlimit >/dev/null 2>&1 && command -v setpriv >/dev/null 2>&1; } || need+=(util-linux)
[ -x /usr/bin/python3 ] || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null) \
            || echo "setup: could not install ${need[*]}; sandboxed code execution will be refused" >&2
    else
        echo "setup: the code sandbox needs ${need[*]}: install them as root (apt-get install ${need[*]})" >&2
    fi
fi
PY=${PYTHON:-python3}
VENV=${NANOCHAT_VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
extra=()
if ! "$VPY" -c 'import sys, torch; v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(v < (2, 8))' 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        spec=${NANOCHAT_TORCH_SPEC:-torch>=2.8}
    else
        spec=${NANOCHAT_TORCH_SPEC:-torch==2.13.0}
        # machines with a local wheel directory (pip's find-links) take the wheel from there;
        # elsewhere the CPU-only index serves the same version without the CUDA libraries
        if [ -z "${PIP_FIND_LINKS:-}" ] && ! "$VPY" -m pip config list 2>/dev/null | grep -q find-links; then
            extra=(--extra-index-url https://download.pytorch.org/whl/cpu)
        fi
    fi
    "$VPY" -m pip install -q "${extra[@]}" "$spec"
fi
"$VPY" -m pip install -q -e ".[dev,web]"
# guard: a CPU machine must never end up with the CUDA libraries
if ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then
    if "$VPY" -m pip list 2>/dev/null | grep -qiE '^nvidia-'; then
        echo "setup: CUDA packages were installed on a machine without an NVIDIA GPU:" >&2
        "$VPY" -m pip list 2>/dev/null | grep -iE '^nvidia-' >&2
        exit 1
    fi
fi
"$VPY" -c 'import torch, nanochat; print(f"nanochat ready: torch {torch.__version__}, python at '"$VENV"'/bin/python")'
