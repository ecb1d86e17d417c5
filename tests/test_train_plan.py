"""`xlsr-jax plan`: the search finds the largest batch under a memory budget; the memory is XLA's
estimate of the compiled step; a tiny run's plan reads it for each bucket."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from _runs import TINY_ARCH, TWO_BUCKETS, tiny_run_config
from xlsr_jax.backend import target_backend
from xlsr_jax.train.plan import (CHIPS, GIB, BucketPlan, Plan, StepCost, compiled_bytes, format_plan, largest_batch,
                                 plan)


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
    assert len(calls) <= 4, calls  # 1, 2, then where the line meets the budget and one more: 4 compiles


@pytest.mark.parametrize("budget", [999, 1000, 3000, 7268, 100_000])
@pytest.mark.parametrize("memory", [lambda b: 1000 * (-(-b // 8)), lambda b: 100 + b * b, lambda b: 500 + 30 * b + 5 * (b % 4)],
                         ids=["flat-then-steps", "quadratic", "padded"])
def test_largest_batch_when_memory_is_not_a_line(memory, budget):
    """XLA pads and reuses buffers: memory flat over several sizes, or faster than a line; still exact, and
    within about 2 log2(cap) compiles."""
    calls = []
    expected = max([b for b in range(1, 1025) if memory(b) <= budget], default=0)
    assert largest_batch(lambda b: calls.append(b) or memory(b), budget, 1024) == (
        expected, memory(expected) if expected else None)
    assert len(calls) <= 2 * (1024).bit_length(), calls


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


@pytest.mark.slow  # compiles the tiny train step three times
def test_plan_shards_the_state_over_this_hosts_devices_as_the_mesh_says(cv_dir, tmp_path):
    """The tests' 4 CPU devices stand in for a host of 4 GPUs: mesh.fsdp=4 gives each device a quarter of the
    state, as training would; a mesh this host cannot make falls back to one device holding it all."""
    def plan_with(fsdp: int):
        return plan(tiny_run_config(cv_dir, tmp_path, mesh={"fsdp": fsdp}), memory_gib=4.0, max_batch=1)

    replicated, sharded, elsewhere = plan_with(1), plan_with(4), plan_with(8)
    assert (sharded.devices, sharded.mesh) == (4, {"data": 1, "fsdp": 4})
    assert (replicated.devices, replicated.mesh) == (4, {"data": 4, "fsdp": 1})
    assert (elsewhere.devices, elsewhere.mesh) == (1, None)
    whole = replicated.buckets[0].cost.argument_bytes  # the state, and one clip's ~180 KB of inputs
    assert sharded.buckets[0].cost.argument_bytes < 0.6 * whole  # a quarter of the state, the same clip
    assert elsewhere.buckets[0].cost.argument_bytes == pytest.approx(whole, rel=0.05)
    assert "compiled over 4 cpu devices, mesh {'data': 1, 'fsdp': 4}" in format_plan(sharded)
    assert "counted whole on the device" in format_plan(elsewhere)


def test_format_plan_when_nothing_fits():
    result = Plan([BucketPlan(0, 16000, 16, 4, 3 * GIB), BucketPlan(1, 480000, 64, 0, None)], 4 * GIB, "gpu", 1)
    lines = format_plan(result).splitlines()
    assert lines[3].split() == ["0", "1.00", "4", "3.00", "4.0"]
    assert lines[4].split() == ["1", "30.00", "0", "-", "0.0"]
    assert lines[-1].startswith("not even one clip of the longest bucket fits")


def test_format_plan_of_a_topology():
    """Per bucket: per-chip batch, global batch, HBM and its parts, XLA's TFLOPs and the roofline estimate."""
    cost = StepCost(int(6 * GIB), int(1 * GIB), int(5 * GIB), flops=19.7e12, bytes_accessed=819e9 * 0.05)
    result = Plan([BucketPlan(0, 160000, 100, 8, cost.bytes, cost), BucketPlan(1, 320000, 200, 0, None)], 16 * GIB,
                  "TPU v5e", 1, topology="v5e:2x4", devices=8, hosts=1, chip=CHIPS["TPU v5 lite"],
                  mesh={"data": 1, "fsdp": 8}, compile_seconds=75.0, layers_extrapolated=24)
    lines = format_plan(result).splitlines()
    assert any(line.startswith("model.scan_layers: XLA counts a scanned layer once") and line.endswith("to 24")
               for line in lines)
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
    assert result.budget_bytes == int(15.75 * GIB)  # what libtpu's compiler lets a program use of a v5e's 16 GiB
    (bucket,) = result.buckets
    assert bucket.batch == 1 and bucket.cost.bytes == bucket.bytes
    assert 0 < bucket.cost.argument_bytes < bucket.bytes < GIB and bucket.cost.flops > 0
    assert "roofline" in format_plan(result)


