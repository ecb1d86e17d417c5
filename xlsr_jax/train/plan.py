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
import re
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from xlsr_jax import parallel
from xlsr_jax.backend import compiling_for
from xlsr_jax.checkpoint import abstract_with_shardings
from xlsr_jax.config import Config, MeshConfig
from xlsr_jax.errors import UserError
from xlsr_jax.data.audio import SAMPLING_RATE
from xlsr_jax.aot import abstract_batch
from xlsr_jax.train.setup import abstract_state, build_data, build_model
from xlsr_jax.train.step import jit_train_step
from xlsr_jax.train.topology import CHIPS, Chip, roofline_seconds, topology_devices, tpu_slice

GIB = 1024 ** 3


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
    layers_extrapolated: int = 0  # > 0: FLOPs and bytes are `unrolled_costs`' for this many layers
    lengths_given: bool = False  # the buckets are `plan(seconds=...)`'s lengths, not the data's

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
    (0, None) when b = 1 does not fit.

    Each call of `memory` is a compilation (minutes for XLSR-53 on a TPU topology), so after b = 1 and 2
    the next b is where the line through the two largest fitting batches meets the budget: a step's memory
    is close to affine in the batch (the state, plus activations per clip), and then b* and b* + 1 end the
    search (4 calls). After a b that does not fit comes a bisection step, so memory that is flat over several
    sizes or grows faster than a line still ends within about 2 log2(cap) calls."""
    seen: dict[int, int] = {}

    def fits(b: int) -> bool:
        seen[b] = memory(b)
        return seen[b] <= budget

    if not fits(1):
        return 0, None
    lo, hi = 1, cap + 1  # lo fits; hi does not (cap + 1: not tried)
    bisect = False
    while hi - lo > 1:
        fitting = sorted(b for b, used in seen.items() if used <= budget)
        if bisect:
            b = (lo + hi) // 2
        elif len(fitting) < 2:
            b = min(2 * lo, hi - 1)
        else:
            b1, b2 = fitting[-2:]
            slope = (seen[b2] - seen[b1]) / (b2 - b1)
            b = hi - 1 if slope <= 0 else b2 + int((budget - seen[b2]) // slope)
            b = min(max(b, lo + 1), hi - 1)
        ok = fits(b)
        lo, hi = (b, hi) if ok else (lo, b)
        bisect = not ok
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
    for one local device, or over `devices` (a TPU topology's, or this host's) with the config's mesh. Each compiled
    step's StepCost goes into `costs[(batch, samples, label_length)]` when given."""
    if devices is None:
        mesh = parallel.make_mesh(MeshConfig(), devices=jax.local_devices()[:1])
    else:
        mesh = parallel.make_mesh(config.mesh, devices=devices)
    state, shardings, tx, schedule = abstract_state(config, model, mesh, steps)
    accum = config.optim.gradient_accumulation_steps
    jitted = jit_train_step(model, tx, schedule, blank_id=blank_id, reduction=config.model.ctc_loss_reduction,
                            accum=accum, state_shardings=shardings, mesh=mesh)
    first, batch_sharding = abstract_with_shardings(state, shardings), parallel.batch_sharding(mesh)

    def memory(batch: int, samples: int, label_length: int) -> int:
        shape = (batch * accum * mesh.size, samples, label_length)
        compiled = compile_within_memory(jitted.lower(first, abstract_batch(shape, batch_sharding)))
        if compiled is None:
            return OUT_OF_MEMORY
        cost = step_cost(compiled)
        if costs is not None:
            costs[(batch, samples, label_length)] = cost
        return cost.bytes
    return memory


