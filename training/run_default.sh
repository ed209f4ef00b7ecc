#!/usr/bin/env bash
# The main job: train the embedded default on CPU and print the held-out accuracy before and after.
# Sets up .venv the way .ci/run does when it is missing (torch pinned to the CPU wheel CI uses, the native CPU
# kernels built against it), then runs
# training/train.py with no arguments: a tiny Llama, a character tokenizer and a generated, verifiable
# multi-response task (training/embedded.py), loss pair_mnm. Outputs land in runs/default/
# (metrics.jsonl, training_curves.png, summary.json, TensorBoard logs, final model).
# Extra arguments are passed to train.py, e.g. `bash training/run_default.sh --loss dpo`.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

if ! .venv/bin/python -c "import torch, transformers, datasets, accelerate, peft, matplotlib, mppo_kernels" 2>/dev/null; then
    echo "setting up .venv (torch==2.13.0 CPU wheel + '.[train]')"
    python3 -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q torch==2.13.0
    .venv/bin/python -m pip install -q "setuptools>=77" wheel
    .venv/bin/python -m pip install -q --no-build-isolation -e '.[train]'
    echo "setup: $(( $(date +%s) - start )) s"
fi

# No hub access is needed or wanted: the embedded default builds everything in code.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python training/train.py "$@"
echo "total: $(( $(date +%s) - start )) s (outputs in runs/default/ unless --output-dir says otherwise)"