@pytest.mark.slow  # compiles the tiny train step three times
def test_unrolled_costs_of_a_scanned_model_count_every_layer(cv_dir, tmp_path):
    """XLA counts a scanned layer once; `unrolled_costs` (1- and 2-layer compiles, extrapolated) gives the FLOPs
    and bytes of the same step with its 4 layers unrolled."""
    from xlsr_jax.config import from_dict, to_dict
    from xlsr_jax.text import Vocab
    from xlsr_jax.train.plan import step_memory, unrolled_costs
    from xlsr_jax.train.setup import build_model

    config = tiny_run_config(cv_dir, tmp_path)
    arch = {**config.model.architecture, "num_hidden_layers": 4}
    vocab = Vocab.build(["abc de"])
    shape = (2, 16000, 12)

    def cost(scan: bool):
        tree = to_dict(config)
        c = from_dict({**tree, "model": {**tree["model"], "architecture": arch, "scan_layers": scan}})
        model, _ = build_model(c, vocab)
        costs = {}
        step_memory(c, model, 10, vocab.pad_id, None, costs)(*shape)
        return c, model, costs[shape]

    _, _, unrolled = cost(False)
    scanned_config, scanned_model, scanned = cost(True)
    assert scanned.flops < 0.7 * unrolled.flops  # the scan's body counted once
    total = unrolled_costs(scanned_config, scanned_model, 10, vocab.pad_id, None, {shape: scanned})[shape]
    assert total.flops == pytest.approx(unrolled.flops, rel=0.02)
    assert total.bytes_accessed == pytest.approx(unrolled.bytes_accessed, rel=0.1)
    assert (total.bytes, total.temp_bytes) == (scanned.bytes, scanned.temp_bytes)  # the real step's memory


NEEDS_LIBTPU = "libtpu is not installed: pip install 'xlsr-jax[tpu]' to compile for TPUs"


def test_on_a_tpu_the_model_picks_paths_xla_tpu_compiles():
    """`auto` on a TPU: the plain attention (einsums and a softmax XLA:TPU fuses; cuDNN's kernel exists only on
    NVIDIA GPUs) and XLA's grouped convolution for the positional conv (the GPU's "isolated" and the CPU's
    "fft"/"tap_grad" work around those backends' slow grouped-conv gradients)."""
    from xlsr_jax.backend import compiling_for
    from xlsr_jax.model.encoder import _resolve_attention
    from xlsr_jax.model.pos_conv import resolve_impl

    with compiling_for("tpu"):
        assert _resolve_attention("auto", jnp.bfloat16, 64) == "plain"
        assert resolve_impl("auto", jnp.bfloat16) == resolve_impl("auto", jnp.float32) == "xla"
    with compiling_for("gpu"):  # the same call picks differently for another target: the test sees the target
        assert _resolve_attention("auto", jnp.bfloat16, 64) == "cudnn"
        assert resolve_impl("auto", jnp.bfloat16) == "isolated"


def _xlsr53_run(cv_dir, tmp_path, **model):
    """A fine-tuning run of the XLSR-53 architecture as a TPU run trains it: bfloat16, scanned layers, remat,
    FSDP over 4 chips, 2 clips a chip."""
    from _models import xlsr53_config
    from xlsr_jax.config import from_dict, to_dict

    arch = {key: getattr(xlsr53_config(), key) for key in TINY_ARCH}  # every field the tiny runs set
    tree = to_dict(tiny_run_config(cv_dir, tmp_path, mesh={"fsdp": 4}, precision="bfloat16",
                                   per_device_batch_size=2))
    tree["model"].update(architecture=arch, scan_layers=True, remat_policy="full", freeze_feature_encoder=True,
                         **model)
    return from_dict(tree)


