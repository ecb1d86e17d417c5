#!/usr/bin/env bash
# The jax vs PyTorch train-step benchmark on a lent GPU, one command from the repo root:
#     bash scripts/bench_gpu.sh
# XLSR-53 shape in bf16 (batch 8 x 10 s and 32 x 5 s), with and without attention dropout, with and
# without gradient checkpointing; about 6 minutes on an H200 (at most 10 by the timeouts). The log also
# goes to $OUT/bench_gpu.log when $OUT is set.
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

# BENCH_ARGS: extra flags for every run, e.g. to try this script on a CPU (~4 minutes on 2 busy cores):
#   BENCH_ARGS="--layers 2 --batch 1 --seconds 1 --repeats 1 --compile-depths 1 2" bash scripts/bench_gpu.sh
# BENCH_COMPILE=1 adds the 4 vs 24 layers compile report (~3 minutes: 24 unscanned layers compile for
# over 95 s on an H200; measured 2026-11-27, see docs/benchmarks.md).
status=0
if [[ -n "${BENCH_EXPERIMENTS:-}" ]]; then
  # BENCH_EXPERIMENTS=1 runs only these jax-side A/Bs (32 x 5 s, no attention dropout; about 6 minutes on
  # a fresh H200), each against the default in the same call. On a fresh machine one XLSR-53 run needs
  # over 60 s (imports, init, ~20 s of compile): shorter timeouts cut every run before its first step.
  # The question (2026-11-28): with command buffers on, a fifth of the 72 ms step left the GPU idle.
  # Candidates: the 24 LayerDrop conditionals in each direction (a conditional's predicate goes to the
  # host unless command buffers record CONDITIONAL) and the loops (the layer scan; CTC's two scans over
  # the 249 frames, whose share each run now prints as "CTC loss alone"). Rows: default; layerdrop 0 (all
  # 24 layers run, no conditional: faster despite ~10 % more compute means the conditionals cost);
  # WHILE and CONDITIONAL recorded into command buffers; the positional conv through cuFFT (the CPU's
  # choice since 2026-11-28) instead of the fenced cuDNN grouped conv.
  # Earlier rows (H200, 2026-11-28): dynamic-slice fusion 72.6 vs 72.3 ms, remat dots_saveable 75.9,
  # unrolled layers 69.9 (68.5 s of compile): the device copies are not the scan's stacking.
  E="python scripts/bench_train.py --config xlsr53 --models xlsr53-b32x5s --attention-dropout 0 --skip-torch"
  CB="--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL"
  # shellcheck disable=SC2086
  timeout 100 $E --repeats 10 ${BENCH_ARGS:-} || status=$?
  # shellcheck disable=SC2086
  timeout 100 $E --repeats 10 --layerdrop 0 ${BENCH_ARGS:-} || status=$?
  # shellcheck disable=SC2086
  XLA_FLAGS="${XLA_FLAGS:-} $CB" timeout 100 $E --repeats 10 ${BENCH_ARGS:-} || status=$?
  # shellcheck disable=SC2086
  timeout 100 $E --repeats 10 --pos-conv fft ${BENCH_ARGS:-} || status=$?
  exit "$status"
fi
if [[ -n "${BENCH_PROFILE:-}" ]]; then
  # BENCH_PROFILE=1: first, where each framework's device time goes, op by op and by model part (32 x 5 s,
  # fused attention; about 2 minutes), the traces kept in $OUT (else ./bench_profile).
  # Command buffers off for this run only: with them the trace names most ops command_buffer_N (seen on
  # an H200, 2026-11-28), which maps to no model part; its step time is then not the default's.
  # shellcheck disable=SC2086
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" \
    timeout 180 python scripts/bench_train.py --config xlsr53 --models xlsr53-b32x5s --repeats 5 \
    --attention-dropout 0 --profile 3 ${BENCH_ARGS:-} || status=$?
fi
# The GPU-only attention test first (cuDNN at an odd frame count); its output goes to the log too.
timeout 150 python -m pytest -q -p no:cacheprovider tests/test_model_encoder.py -k "cudnn or even_frames" \
  || status=$?
# shellcheck disable=SC2086  # BENCH_ARGS is split into flags on purpose
timeout 180 python scripts/bench_train.py --config xlsr53 --repeats 10 ${BENCH_ARGS:-} || status=$?
# The same without attention dropout: jax trains through cuDNN's fused attention, which never holds the
# probabilities that dropout needs (what the recipe's attention_dropout 0.1 costs).
# shellcheck disable=SC2086
timeout 150 python scripts/bench_train.py --config xlsr53 --repeats 10 --attention-dropout 0 ${BENCH_ARGS:-} \
  || status=$?
# Gradient checkpointing on both sides (common_voice_tr.yaml's remat_policy: full): its time and memory.
# shellcheck disable=SC2086
timeout 120 python scripts/bench_train.py --config xlsr53 --models xlsr53-b32x5s --repeats 10 --remat \
  ${BENCH_ARGS:-} || status=$?
if [[ -n "${BENCH_COMPILE:-}" ]]; then
  # shellcheck disable=SC2086
  timeout 170 python scripts/bench_train.py --config xlsr53 --compile-only ${BENCH_ARGS:-} || status=$?
fi
exit "$status"
