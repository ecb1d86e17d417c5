"""`xlsr-jax plan`: how many clips of each training bucket fit one device, before renting it.

For each bucket the train step is compiled with abstract inputs (nothing is allocated) and XLA's memory
estimate of the compiled step is read; a doubling-then-bisection search finds the largest per-device
micro-batch whose step fits the budget. Without `topology` the step is compiled for ONE device of the
backend the plan runs on (a plan made on a CPU approximates a GPU's: other fusions, other temporaries).

With `topology` (`v5e:2x4`, `v4:2x2x4`, ...) it is compiled for that TPU slice, on any host, without a
TPU: libtpu (`pip install 'xlsr-jax[tpu]'`) compiles for a topology's devices ahead of time
(`jax.experimental.topologies`, as MaxText's train_compile.py does), over the config's real mesh
(`mesh.fsdp` shards parameters and optimizer state as in training), and the model traces what it traces
on a TPU (`backend.compiling_for`). XLA's per-chip memory and FLOP counts then give each bucket's HBM
use and a roofline estimate of the step time from the chip's published peak (CHIPS).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import jax

from xlsr_jax import parallel
from xlsr_jax.backend import compiling_for
from xlsr_jax.checkpoint import abstract_with_shardings
from xlsr_jax.config import Config, MeshConfig
from xlsr_jax.errors import UserError
from xlsr_jax.data.audio import SAMPLING_RATE
from xlsr_jax.aot import abstract_batch
from xlsr_jax.train.optim import build_optimizer
from xlsr_jax.train.setup import build_data, build_model
from xlsr_jax.train.state import create_state
from xlsr_jax.train.step import jit_train_step

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU chip's published figures (per chip)."""
    name: str
    hbm_gib: float
    bf16_tflops: float  # peak dense bfloat16 matmul FLOP/s / 1e12
    hbm_gbps: float  # HBM bandwidth, GB/s
    source: str


# By the `device_kind` libtpu gives a topology's devices. From Google's Cloud TPU pages (2026-12).
CHIPS = {
    "TPU v4": Chip("v4", 32, 275, 1200, "https://cloud.google.com/tpu/docs/v4"),
    "TPU v5 lite": Chip("v5e", 16, 197, 819, "https://cloud.google.com/tpu/docs/v5e"),
    "TPU v5": Chip("v5p", 95, 459, 2765, "https://cloud.google.com/tpu/docs/v5p"),
    "TPU v6 lite": Chip("v6e", 32, 918, 1640, "https://cloud.google.com/tpu/docs/v6e"),
}


@dataclasses.dataclass(frozen=True)
class StepCost:
    """XLA's figures for one compiled train step, per device."""
    bytes: int  # compiled_bytes: what one call needs
    argument_bytes: int  # the train state (parameters, optimizer state) and the batch
    temp_bytes: int  # activations kept for the backward pass and other temporaries
    flops: float  # XLA's count (recomputation under remat included)
    bytes_accessed: float


@dataclasses.dataclass(frozen=True)
class BucketPlan:
    bucket: int
    samples: int  # padded samples S of the bucket's batches
    label_length: int  # padded label length L
    batch: int  # largest per-device micro-batch that fits; 0: not even one clip
    bytes: int | None  # XLA's estimate for `batch` (None when nothing fits)
    cost: StepCost | None = None  # XLA's figures for `batch` (topology plans)

    @property
    def seconds(self) -> float:
        return self.samples / SAMPLING_RATE

    @property
    def audio_seconds(self) -> float:
        """Padded audio seconds of one per-device micro-batch."""
        return self.batch * self.seconds


@dataclasses.dataclass(frozen=True)
class Plan:
    buckets: list[BucketPlan]
    budget_bytes: int
    backend: str  # where the step was compiled (its memory estimate is that backend's)
    accum: int  # gradient accumulation micro-batches per step (compiled as in training)
    topology: str | None = None  # the TPU slice compiled for, e.g. "v5e:2x4"
    devices: int = 1  # devices the step is compiled over
    hosts: int = 1
    chip: Chip | None = None
    mesh: dict | None = None  # {axis: size}
    compile_seconds: float = 0.0
    scanned: bool = False  # layers under lax.scan: XLA's cost analysis counts the loop body once

    @property
    def audio_seconds_budget(self) -> float:
        """Per-device padded audio seconds every bucket fits: min over buckets of batch x seconds."""
        # Rounded down: a budget a hair above a bucket's batch x seconds could give another bucket one more clip.
        return math.floor(100 * min(b.audio_seconds for b in self.buckets)) / 100


