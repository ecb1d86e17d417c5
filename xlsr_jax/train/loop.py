"""`train(config)`: the whole run, cut into phases (output / mesh / data / model+state / steps /
checkpoint / loop). Stops cleanly on SIGINT/SIGTERM (TPU preemption) with a checkpoint; an error leaves
the last good checkpoint as it was."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import signal
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from xlsr_jax import parallel
from xlsr_jax.checkpoint import Checkpointer, abstract_with_shardings
from xlsr_jax.config import Config, save_config
from xlsr_jax.evaluate import evaluate
from xlsr_jax.export import export_hf
from xlsr_jax.train.metrics import MetricsWriter
from xlsr_jax.train.setup import SAMPLING_RATE, Data, build_data, build_model, build_state
from xlsr_jax.train.step import MODEL_INPUTS, eval_step, train_step

logger = logging.getLogger(__name__)


class _StopFlag:
    """SIGINT/SIGTERM set a flag the loop checks between steps; a second SIGINT interrupts at once."""

    def __init__(self):
        self.requested = False

    @contextlib.contextmanager
    def installed(self):
        def handler(signum, _frame):
            if self.requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.requested = True
            logger.warning("signal %d: saving a checkpoint and stopping after this step", signum)
        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def total_steps(config: Config, batches_per_epoch: int) -> int:
    if config.train.max_steps > 0:
        return config.train.max_steps
    return max(1, math.ceil(config.train.num_train_epochs * batches_per_epoch))


class _TrainMetrics:
    """Accumulates device metrics between log lines without forcing a device sync every step."""

    def __init__(self):
        self.pending, self.audio_seconds, self.start = [], 0.0, time.perf_counter()

    def add(self, metrics, local_batch) -> None:
        self.pending.append(metrics)
        self.audio_seconds += float(local_batch["attention_mask"].sum()) * jax.process_count() / SAMPLING_RATE

    def flush(self, padding: float) -> dict[str, float]:
        fetched = jax.device_get(self.pending)
        elapsed = time.perf_counter() - self.start
        out = {
            "train/loss": float(np.mean([m["loss"] for m in fetched])),
            "train/grad_norm": float(np.mean([m["grad_norm"] for m in fetched])),
            "train/learning_rate": float(fetched[-1]["learning_rate"]),
            "train/infeasible": float(sum(m["infeasible"] for m in fetched)),
            "train/skipped_steps": float(sum(m["skipped"] for m in fetched)),
            "train/audio_seconds_per_second": self.audio_seconds / max(elapsed, 1e-9),
            "train/padding_fraction": padding,
        }
        self.pending, self.audio_seconds, self.start = [], 0.0, time.perf_counter()
        return out


def train(config: Config) -> dict[str, float]:
    """Run training as configured; returns the last eval metrics (or the last train metrics)."""
    # --- output directory and mesh
    if config.train.compilation_cache:  # a rerun or resume skips XLA compilation
        jax.config.update("jax_compilation_cache_dir", str(Path(config.train.compilation_cache).expanduser()))
    parallel.initialize(config.mesh)
    output_dir = Path(config.train.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    mesh = parallel.make_mesh(config.mesh)
    dp = parallel.data_parallel_size(mesh)
    accum = config.optim.gradient_accumulation_steps
    batch_size = config.train.per_device_batch_size * dp * accum
    eval_batch_size = (config.eval.per_device_batch_size or config.train.per_device_batch_size) * dp

    # --- data
    data = build_data(config, output_dir, batch_size, eval_batch_size)
    steps = total_steps(config, data.train.batches_per_epoch)
    if is_main:
        save_config(config, output_dir / "config.yaml")
        data.vocab.save(output_dir / "vocab.json")
    logger.info("train: %d utterances, %d batches of %d per epoch, buckets %s, padding %.1f%%; %d steps",
                len(data.train.dataset), data.train.batches_per_epoch, batch_size, data.train.shapes,
                100 * data.train.padding_fraction, steps)

    # --- model, optimizer and state, built sharded
    model, host_params = build_model(config, data.vocab)
    state, shardings, tx, schedule = build_state(config, model, host_params, mesh, steps)
    del host_params
    checkpoints = Checkpointer(output_dir / "checkpoints", config.checkpoint.save_total_limit)
    if config.checkpoint.resume and checkpoints.latest_step() is not None:
        state = checkpoints.restore(abstract_with_shardings(state, shardings))
    start = int(jax.device_get(state.step))

    # --- compiled steps: one compilation per bucket shape
    blank, reduction = data.vocab.pad_id, config.model.ctc_loss_reduction
    batch_sharding, replicated = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    step_fn = jax.jit(
        functools.partial(train_step, model=model, tx=tx, schedule=schedule, blank_id=blank,
                          reduction=reduction, accum=accum),
        in_shardings=(shardings, batch_sharding), out_shardings=(shardings, replicated), donate_argnums=0)
    eval_fn = jax.jit(functools.partial(eval_step, model=model, blank_id=blank, reduction=reduction),
                      in_shardings=(shardings.params, batch_sharding))

    writer = MetricsWriter(output_dir, enabled=is_main)
    loop = _Loop(config, step_fn, eval_fn, data, mesh, checkpoints, writer)
    try:
        with _StopFlag().installed() as stop:
            state, last = loop.run(state, start, steps, stop)
        final_step = int(jax.device_get(state.step))
        if checkpoints.latest_step() != final_step:
            checkpoints.save(final_step, state)
        checkpoints.wait()
        if is_main and not stop.requested:
            export_hf(jax.device_get(state.params), model.config, data.vocab, output_dir / "hf_model")
    finally:
        checkpoints.close()
        writer.close()
    return last


@dataclasses.dataclass
class _Loop:
    """The steady state of a run: steps, periodic logs, evals and checkpoints."""

    config: Config
    step_fn: Callable
    eval_fn: Callable
    data: Data
    mesh: Mesh
    checkpoints: Checkpointer
    writer: MetricsWriter

    def run(self, state, start: int, steps: int, stop: _StopFlag):
        t = self.config.train
        tracker, last, shapes, previous = _TrainMetrics(), {}, set(), None
        batches = self.data.train.iter_from_step(start)
        bar = tqdm(total=steps, initial=start, disable=jax.process_index() != 0, dynamic_ncols=True, unit="step")
        step = start
        while step < steps and not stop.requested:
            step += 1
            local = next(batches)
            shapes.add(local["input_values"].shape)
            state, metrics = self.step_fn(state, parallel.global_batch({k: local[k] for k in MODEL_INPUTS}, self.mesh))
            tracker.add(metrics, local)
            if previous is not None:  # the bar follows finished steps while one step stays queued
                jax.block_until_ready(previous)
                bar.update(1)
            previous = metrics["loss"]
            if step % t.logging_steps == 0 or step == steps or stop.requested:
                last = tracker.flush(self.data.train.padding_fraction)
                self.writer.write(step, last)
                bar.set_postfix(loss=f"{last['train/loss']:.3f}", lr=f"{last['train/learning_rate']:.2e}",
                                audio_s_per_s=f"{last['train/audio_seconds_per_second']:.0f}")
            if self.data.eval is not None and (step % t.eval_steps == 0 or (step == steps and self.config.eval.at_end)):
                last = self.evaluate(state, step)
            if step % t.save_steps == 0 and step != steps:
                self.checkpoints.save(step, state)
        bar.update(step - bar.n)
        bar.close()
        last["train/compiled_shapes"] = self.step_fn._cache_size()  # noqa: SLF001 - jax has no public counter
        last["train/buckets_used"] = len(shapes)
        logger.info("stopped at step %d of %d; %d updates skipped for non-finite values; %d step shapes "
                    "compiled for %d bucket shapes", step, steps, int(jax.device_get(state.skipped)),
                    last["train/compiled_shapes"], len(shapes))
        return state, last

    def evaluate(self, state, step: int) -> dict[str, float]:
        scores, pairs = evaluate(state.params, self.data.eval, self.eval_fn, self.data.vocab, self.mesh)
        scores = {f"eval/{k}": v for k, v in scores.items()}
        self.writer.write(step, scores)
        shown = "\n".join(f"  ref: {r}\n  hyp: {h}" for r, h in pairs[: self.config.eval.num_examples_to_print])
        logger.info("step %d eval: loss %.3f  WER %.2f%%  CER %.2f%% (%d utterances)\n%s", step, scores["eval/loss"],
                    100 * scores["eval/wer"], 100 * scores["eval/cer"], scores["eval/examples"], shown)
        self.writer.text(step, "eval/examples", shown)
        return scores
