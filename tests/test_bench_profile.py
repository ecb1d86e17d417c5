"""The benchmark's profile summary: device time per op and per model part from a jax Perfetto trace."""

from __future__ import annotations

import gzip
import json
import runpy
from pathlib import Path

import pytest

BENCH = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "bench_train.py"),
                       run_name="bench_train")
STACK = "jit(train_step)/{}(FlaxWav2Vec2ForCTC)/wav2vec2/"


@pytest.mark.parametrize("stack, part", [
    (STACK.format("jvp") + "encoder/while/body/closed_call/layers/layer/attention/q_proj/dot_general", "attention"),
    ("jit(train_step)/transpose(jvp(FlaxWav2Vec2ForCTC))/wav2vec2/encoder/while/body/layers/layer/feed_forward/"
     "intermediate_dense/dot_general", "feed-forward (backward)"),
    (STACK.format("jvp") + "feature_extractor/conv_layers/0/layer_norm/mul", "feature encoder (conv)"),
    (STACK.format("jvp") + "encoder/layers/layer/attention/attention._plain/Dropout_0/jit(_bernoulli)/"
     "jit(_uniform)/while", "dropout (masks)"),
    (STACK.format("jvp") + "encoder/layers/layer/feed_forward/Dropout_0/concatenate", "dropout (masks)"),
    (STACK.format("jvp") + "encoder/layers/layer/attention/attention._plain/keep_mask/while/body/xor",
     "dropout (masks)"),
    ("jit(train_step)/transpose(jvp(FlaxWav2Vec2ForCTC))/wav2vec2/encoder/layers/layer/attention/"
     "attention._plain/keep_mask/shift_right_logical", "dropout (masks) (backward)"),
    (STACK.format("jvp") + "encoder/pos_conv_embed/conv/conv_general_dilated", "positional conv"),
    ("jit(train_step)/optax/adam/mul", "optimizer"),
    ("jit(train_step)/something_else", "other"),
])
def test_scope_names_the_model_part_of_a_name_stack(stack, part):
    assert BENCH["_scope"](stack) == part


def _trace(path: Path, events: list[dict], processes: dict[int, str], threads: dict[tuple[int, int], str]):
    meta = [{"ph": "M", "pid": pid, "name": "process_name", "args": {"name": name}} for pid, name in processes.items()]
    meta += [{"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": name}}
             for (pid, tid), name in threads.items()]
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": meta + events}, f)


def _op(pid, tid, name, ms, hlo_op=None):
    # jax 0.11 on an H200 writes tf_op "XlaModule:" on every GPU event: no name stack to read there.
    args = {"hlo_op": hlo_op, "tf_op": "XlaModule:"} if hlo_op else {}
    return {"ph": "X", "pid": pid, "tid": tid, "ts": 0.0, "dur": ms * 1000.0, "name": name, "args": args}


def test_gpu_trace_counts_each_op_once_per_model_part(tmp_path, capsys):
    # A GPU trace shows every op on XLA's op line and again as its kernel on a CUDA stream; the host's
    # own lines (pid 1) are not device time.
    stacks = {"fusion.1": STACK.format("jvp") + "encoder/layers/layer/attention/q_proj/dot_general",
              "fusion.2": "jit(train_step)/transpose(jvp(FlaxWav2Vec2ForCTC))/wav2vec2/encoder/layers/layer/"
                          "feed_forward/output_dense/dot_general"}
    events = [_op(7, 1, "fusion.1", 6.0, "fusion.1"), _op(7, 1, "fusion.2", 3.0, "fusion.2"),
              _op(7, 1, "fusion.1", 6.0, "fusion.1"), _op(7, 1, "fusion.2", 3.0, "fusion.2"),
              _op(7, 2, "fusion.1", 6.0, "fusion.1"), _op(7, 2, "fusion.2", 3.0, "fusion.2"),
              _op(7, 2, "fusion.1", 6.0, "fusion.1"), _op(7, 2, "fusion.2", 3.0, "fusion.2"),
              _op(1, 9, "PjitFunction(train_step)", 50.0)]
    path = tmp_path / "trace.json.gz"
    _trace(path, events, {1: "/host:CPU", 7: "/device:GPU:0"},
           {(7, 1): "XLA Ops", (7, 2): "Stream #13(Compute)", (1, 9): "python"})
    BENCH["summarize_jax_trace"](path, 2, stacks)
    out = capsys.readouterr().out
    assert "PjitFunction" not in out
    assert "/device:GPU:0 XLA Ops: 9.0 ms per step over 2 ops" in out
    parts = out.split("by model part")[1]
    assert "6.00 ms  66.7%  attention" in parts and "3.00 ms  33.3%  feed-forward (backward)" in parts
    assert "12.00 ms" not in parts  # the stream's copies are not added a second time