def compiled_bytes(compiled: Any) -> int:
    """Device memory one call of a compiled step needs, from XLA's buffer assignment: arguments +
    outputs + temporaries + generated code, less the outputs that reuse donated arguments (aliases)."""
    m = compiled.memory_analysis()
    if m is None:
        raise UserError(f"plan: the {jax.default_backend()} backend gives no memory analysis of a compiled step")
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes + m.generated_code_size_in_bytes)


def largest_batch(memory: Callable[[int], int], budget: int, cap: int = 1024) -> tuple[int, int | None]:
    """(largest b in [1, cap] with memory(b) <= budget, memory(b)), assuming memory grows with b;
    (0, None) when b = 1 does not fit. Doubles b until it does not fit, then bisects: about
    2 log2(b) calls of `memory`."""
    seen: dict[int, int] = {}

    def fits(b: int) -> bool:
        seen[b] = memory(b)
        return seen[b] <= budget

    if not fits(1):
        return 0, None
    lo, hi = 1, cap + 1  # lo fits; hi does not (cap + 1: not tried)
    while 2 * lo <= cap:
        if not fits(2 * lo):
            hi = 2 * lo
            break
        lo *= 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, seen[lo]


def step_cost(compiled: Any) -> StepCost:
    m, cost = compiled.memory_analysis(), compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    return StepCost(compiled_bytes(compiled), int(m.argument_size_in_bytes), int(m.temp_size_in_bytes),
                    float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0)))


def step_memory(config: Config, model, steps: int, blank_id: int, devices: list | None = None,
                costs: dict | None = None) -> Callable[[int, int, int], int]:
    """`memory(batch, samples, label_length)`: bytes per device of the train step compiled with a
    per-device micro-batch of `batch` clips (x gradient accumulation rows), as `train` would step it:
    for one local device, or over `devices` (a TPU topology's) with the config's mesh. Each compiled
    step's StepCost goes into `costs[(batch, samples, label_length)]` when given."""
    if devices is None:
        mesh = parallel.make_mesh(MeshConfig(), devices=jax.local_devices()[:1])
    else:
        mesh = parallel.make_mesh(config.mesh, devices=devices)
    abstract_params = model.abstract_params()
    tx, schedule = build_optimizer(config.optim, steps, abstract_params, config.model.freeze_feature_encoder,
                                   config.model.freeze_transformer_steps)
    abstract_state = jax.eval_shape(lambda p: create_state(p, tx, config.train.seed), abstract_params)
    shardings = parallel.tree_shardings(abstract_state, mesh, config.mesh.rules)
    accum = config.optim.gradient_accumulation_steps
    jitted = jit_train_step(model, tx, schedule, blank_id=blank_id, reduction=config.model.ctc_loss_reduction,
                            accum=accum, state_shardings=shardings, mesh=mesh)
    first, batch_sharding = abstract_with_shardings(abstract_state, shardings), parallel.batch_sharding(mesh)

    def memory(batch: int, samples: int, label_length: int) -> int:
        shape = (batch * accum * mesh.size, samples, label_length)
        cost = step_cost(jitted.lower(first, abstract_batch(shape, batch_sharding)).compile())
        if costs is not None:
            costs[(batch, samples, label_length)] = cost
        return cost.bytes
    return memory


def topology_devices(name: str) -> list:
    """The devices of TPU topology `name` (e.g. "v5e:2x4"), compiled for without a TPU (libtpu)."""
    try:
        from jax.experimental import topologies

        return list(topologies.get_topology_desc(topology_name=name, platform="tpu").devices)
    except Exception as err:  # libtpu missing, or a name it does not know
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"plan --topology {name}: cannot compile for it ({reason}); it needs libtpu "
                        "(pip install 'xlsr-jax[tpu]') and a name such as v5e:2x4, v4:2x2x1, v5p:2x2x1, v6e:2x4 "
                        "or a multi-host slice (v5e:4x4, v4:2x2x4)") from None