def usable_hbm_bytes(device: Any) -> int:
    """The HBM one program may use on TPU `device`, as libtpu's compiler counts it: less than the chip's
    (15.75 of a v5e's 16 GiB, 30.75 of a v4's 32). Read from the compiler's own refusal of a program far too
    big for any chip, which names it ("exceeds available HBM (15.75G)")."""
    one = jax.sharding.SingleDeviceSharding(device)
    too_big = jax.jit(lambda x: jnp.sort(x @ x.T, axis=0)[::7].sum(0), in_shardings=one, out_shardings=one)
    try:  # 200000 x 200000 float32 temporaries: 149 GiB
        too_big.lower(jax.ShapeDtypeStruct((200_000, 1024), jnp.float32, sharding=one)).compile()
    except jax.errors.JaxRuntimeError as err:
        found = re.search(r"available HBM \(([\d.]+)G\)", str(err))
        if found:
            return int(float(found.group(1)) * GIB)
    chip = CHIPS.get(device.device_kind)
    if chip is None:
        raise UserError(f"plan: no HBM size known for {device.device_kind!r}; give --memory-gib")
    return int(chip.hbm_gib * GIB)


# What `step_memory` answers for a step the compiler refused for want of memory.
OUT_OF_MEMORY = 2 ** 62


def compile_within_memory(lowered: Any) -> Any | None:
    """`lowered.compile()`, or None when the compiler says the program cannot fit the device's memory: XLA:TPU
    checks its buffers against the chip's usable HBM (30.75 of a v4's 32 GiB) and raises RESOURCE_EXHAUSTED
    ("Ran out of memory on HBM") instead of compiling."""
    try:
        return lowered.compile()
    except jax.errors.JaxRuntimeError as err:
        if "RESOURCE_EXHAUSTED" in str(err):
            return None
        raise


def unrolled_costs(config: Config, model, steps: int, blank_id: int, devices: list | None,
                   costs: dict[tuple[int, int, int], StepCost]) -> dict[tuple[int, int, int], StepCost]:
    """`costs` (step_memory's, of a model whose layers run under `lax.scan`, by (batch, samples,
    label_length)) with FLOPs and bytes accessed of every encoder layer: XLA's cost analysis counts a loop
    body once, so a scanned step reports one layer's. The model is cut to one and to two unscanned layers
    and both are compiled; their difference is one layer's cost (forward, backward, its optimizer update),
    counted `num_hidden_layers - 1` more times. The memory figures stay those of the real step."""
    layers = model.config.num_hidden_layers
    cut = {}
    for k in (1, 2):
        config_k = type(model.config).from_dict({**model.config.to_dict(), "num_hidden_layers": k})
        cut[k] = {}
        memory = step_memory(config, model.clone(config=config_k, scan_layers=False), steps, blank_id, devices,
                             cut[k])
        for shape in costs:
            memory(*shape)
    return {shape: dataclasses.replace(
        cost, flops=cut[1][shape].flops + (layers - 1) * (cut[2][shape].flops - cut[1][shape].flops),
        bytes_accessed=cut[1][shape].bytes_accessed + (layers - 1) * (
            cut[2][shape].bytes_accessed - cut[1][shape].bytes_accessed))
        for shape, cost in costs.items()}


def local_mesh_devices(mesh: MeshConfig) -> list | None:
    """This host's devices when the config's mesh covers them and there are several (a host of 8 GPUs with
    mesh.fsdp=8: each device's step holds its shard of the state, as in training); None: plan for one
    device holding the whole state."""
    local = jax.local_devices()
    try:
        parallel.make_mesh(mesh, devices=local)
    except ValueError:  # the mesh spans other hosts' devices, or not all of these
        return None
    return local if len(local) > 1 else None


