#!/usr/bin/env bash
# The jax vs PyTorch train-step benchmark on a lent GPU, one command from the repo root:
#     bash scripts/bench_gpu.sh
# XLSR-53 shape in bf16 (batch 8 x 10 s and 32 x 5 s), with and without attention dropout, then compile
# time at 4 vs 24 layers; under 9 minutes in all. The log also goes to $OUT/bench_gpu.log when $OUT is set.
#
# Nothing is installed: the machine has no network, and it already has all the benchmark imports
# (jax with CUDA, flax, optax, numpy, transformers with PyYAML, torch); the benchmark does not import
# librosa, soundfile, jiwer or datasets (tests/test_bench_imports.py). xlsr_jax runs from this tree.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1  # a run cut by `timeout` keeps the lines it printed
if [[ -n "${OUT:-}" ]]; then
  exec > >(tee -a "$OUT/bench_gpu.log") 2>&1
fi

nvidia-smi || echo "nvidia-smi: not found"
python --version
python -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|jax-cuda[0-9a-z_-]*|flax|optax|numpy|torch|transformers) ' || true

# BENCH_ARGS: extra flags for both runs, e.g. to try this script on a CPU (~3 minutes on 2 busy cores):
#   BENCH_ARGS="--layers 2 --batch 1 --seconds 1 --repeats 1 --compile-depths 1 2" bash scripts/bench_gpu.sh
status=0
# shellcheck disable=SC2086  # BENCH_ARGS is split into flags on purpose
timeout 240 python scripts/bench_train.py --config xlsr53 --repeats 10 ${BENCH_ARGS:-} || status=$?
# The same without attention dropout: jax trains through cuDNN's fused attention, which never holds the
# probabilities that dropout needs (what the recipe's attention_dropout 0.1 costs).
# shellcheck disable=SC2086
timeout 130 python scripts/bench_train.py --config xlsr53 --repeats 10 --attention-dropout 0 ${BENCH_ARGS:-} \
  || status=$?
# shellcheck disable=SC2086
timeout 170 python scripts/bench_train.py --config xlsr53 --compile-only ${BENCH_ARGS:-} || status=$?
exit "$status"