def device_memory_bytes() -> int | None:
    """The first local device's memory limit, where its backend reports one (GPUs, TPUs; not CPUs)."""
    stats = jax.local_devices()[0].memory_stats()
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def plan(config: Config, memory_gib: float | None = None, max_batch: int = 1024,
         topology: str | None = None) -> Plan:
    """The largest per-device micro-batch of every training bucket whose train step fits `memory_gib`
    GiB (default: this device's memory, or the HBM of `topology`'s chip), searched in parallel threads
    (one per bucket)."""
    # The training data as `train` builds it (its buckets are the step shapes); evaluation is not planned.
    # Built before libtpu is loaded: the decoding workers must not load it again.
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, eval=()))
    per_device = config.train.per_device_batch_size * config.optim.gradient_accumulation_steps
    budget = int(memory_gib * GIB) if memory_gib is not None else None
    if budget is None and topology is None:
        budget = device_memory_bytes()
        if budget is None:
            raise UserError(f"plan: this {jax.default_backend()} device reports no memory size; give --memory-gib "
                            "(e.g. 80 for an 80 GB GPU)")
    data = build_data(config, Path(config.train.output_dir), per_device, per_device, data_parallel=1)
    devices, chip = None, None
    if topology is not None:
        devices = topology_devices(topology)
        chip = CHIPS.get(devices[0].device_kind)
        if budget is None:
            if chip is None:
                raise UserError(f"plan --topology {topology}: no HBM size known for {devices[0].device_kind!r}; "
                                "give --memory-gib")
            budget = int(chip.hbm_gib * GIB)
    model, host_params = build_model(config, data.vocab)
    del host_params  # only the shapes matter
    from xlsr_jax.train.loop import total_steps  # the learning-rate schedule's length, as in training

    costs: dict = {}
    with compiling_for("tpu") if topology is not None else contextlib.nullcontext():
        memory = step_memory(config, model, total_steps(config, data.train.batches_per_epoch), data.vocab.pad_id,
                             devices, costs)

        def one(bucket: int, samples: int, label_length: int) -> BucketPlan:
            batch, used = largest_batch(lambda b: memory(b, samples, label_length), budget, max_batch)
            return BucketPlan(bucket, samples, label_length, batch, used, costs.get((batch, samples, label_length)))

        shapes = {b: (s, length) for b, (_, s, length) in data.train.batch_shapes.items()}
        start = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(shapes), os.cpu_count() or 1)) as pool:
            futures = [pool.submit(one, b, s, length) for b, (s, length) in sorted(shapes.items())]
            buckets = [f.result() for f in futures]
    if topology is None:
        return Plan(buckets, budget, jax.default_backend(), config.optim.gradient_accumulation_steps)
    mesh = parallel.make_mesh(config.mesh, devices=devices)
    return Plan(buckets, budget, f"TPU {chip.name if chip else devices[0].device_kind}",
                config.optim.gradient_accumulation_steps, topology=topology, devices=len(devices),
                hosts=len({d.process_index for d in devices}), chip=chip, mesh=dict(mesh.shape),
                compile_seconds=time.monotonic() - start, scanned=config.model.scan_layers)


def roofline_seconds(cost: StepCost, chip: Chip) -> tuple[float, str]:
    """(a lower bound on the step's time on `chip`, "compute" or "memory": which bound it is): XLA's
    FLOPs at the chip's peak bf16 rate, or its bytes accessed at the chip's HBM bandwidth."""
    compute, memory = cost.flops / (chip.bf16_tflops * 1e12), cost.bytes_accessed / (chip.hbm_gbps * 1e9)
    return (compute, "compute") if compute >= memory else (memory, "memory")