def device_memory_bytes() -> int | None:
    """The first local device's memory limit, where its backend reports one (GPUs, TPUs; not CPUs)."""
    stats = jax.local_devices()[0].memory_stats()
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def plan(config: Config, memory_gib: float | None = None, max_batch: int = 1024,
         topology: str | None = None, seconds: Sequence[float] = ()) -> Plan:
    """The largest per-device micro-batch of every training bucket whose train step fits `memory_gib`
    GiB (default: this device's memory, or the HBM of `topology`'s chip), searched in parallel threads
    (one per bucket). `seconds`: plan buckets of these padded lengths instead of the data's (labels as
    long per second as the data's densest bucket), e.g. the 15 s clips a full Common Voice release has."""
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
    if topology is None:
        devices = local_mesh_devices(config.mesh)
    else:
        devices = topology_devices(topology)
        chip = CHIPS.get(devices[0].device_kind)
        if budget is None:
            budget = usable_hbm_bytes(devices[0])
    model, _ = build_model(config, data.vocab, weights=False)  # only the shapes matter
    from xlsr_jax.train.loop import total_steps  # the learning-rate schedule's length, as in training

    costs: dict = {}
    with compiling_for("tpu") if topology is not None else contextlib.nullcontext():
        steps = total_steps(config, data.train.batches_per_epoch)
        memory = step_memory(config, model, steps, data.vocab.pad_id, devices, costs)

        def one(bucket: int, samples: int, label_length: int) -> BucketPlan:
            batch, used = largest_batch(lambda b: memory(b, samples, label_length), budget, max_batch)
            return BucketPlan(bucket, samples, label_length, batch, used, costs.get((batch, samples, label_length)))

        shapes = {b: (s, length) for b, (_, s, length) in data.train.batch_shapes.items()}
        if seconds:
            shapes = dict(enumerate((s, length) for _, s, length in _shapes(data.train.batch_shapes.values(), seconds)))
        start = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(shapes), os.cpu_count() or 1)) as pool:
            futures = [pool.submit(one, b, s, length) for b, (s, length) in sorted(shapes.items())]
            buckets = [f.result() for f in futures]
        layers = model.config.num_hidden_layers if topology is not None and config.model.scan_layers else 0
        fitted = {(b.batch, b.samples, b.label_length): b.cost for b in buckets if b.cost is not None}
        if layers and fitted:  # the roofline needs every layer's FLOPs, which a scanned step's analysis lacks
            total = unrolled_costs(config, model, steps, data.vocab.pad_id, devices, fitted)
            buckets = [dataclasses.replace(b, cost=total[(b.batch, b.samples, b.label_length)])
                       if b.cost is not None else b for b in buckets]
    mesh = parallel.make_mesh(config.mesh, devices=devices) if devices is not None else None
    if topology is None:
        return Plan(buckets, budget, jax.default_backend(), config.optim.gradient_accumulation_steps,
                    devices=len(devices) if devices else 1, mesh=dict(mesh.shape) if mesh else None,
                    lengths_given=bool(seconds))
    return Plan(buckets, budget, f"TPU {chip.name if chip else devices[0].device_kind}",
                config.optim.gradient_accumulation_steps, topology=topology, devices=len(devices),
                hosts=len({d.process_index for d in devices}), chip=chip, mesh=dict(mesh.shape),
                compile_seconds=time.monotonic() - start, layers_extrapolated=layers if fitted else 0,
                lengths_given=bool(seconds))


def _buckets(result: Plan) -> str:
    return "padded length given (--seconds)" if result.lengths_given else "training bucket"