def test_cpu_trace_adds_up_every_thread(tmp_path, capsys):
    stacks = {"dot.1": STACK.format("jvp") + "encoder/layers/layer/feed_forward/intermediate_dense/dot_general"}
    events = [_op(5, 1, "dot.1", 4.0, "dot.1"), _op(5, 2, "dot.1", 2.0, "dot.1"),
              _op(5, 2, "ThunkExecutor::Execute", 30.0)]
    path = tmp_path / "trace.json.gz"
    _trace(path, events, {5: "/host:CPU"}, {(5, 1): "tf_XLAEigen/1", (5, 2): "tf_XLAEigen/2"})
    BENCH["summarize_jax_trace"](path, 1, stacks)
    parts = capsys.readouterr().out.split("by model part")[1]
    assert "6.00 ms 100.0%  feed-forward" in parts


def test_busy_time_merges_overlaps_and_counts_gaps():
    # Two overlapping kernels (0-10, 5-15 us), a gap, one more (20-30): busy 25 us of a 30 us span.
    assert BENCH["busy_time"]([(20.0, 30.0), (0.0, 10.0), (5.0, 15.0)]) == (25.0, 30.0)
    assert BENCH["busy_time"]([(0.0, 10.0), (2.0, 4.0)]) == (10.0, 10.0)  # one inside another
    assert BENCH["busy_time"]([]) == (0.0, 0.0)


def test_op_census_counts_the_compiled_programs_instructions():
    """The census the benchmark prints next to the memory plan: instructions by opcode from the compiled
    HLO (a loop's body counted once)."""
    import types

    import jax
    import jax.numpy as jnp

    def loop(x):
        return jax.lax.fori_loop(0, 3, lambda i, a: jax.lax.cond(a.sum() > 0, lambda: a * 2, lambda: a - 1), x)

    compiled = jax.jit(loop).lower(jnp.ones((4, 8))).compile()
    census = BENCH["JaxSide"].op_census(types.SimpleNamespace(compiled=compiled))
    assert "1 while" in census.split(", ") and "1 conditional" in census.split(", "), census
    simple = jax.jit(lambda x: x * 2).lower(jnp.ones((4, 8))).compile()
    census = BENCH["JaxSide"].op_census(types.SimpleNamespace(compiled=simple))
    assert "0 while" in census.split(", ") and "0 conditional" in census.split(", "), census


@pytest.mark.slow  # compiles the benchmark's small model
def test_ctc_probe_is_the_steps_loss_at_the_steps_shapes():
    """The CTC time the benchmark prints is the train step's loss on logits of the step's shape: the
    feature encoder's frames (its convs' kernels and strides), the vocabulary, the batch's labels."""
    import types

    import jax
    import numpy as np

    from xlsr_jax.model import ctc_loss

    config = BENCH["wav2vec2_config"](BENCH["config_cases"]("small", None)[0])
    batch = BENCH["make_batch"](config, 2, 1.0)
    side = types.SimpleNamespace(model=types.SimpleNamespace(config=config), batch=batch)
    loss_and_grad, logits = BENCH["JaxSide"].ctc_probe(side)
    frames = 16000
    for kernel, stride in zip(config.conv_kernel, config.conv_stride):
        frames = (frames - kernel) // stride + 1
    assert logits.shape == (2, frames, config.vocab_size)
    loss, grad = loss_and_grad(logits)
    expected = ctc_loss(logits, np.ones((2, frames), bool), batch["labels"], blank_id=config.pad_token_id)[0]
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert float(jax.numpy.abs(grad).sum()) > 0


def test_timing_spread_is_the_timed_steps_deciles():
    """The p10-p90 printed next to each side's median: the inclusive deciles of its timed steps."""
    timing = BENCH["Timing"](5.0, tuple(float(s) for s in (7, 1, 9, 3, 5, 2, 10, 4, 8, 6)))
    assert timing.median == 5.5
    low, high = timing.spread()
    assert low == pytest.approx(1.9) and high == pytest.approx(9.1)
    assert BENCH["Timing"](1.0, (0.25,)).spread() == (0.25, 0.25)


def test_measure_alternates_blocks_and_keeps_every_timed_step(monkeypatch):
    """Warm-up and timed steps in blocks, jax torch / torch jax, the first step timed apart."""
    calls = []
    # Each timed call "takes" its index among the timed calls, so the Timing shows which calls were timed.
    clock = iter(range(100))
    monkeypatch.setitem(BENCH["measure"].__globals__, "_seconds", lambda fn: (fn(), float(next(clock)))[1])

    class Side:
        def __init__(self, name):
            self.name = name

        def first_step(self):
            calls.append((self.name, "first"))

        def step(self):
            calls.append((self.name, "step"))

    result = BENCH["measure"]([Side("jax"), Side("pytorch")], warmup=1, repeats=3, rounds=2)
    steps = [name for name, kind in calls if kind == "step"]
    blocks = [steps[i:i + 4] for i in range(0, len(steps), 4)]  # 1 warm-up + 3 timed
    assert calls[:2] == [("jax", "first"), ("pytorch", "first")]
    assert blocks == [[name] * 4 for name in ("jax", "pytorch", "pytorch", "jax")]
    # Timed in order: jax's first, torch's first, then rounds of 3 (warm-ups untimed): jax, torch, torch, jax.
    assert result["jax"] == BENCH["Timing"](0.0, (2.0, 3.0, 4.0, 11.0, 12.0, 13.0))
    assert result["pytorch"] == BENCH["Timing"](1.0, (5.0, 6.0, 7.0, 8.0, 9.0, 10.0))
