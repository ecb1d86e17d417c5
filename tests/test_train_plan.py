"""`xlsr-jax plan`: the search finds the largest batch under a memory budget; the memory is XLA's
estimate of the compiled step; a tiny run's plan reads it for each bucket."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from _runs import TWO_BUCKETS, tiny_run_config
from xlsr_jax.train.plan import GIB, BucketPlan, Plan, compiled_bytes, format_plan, largest_batch, plan


@pytest.mark.parametrize("budget", [99, 106, 107, 800, 801, 1000, 7267, 7268, 10_000])
@pytest.mark.parametrize("cap", [1, 5, 64, 1024])
def test_largest_batch_is_the_largest_that_fits(budget, cap):
    calls = []

    def memory(b):  # affine in the batch, like a step's arguments plus its activations
        calls.append(b)
        return 100 + 7 * b

    expected = max([b for b in range(1, cap + 1) if memory(b) <= budget], default=0)
    calls.clear()
    assert largest_batch(memory, budget, cap) == (expected, 100 + 7 * expected if expected else None)
    assert all(1 <= b <= cap for b in calls)
    assert len(calls) <= 2 * cap.bit_length() + 1, calls


def test_largest_batch_with_a_stepwise_memory():
    """XLA pads and reuses buffers, so memory can stay flat over several batch sizes."""
    memory = lambda b: 1000 * (-(-b // 8))  # noqa: E731 - grows every 8 clips
    assert largest_batch(memory, budget=3000, cap=1024) == (24, 3000)
    assert largest_batch(memory, budget=999, cap=1024) == (0, None)


def test_compiled_bytes_reads_xla_memory_analysis():
    """x -> 2x on 1024 float32 with x donated: 4 KiB in, 4 KiB out in the same buffer."""
    compiled = jax.jit(lambda x: 2 * x, donate_argnums=0).lower(jax.ShapeDtypeStruct((1024,), jnp.float32)).compile()
    m = compiled.memory_analysis()
    assert (m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes) == (4096, 4096, 4096)
    assert compiled_bytes(compiled) == 4096 + m.temp_size_in_bytes + m.generated_code_size_in_bytes


@pytest.mark.slow  # compiles the train step of every bucket
def test_plan_of_a_tiny_run_compiles_each_bucket(cv_dir, tmp_path):
    """One compile per bucket (max_batch=1): XLA's memory of the real train step, longer clips needing more."""
    config = tiny_run_config(cv_dir, tmp_path, data=TWO_BUCKETS)
    result = plan(config, memory_gib=4.0, max_batch=1)
    assert [(b.bucket, b.batch) for b in result.buckets] == [(0, 1), (1, 1)]
    short, long = result.buckets
    assert short.samples < long.samples and 0 < short.bytes < long.bytes < 4 * GIB
    assert result.backend == "cpu" and result.budget_bytes == 4 * GIB
    assert result.audio_seconds_budget == int(100 * short.seconds) / 100
    text = format_plan(result)
    assert f"train.per_device_audio_seconds={result.audio_seconds_budget:g}" in text
    assert "a plan made on a CPU approximates a GPU's" in text


def test_format_plan_when_nothing_fits():
    result = Plan([BucketPlan(0, 16000, 16, 4, 3 * GIB), BucketPlan(1, 480000, 64, 0, None)], 4 * GIB, "gpu", 1)
    lines = format_plan(result).splitlines()
    assert lines[3].split() == ["0", "1.00", "4", "3.00", "4.0"]
    assert lines[4].split() == ["1", "30.00", "0", "-", "0.0"]
    assert lines[-1].startswith("not even one clip of the longest bucket fits")