@pytest.mark.slow  # compiles XLSR-53's train and eval steps for a TPU (libtpu): minutes on 2 cores
@pytest.mark.timeout(1500)
def test_xlsr53_train_and_eval_steps_compile_for_v5e_and_fit_its_hbm(cv_dir, tmp_path):
    """What `train` compiles on a v5e-4 (v5e:2x2), at the XLSR-53 shape with 10 s clips: each step fits a v5e
    chip's 16 GiB, and FSDP holds a quarter of the state on each chip."""
    pytest.importorskip("libtpu", reason=NEEDS_LIBTPU)
    from _models import xlsr53_config
    from xlsr_jax.model import FlaxWav2Vec2ForCTC, num_params
    from xlsr_jax.recipe import tasks
    from xlsr_jax.train.ctc import CTC
    from xlsr_jax.train.plan import compile_run, format_run_compile

    result = compile_run(_xlsr53_run(cv_dir, tmp_path), CTC(tasks()), "v5e:2x2", seconds=(10,))
    assert (result.devices, result.hosts, result.mesh) == (4, 1, {"data": 1, "fsdp": 4})
    steps = {s.name: s for s in result.steps}
    assert steps.keys() == {"train", "eval"} and steps["train"].shape[:2] == (8, 160000)
    assert result.budget_bytes == int(15.75 * GIB) and result.fits
    # float32 parameters and Adam's two moments of the trainable ones (not the frozen conv feature encoder), a
    # quarter on each chip, plus the batch and the replicated scalars
    params = FlaxWav2Vec2ForCTC(xlsr53_config()).abstract_params()
    weights, frozen = 4 * num_params(params), 4 * num_params(params["wav2vec2"]["feature_extractor"])
    state = weights + 2 * (weights - frozen)
    assert state / 4 < steps["train"].cost.argument_bytes < state / 4 + 0.05 * GIB
    assert weights / 4 < steps["eval"].cost.argument_bytes < weights / 4 + 0.05 * GIB  # parameters only
    assert "fits 15.75 GiB" in format_run_compile(result)


@pytest.mark.slow  # compiles the tiny model's steps for a TPU slice of 2 hosts (libtpu)
@pytest.mark.timeout(900)
@pytest.mark.parametrize("objective", ["ctc", "pretraining"])
def test_steps_compile_for_a_two_host_slice_with_fsdp_across_hosts(cv_dir, tmp_path, objective):
    """A v4-16 is 8 chips on 2 hosts: `mesh.fsdp=8` shards the state across both, as `train` with
    mesh.distributed=true runs it there; fine-tuning and pretraining compile."""
    pytest.importorskip("libtpu", reason=NEEDS_LIBTPU)
    from _runs import tiny_pretrain_config
    from xlsr_jax.config import from_dict, to_dict
    from xlsr_jax.train.plan import compile_run

    if objective == "ctc":
        from xlsr_jax.recipe import tasks
        from xlsr_jax.train.ctc import CTC

        config, chosen = tiny_run_config(cv_dir, tmp_path, mesh={"fsdp": 8}), CTC(tasks())
    else:
        from xlsr_jax.pretrain.objective import Pretraining

        tree = to_dict(tiny_pretrain_config(cv_dir, tmp_path))
        config, chosen = from_dict({**tree, "mesh": {"fsdp": 8}}), Pretraining()
    result = compile_run(config, chosen, "v4-16")
    assert (result.devices, result.hosts, result.mesh) == (8, 2, {"data": 1, "fsdp": 8})
    assert [s.name for s in result.steps] == ["train", "eval"] and result.fits
    assert all(s.shape[0] == 8 for s in result.steps)  # a clip a chip


