"""`xlsr-jax plan`: the search finds the largest batch under a memory budget; the memory is XLA's
estimate of the compiled step; a tiny run's plan reads it for each bucket."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from _runs import TWO_BUCKETS, tiny_run_config
from xlsr_jax.backend import target_backend
from xlsr_jax.train.plan import (CHIPS, GIB, BucketPlan, Plan, StepCost, compiled_bytes, format_plan, largest_batch,
                                 plan, roofline_seconds)


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


def test_roofline_is_the_longer_of_compute_and_memory_time():
    v5e = CHIPS["TPU v5 lite"]
    assert (v5e.hbm_gib, v5e.bf16_tflops, v5e.hbm_gbps) == (16, 197, 819)
    compute_bound = StepCost(GIB, GIB // 2, GIB // 2, flops=197e12 * 0.5, bytes_accessed=819e9 * 0.1)
    assert roofline_seconds(compute_bound, v5e) == (pytest.approx(0.5), "compute")
    memory_bound = StepCost(GIB, GIB // 2, GIB // 2, flops=197e12 * 0.1, bytes_accessed=819e9 * 0.25)
    assert roofline_seconds(memory_bound, v5e) == (pytest.approx(0.25), "memory")


def test_format_plan_of_a_topology():
    """Per bucket: per-chip batch, global batch, HBM and its parts, XLA's TFLOPs and the roofline estimate."""
    cost = StepCost(int(6 * GIB), int(1 * GIB), int(5 * GIB), flops=19.7e12, bytes_accessed=819e9 * 0.05)
    result = Plan([BucketPlan(0, 160000, 100, 8, cost.bytes, cost), BucketPlan(1, 320000, 200, 0, None)], 16 * GIB,
                  "TPU v5e", 1, topology="v5e:2x4", devices=8, hosts=1, chip=CHIPS["TPU v5 lite"],
                  mesh={"data": 1, "fsdp": 8}, compile_seconds=75.0, scanned=True)
    lines = format_plan(result).splitlines()
    assert any(line.startswith("model.scan_layers: XLA counts the scanned layers' FLOPs") for line in lines)
    assert lines[0].startswith("v5e:2x4: 8 TPU v5e chips on 1 host(s), mesh {'data': 1, 'fsdp': 8}")
    assert lines[0].endswith("in 75 s")
    # 19.7 TFLOP at 197 TFLOP/s: 100 ms, compute-bound; 64 clips of 10 s in 0.1 s: 6400 audio s/s
    assert lines[3].split() == ["0", "10.00", "8", "64", "6.00", "1.00", "5.00", "19.70", "100.0", "compute", "6400"]
    assert lines[4].split()[:4] == ["1", "20.00", "0", "0"] and "not even one clip fits a chip" in lines[4]
    assert lines[-1].startswith("not even one clip of the longest bucket fits")


@pytest.mark.slow  # compiles the train step for a TPU (libtpu)
@pytest.mark.timeout(900)
def test_plan_compiles_the_train_step_for_a_tpu_topology_without_a_tpu(cv_dir, tmp_path, monkeypatch):
    """The model traced for a TPU (its kernel choices asked the target: always "tpu"), compiled for 4 v5e chips."""
    pytest.importorskip("libtpu", reason="libtpu is not installed: pip install 'xlsr-jax[tpu]' to compile for TPUs")
    from xlsr_jax.model import kernels

    seen = []
    monkeypatch.setattr(kernels, "target_backend", lambda: seen.append(target_backend()) or seen[-1])
    config = tiny_run_config(cv_dir, tmp_path, mesh={"fsdp": 4})
    result = plan(config, max_batch=1, topology="v5e:2x2")
    assert seen and set(seen) == {"tpu"}
    assert (result.backend, result.devices, result.hosts, result.mesh) == ("TPU v5e", 4, 1, {"data": 1, "fsdp": 4})
    assert result.budget_bytes == 16 * GIB
    (bucket,) = result.buckets
    assert bucket.batch == 1 and bucket.cost.bytes == bucket.bytes
    assert 0 < bucket.cost.argument_bytes < bucket.bytes < GIB and bucket.cost.flops > 0
    assert "roofline" in format_plan(result)


def test_an_unknown_topology_is_named():
    pytest.importorskip("libtpu", reason="libtpu is not installed: pip install 'xlsr-jax[tpu]' to compile for TPUs")
    from xlsr_jax.errors import UserError
    from xlsr_jax.train.plan import topology_devices

    with pytest.raises(UserError, match="plan --topology v9z:2x2: cannot compile for it"):
        topology_devices("v9z:2x2")
