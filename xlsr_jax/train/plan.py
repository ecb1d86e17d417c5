"""`xlsr-jax plan`: how many clips of each training bucket fit one device, before renting it.

For each bucket the train step is compiled for ONE device with abstract inputs (nothing is allocated)
and XLA's memory estimate of the compiled step is read; a doubling-then-bisection search finds the
largest per-device micro-batch whose step fits the budget. The figures are for the backend the plan
runs on: a plan made on a CPU approximates a GPU's (other fusions, other temporaries).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Callable

import jax

from xlsr_jax import parallel
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
class BucketPlan:
    bucket: int
    samples: int  # padded samples S of the bucket's batches
    label_length: int  # padded label length L
    batch: int  # largest per-device micro-batch that fits; 0: not even one clip
    bytes: int | None  # XLA's estimate for `batch` (None when nothing fits)

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


def step_memory(config: Config, model, steps: int, blank_id: int) -> Callable[[int, int, int], int]:
    """`memory(batch, samples, label_length)`: bytes of the train step compiled for one device with a
    per-device micro-batch of `batch` clips (x gradient accumulation rows), as `train` would step it."""
    mesh = parallel.make_mesh(MeshConfig(), devices=jax.local_devices()[:1])
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
        shape = (batch * accum, samples, label_length)
        return compiled_bytes(jitted.lower(first, abstract_batch(shape, batch_sharding)).compile())
    return memory


def device_memory_bytes() -> int | None:
    """The first local device's memory limit, where its backend reports one (GPUs, TPUs; not CPUs)."""
    stats = jax.local_devices()[0].memory_stats()
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def plan(config: Config, memory_gib: float | None = None, max_batch: int = 1024) -> Plan:
    """The largest per-device micro-batch of every training bucket whose train step fits `memory_gib`
    GiB (default: this device's memory), searched in parallel threads (one per bucket)."""
    budget = int(memory_gib * GIB) if memory_gib is not None else device_memory_bytes()
    if budget is None:
        raise UserError(f"plan: this {jax.default_backend()} device reports no memory size; give --memory-gib "
                        "(e.g. 80 for an 80 GB GPU)")
    # The training data as `train` builds it (its buckets are the step shapes); evaluation is not planned.
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, eval=()))
    per_device = config.train.per_device_batch_size * config.optim.gradient_accumulation_steps
    data = build_data(config, Path(config.train.output_dir), per_device, per_device, data_parallel=1)
    model, host_params = build_model(config, data.vocab)
    del host_params  # only the shapes matter
    from xlsr_jax.train.loop import total_steps  # the learning-rate schedule's length, as in training

    memory = step_memory(config, model, total_steps(config, data.train.batches_per_epoch), data.vocab.pad_id)

    def one(bucket: int, samples: int, label_length: int) -> BucketPlan:
        batch, used = largest_batch(lambda b: memory(b, samples, label_length), budget, max_batch)
        return BucketPlan(bucket, samples, label_length, batch, used)

    shapes = {b: (s, length) for b, (_, s, length) in data.train.batch_shapes.items()}
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(shapes), os.cpu_count() or 1)) as pool:
        futures = [pool.submit(one, b, s, length) for b, (s, length) in sorted(shapes.items())]
        buckets = [f.result() for f in futures]
    return Plan(buckets, budget, jax.default_backend(), config.optim.gradient_accumulation_steps)


def format_plan(result: Plan) -> str:
    """The table `xlsr-jax plan` prints, and the per-device audio-seconds budget it suggests."""
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