def format_topology_plan(result: Plan) -> str:
    """`format_plan` for a TPU topology: per bucket the batch that fits a chip's HBM, what fills it, and the
    roofline estimate of the step."""
    chip = result.chip
    lines = [f"{result.topology}: {result.devices} {result.backend} chips on {result.hosts} host(s), mesh "
             f"{result.mesh}; train step compiled for it ahead of time (libtpu, no TPU needed) in "
             f"{result.compile_seconds:.0f} s",
             f"largest per-chip batch of each training bucket within {result.budget_bytes / GIB:.2f} GiB of HBM "
             "(XLA's memory analysis per chip)",
             f"{'bucket':>6}  {'padded s':>8}  {'batch':>5}  {'global':>6}  {'HBM GiB':>7}  {'state+in':>8}  "
             f"{'temp':>6}  {'TFLOP':>7}  {'roofline ms':>11}  {'bound':>7}  {'audio s/s':>9}"]
    for b in result.buckets:
        if b.cost is None:
            lines.append(f"{b.bucket:>6}  {b.seconds:>8.2f}  {0:>5}  {0:>6}  not even one clip fits a chip")
            continue
        c, glob = b.cost, b.batch * result.accum * result.devices
        if chip is not None:
            seconds, bound = roofline_seconds(c, chip)
            timing = f"{1e3 * seconds:>11.1f}  {bound:>7}  {glob * b.seconds / seconds:>9.0f}"
        else:
            timing = f"{'-':>11}  {'-':>7}  {'-':>9}"
        lines.append(f"{b.bucket:>6}  {b.seconds:>8.2f}  {b.batch:>5}  {glob:>6}  {c.bytes / GIB:>7.2f}  "
                     f"{c.argument_bytes / GIB:>8.2f}  {c.temp_bytes / GIB:>6.2f}  {c.flops / 1e12:>7.2f}  {timing}")
    if chip is not None:
        lines.append(f"roofline: XLA's FLOPs per chip at {chip.bf16_tflops:g} TFLOP/s (bf16 peak) or its bytes at "
                     f"{chip.hbm_gbps:g} GB/s, whichever is longer ({chip.source}): an estimate, not a measurement")
    if result.scanned:
        lines.append("model.scan_layers: XLA counts the scanned layers' FLOPs and bytes once, not once a layer, so "
                     "TFLOP and the roofline undercount the step; memory is exact")
    lines.append("batch is per chip (the micro-batch under gradient accumulation); global: the step's clips")
    budget = result.audio_seconds_budget
    if budget > 0:
        lines.append(f"suggested: --set train.per_device_audio_seconds={budget:g}")
    else:
        lines.append("not even one clip of the longest bucket fits: lower data.max_duration_s, recompute "
                     "activations (model.remat_policy), shard over more chips (mesh.fsdp) or use a larger slice")
    return "\n".join(lines)


def format_plan(result: Plan) -> str:
    """The table `xlsr-jax plan` prints, and the per-device audio-seconds budget it suggests."""
    if result.topology is not None:
        return format_topology_plan(result)
    lines = [f"largest per-device batch of each training bucket within {result.budget_bytes / GIB:.2f} GiB, by "
             f"XLA's memory estimate of the train step compiled for one {result.backend} device",
             f"(figures hold for {result.backend}; a plan made on a CPU approximates a GPU's)",
             f"{'bucket':>6}  {'padded s':>8}  {'batch':>5}  {'memory GiB':>10}  {'audio s/batch':>13}"]
    for b in result.buckets:
        used = f"{b.bytes / GIB:.2f}" if b.bytes is not None else "-"
        lines.append(f"{b.bucket:>6}  {b.seconds:>8.2f}  {b.batch:>5}  {used:>10}  {b.audio_seconds:>13.1f}")
    budget = result.audio_seconds_budget
    if budget == 0:
        lines.append("not even one clip of the longest bucket fits: lower data.max_duration_s, recompute "
                     "activations (model.remat_policy), or use a larger device")
        return "\n".join(lines)
    if result.accum > 1:
        lines.append(f"batch is the micro-batch: each step runs {result.accum} of them (gradient accumulation)")
    lines.append("parameters and optimizer state are counted whole on the device; mesh.fsdp > 1 shards them")
    lines.append(f"suggested: --set train.per_device_audio_seconds={budget:g}  (token-budget batching: each "
                 "bucket gets the most clips within it)")
    return "\n".join(lines)