@pytest.mark.slow  # compiles the tiny train step for a TPU (libtpu)
def test_a_batch_that_cannot_fit_is_reported_not_raised(cv_dir, tmp_path):
    """Not one clip within the budget: plan says so (batch 0) instead of failing."""
    pytest.importorskip("libtpu", reason=NEEDS_LIBTPU)

    result = plan(tiny_run_config(cv_dir, tmp_path), memory_gib=1e-4, max_batch=4, topology="v5e:2x2")
    assert [(b.batch, b.cost) for b in result.buckets] == [(0, None)]
    assert "not even one clip of the longest bucket fits" in format_plan(result)


def test_a_compiled_step_over_the_chips_hbm_is_named():
    from xlsr_jax.train.plan import CompiledStep, RunCompile, format_run_compile

    steps = [CompiledStep("train", (4, 16000, 10), StepCost(2 * GIB, GIB, GIB, 0, 0)),
             CompiledStep("eval", (4, 16000, 10), StepCost(GIB // 2, GIB // 4, GIB // 4, 0, 0)),
             CompiledStep("eval", (4, 32000, 20), None)]  # the compiler ran out of HBM
    compiled = RunCompile("v5e:2x2", "TPU v5 lite", 4, 1, {"data": 4, "fsdp": 1}, GIB, steps, 1.0)
    assert not compiled.fits
    lines = format_run_compile(compiled).splitlines()
    assert lines[0].startswith("v5e:2x2: 4 TPU v5e chips on 1 host(s)")
    assert lines[2].split() == ["train", "4", "1.00", "2.00", "1.00", "1.00", "NO"]
    assert lines[3].split() == ["eval", "4", "1.00", "0.50", "0.25", "0.25", "yes"]
    assert lines[4].split()[:3] == ["eval", "4", "2.00"] and lines[4].endswith("NO: the compiler ran out of HBM for it")
    assert not RunCompile("v5e:2x2", "TPU v5 lite", 4, 1, {}, GIB, steps[1:], 1.0).fits  # the refused one alone
    assert RunCompile("v5e:2x2", "TPU v5 lite", 4, 1, {}, GIB, steps[1:2], 1.0).fits
    assert lines[-1].startswith("a step does not fit")


def test_a_program_the_tpu_compiler_cannot_fit_is_none_not_an_error():
    """XLA:TPU checks a program's buffers against the chip's HBM while compiling: 160 GB of temporaries on a
    16 GiB v5e raise RESOURCE_EXHAUSTED, which plan takes for "does not fit"."""
    pytest.importorskip("libtpu", reason=NEEDS_LIBTPU)
    from xlsr_jax.train.plan import compile_within_memory
    from xlsr_jax.train.topology import topology_devices

    chip = jax.sharding.SingleDeviceSharding(topology_devices("v5e-1")[0])
    sort_rows = jax.jit(lambda x: jnp.sort(x @ x.T, axis=0)[::7].sum(0), in_shardings=chip, out_shardings=chip)
    small = compile_within_memory(sort_rows.lower(jax.ShapeDtypeStruct((1000, 1024), jnp.float32, sharding=chip)))
    assert small is not None and small.memory_analysis().temp_size_in_bytes > 1000 * 1000 * 4
    assert compile_within_memory(sort_rows.lower(jax.ShapeDtypeStruct((200_000, 1024), jnp.float32,
                                                                      sharding=chip))) is None


@pytest.mark.parametrize("name, usable_gib", [("v5e-1", 15.75), ("v4-8", 30.75), ("v5p-8", 95.74), ("v6e-4", 31.25)])
def test_the_hbm_a_program_may_use_is_the_compilers(name, usable_gib):
    """Less than the chip's HBM: a v4 plan at 31.96 GiB compiled (temporaries under 30.75 GiB) but would not run."""
    pytest.importorskip("libtpu", reason=NEEDS_LIBTPU)
    from xlsr_jax.train.plan import usable_hbm_bytes
    from xlsr_jax.train.topology import topology_devices

    device = topology_devices(name)[0]
    assert usable_hbm_bytes(device) == int(usable_gib * GIB) < CHIPS[device.device_kind].hbm_gib * GIB