def format_topology_plan(result: Plan) -> str:
    """`format_plan` for a TPU topology: per bucket the batch that fits a chip's HBM, what fills it, and the
    roofline estimate of the step."""
    chip = result.chip
    lines = [f"{result.topology}: {result.devices} {result.backend} chips on {result.hosts} host(s), mesh "
             f"{result.mesh}; train step compiled for it ahead of time (libtpu, no TPU needed) in "
             f"{result.compile_seconds:.0f} s",
             f"largest per-chip batch of each {_buckets(result)} within {result.budget_bytes / GIB:.2f} GiB of HBM "
             "(what libtpu lets a program use of a chip's; XLA's memory analysis per chip)",
             f"{'bucket':>6}  {'padded s':>8}  {'batch':>5}  {'global':>6}  {'HBM GiB':>7}  {'state+in':>8}  "
             f"{'temp':>6}  {'TFLOP':>7}  {'roofline ms':>11}  {'bound':>7}  {'audio s/s':>9}"]
    for b in result.buckets:
        if b.cost is None:
            lines.append(f"{b.bucket:>6}  {b.seconds:>8.2f}  {0:>5}  {0:>6}  not even one clip fits a chip")
            continue
        c, glob = b.cost, b.batch * result.accum * result.devices
        if chip is not None:
            seconds, bound = roofline_seconds(c.flops, c.bytes_accessed, chip)
            timing = f"{1e3 * seconds:>11.1f}  {bound:>7}  {glob * b.seconds / seconds:>9.0f}"
        else:
            timing = f"{'-':>11}  {'-':>7}  {'-':>9}"
        lines.append(f"{b.bucket:>6}  {b.seconds:>8.2f}  {b.batch:>5}  {glob:>6}  {c.bytes / GIB:>7.2f}  "
                     f"{c.argument_bytes / GIB:>8.2f}  {c.temp_bytes / GIB:>6.2f}  {c.flops / 1e12:>7.2f}  {timing}")
    if chip is not None:
        lines.append(f"roofline: XLA's FLOPs per chip at {chip.bf16_tflops:g} TFLOP/s (bf16 peak) or its bytes at "
                     f"{chip.hbm_gbps:g} GB/s, whichever is longer ({chip.source}): an estimate, not a measurement")
    if result.layers_extrapolated:
        lines.append(f"model.scan_layers: XLA counts a scanned layer once, so TFLOP and bytes are those of the step "
                     f"cut to 1 and 2 unscanned layers, extrapolated to {result.layers_extrapolated}")
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
    where = (f"over {result.devices} {result.backend} devices, mesh {result.mesh}" if result.devices > 1 else
             f"for one {result.backend} device")
    lines = [f"largest per-device batch of each {_buckets(result)} within {result.budget_bytes / GIB:.2f} GiB, by "
             f"XLA's memory estimate of the train step compiled {where}",
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
    if result.devices == 1:
        lines.append("parameters and optimizer state are counted whole on the device; mesh.fsdp > 1 shards them")
    lines.append(f"suggested: --set train.per_device_audio_seconds={budget:g}  (token-budget batching: each "
                 "bucket gets the most clips within it)")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    name: str  # "train" or "eval"
    shape: tuple[int, int, int]  # the step's global batch (B, S, L)
    cost: StepCost | None  # per chip; None: the compiler found it cannot fit the chip's HBM


@dataclasses.dataclass(frozen=True)
class RunCompile:
    """A run's steps compiled for a TPU slice as `train` compiles them (`compile_run`)."""
    topology: str
    chip_kind: str  # libtpu's device_kind, e.g. "TPU v5 lite"
    devices: int
    hosts: int
    mesh: dict
    budget_bytes: int  # the chip's HBM
    steps: list[CompiledStep]
    seconds: float  # to trace and compile them all

    @property
    def fits(self) -> bool:
        return all(s.cost is not None and s.cost.bytes <= self.budget_bytes for s in self.steps)


def compile_run(config: Config, objective, topology: str, seconds: Sequence[float] = ()) -> RunCompile:
    """Every step a run of `config` compiles (train, and eval with eval data, each for every bucket at the
    configured batch), compiled for TPU slice `topology` over the config's mesh as `train` would compile
    them on it, with XLA's per-chip memory and cost of each. `objective`: train/objective.py's (fine-tuning
    or pretraining). `seconds`: compile buckets of these padded lengths instead of the data's (the
    configured batch; labels as long per second as the data's densest bucket)."""
    spec = tpu_slice(topology)
    accum = config.optim.gradient_accumulation_steps
    per_device = config.train.per_device_batch_size
    eval_per_device = config.eval.per_device_batch_size or per_device
    # Built before libtpu is loaded (the decoding workers must not load it again); batches split over every chip.
    data = objective.build_data(config, Path(config.train.output_dir), per_device * spec.chips * accum,
                                eval_per_device * spec.chips, data_parallel=spec.chips)
    devices = topology_devices(topology)
    mesh = parallel.make_mesh(config.mesh, devices=devices)
    from xlsr_jax.train.loop import total_steps  # the learning-rate schedule's length, as in training

    model = objective.shaped_model(config, data)
    state, shardings, tx, schedule = abstract_state(config, model, mesh, total_steps(config, data.train.batches_per_epoch))
    start = time.monotonic()
    with compiling_for("tpu"):
        train_jit, eval_jit = objective.jit_steps(config, data, model, tx, schedule, shardings, mesh)
        todo = [("train", train_jit, abstract_with_shardings(state, shardings), data.train)]
        if eval_jit is not None:
            todo.append(("eval", eval_jit, abstract_with_shardings(state.params, shardings.params), data.eval))
        batch_sharding = parallel.batch_sharding(mesh)
        lowered = [(name, shape, jitted.lower(first, abstract_batch(shape, batch_sharding)))
                   for name, jitted, first, loader in todo for shape in _shapes(loader.batch_shapes.values(), seconds)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        compiled = list(pool.map(lambda item: compile_within_memory(item[2]), lowered))
    return RunCompile(
        topology, devices[0].device_kind, len(devices), len({d.process_index for d in devices}), dict(mesh.shape),
        usable_hbm_bytes(devices[0]),
        [CompiledStep(name, shape, step_cost(c) if c is not None else None)
         for (name, shape, _), c in zip(lowered, compiled)], time.monotonic() - start)


def _shapes(shapes, seconds: Sequence[float]) -> list[tuple[int, int, int]]:
    """The loader's (B, S, L) shapes by bucket, or with `seconds` one per padded length (shortest first) at
    the largest batch, its labels as long per second as the data's densest bucket."""
    shapes = [tuple(map(int, s)) for s in shapes]
    if not seconds:
        return shapes
    batch, per_sample = max(b for b, _, _ in shapes), max(length / s for _, s, length in shapes)
    return [(batch, round(t * SAMPLING_RATE), math.ceil(per_sample * t * SAMPLING_RATE)) for t in sorted(seconds)]


def format_run_compile(result: RunCompile) -> str:
    """What `xlsr-jax plan --topology T --as-configured` prints: each compiled step's HBM per chip, and whether
    it fits."""
    chip = CHIPS.get(result.chip_kind)
    name = f"TPU {chip.name}" if chip else result.chip_kind
    lines = [f"{result.topology}: {result.devices} {name} chips on {result.hosts} host(s), mesh {result.mesh}; the "
             f"run's steps compiled for it as `train` compiles them (libtpu, no TPU needed) in {result.seconds:.0f} s",
             f"{'step':>5}  {'batch':>5}  {'padded s':>8}  {'HBM GiB':>7}  {'state+in':>8}  {'temp':>6}  fits "
             f"{result.budget_bytes / GIB:g} GiB"]
    for s in result.steps:
        head = f"{s.name:>5}  {s.shape[0]:>5}  {s.shape[1] / SAMPLING_RATE:>8.2f}"
        if s.cost is None:
            lines.append(f"{head}  NO: the compiler ran out of HBM for it")
            continue
        fits = "yes" if s.cost.bytes <= result.budget_bytes else "NO"
        lines.append(f"{head}  {s.cost.bytes / GIB:>7.2f}  {s.cost.argument_bytes / GIB:>8.2f}  "
                     f"{s.cost.temp_bytes / GIB:>6.2f}  {fits}")
    lines.append("batch: the step's global batch (all chips); HBM: XLA's memory analysis of the compiled step, per chip")
    if not result.fits:
        lines.append("a step does not fit: lower train.per_device_batch_size (plan without --as-configured finds the "
                     "largest that fits), recompute activations (model.remat_policy) or shard over more chips (mesh.fsdp)")
    return "\n".join(lines)
