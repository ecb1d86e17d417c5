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
from xlsr_jax.data.loader import MODEL_INPUTS
from xlsr_jax.hub.export import export_params, host_params
from xlsr_jax.infer.data import SAMPLING_RATE
from xlsr_jax.infer.predict import predict
from xlsr_jax.infer.step import eval_step
from xlsr_jax.plots import plot_training_curves
from xlsr_jax.rundir import RunDir
from xlsr_jax.train.metrics import MetricsWriter
from xlsr_jax.train.setup import Data, build_data, build_model, build_state
from xlsr_jax.train.step import train_step
from xlsr_jax.train.summary import read_finished, write_finished

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
    """Run training as configured; returns the last eval metrics (or the last train metrics).

    A run that already finished (same step budget) returns its stored summary with
    "run/already_finished" set instead of training again.
    """
    run = RunDir(config.train.output_dir)
    finished = read_finished(run, config)
    if finished is not None:
        return {**finished["metrics"], "run/already_finished": 1.0}
    # --- mesh
    if config.train.compilation_cache:  # a rerun or resume skips XLA compilation
        jax.config.update("jax_compilation_cache_dir", str(Path(config.train.compilation_cache).expanduser()))
    parallel.initialize(config.mesh)
    is_main = jax.process_index() == 0
    mesh = parallel.make_mesh(config.mesh)
    dp = parallel.data_parallel_size(mesh)
    accum = config.optim.gradient_accumulation_steps
    batch_size = config.train.per_device_batch_size * dp * accum
    eval_batch_size = (config.eval.per_device_batch_size or config.train.per_device_batch_size) * dp

    # --- data (before the output directory exists: a bad source leaves no empty run folder behind)
    data = build_data(config, run.path, batch_size, eval_batch_size)
    steps = total_steps(config, data.train.batches_per_epoch)
    logger.info("train: %d utterances, %d batches of %d per epoch, buckets %s, padding %.1f%%; %d steps",
                len(data.train.dataset), data.train.batches_per_epoch, batch_size, data.train.shapes,
                100 * data.train.padding_fraction, steps)

    # --- model, optimizer and state, built sharded
    model, host_params = build_model(config, data.vocab)
    state, shardings, tx, schedule = build_state(config, model, host_params, mesh, steps)
    del host_params
    run.path.mkdir(parents=True, exist_ok=True)
    if is_main:
        save_config(config, run.config)
        data.vocab.save(run.vocab)
        data.normalization.save(run.normalization)
        model.config.to_json_file(str(run.model_config))
    c = config.checkpoint
    checkpoints = Checkpointer(run.checkpoints, c.save_total_limit, best_metric=c.best_metric, best_mode=c.best_mode)
    if c.resume and checkpoints.latest_step() is not None:
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

    writer = MetricsWriter(run.path, enabled=is_main)
    loop = _Loop(config, step_fn, eval_fn, data, mesh, checkpoints, writer)
    try:
        with _StopFlag().installed() as stop:
            state, last = loop.run(state, start, steps, stop)
        final_step = int(jax.device_get(state.step))
        if checkpoints.latest_step() != final_step:
            checkpoints.save(final_step, state, loop.eval_metrics_at(final_step))
        checkpoints.wait()
        if not stop.requested:
            _export(run, config, model, state.params, data, final_step, is_main)
            if is_main:
                write_finished(run, config, final_step, steps, last, best_step=checkpoints.best_step())
    finally:
        checkpoints.close()
        writer.close()
        if is_main:
            plot_training_curves(run.metrics, run.curves)
    return last


def _export(run: RunDir, config: Config, model, params, data: Data, step: int, is_main: bool) -> None:
    """hf_model/: the same converter, card and (with torch) check as `xlsr-jax export`."""
    params = host_params(params)  # a collective when parameters are sharded across processes
    if not is_main:
        return
    dataset = (data.eval or data.train).dataset
    clips = [np.asarray(dataset.audio[i]) for i in range(min(3, len(dataset)))]
    out = export_params(params, model.config, data.vocab, run.hf_model, normalization=data.normalization, run=run,
                        run_config=config, step=step, clips=clips, info={"run": str(run.path.absolute()),
                                                                          "selected": "final"})
    if out["check"] is None:
        logger.info("hf_model: torch is not installed, so the PyTorch self-check was skipped "
                    "(pip install 'xlsr-jax[torch]' to have it)")
    else:
        logger.info("hf_model: PyTorch self-check on %d clips: max |dlogits| %.2e, greedy transcripts identical: %s",
                    out["check"]["clips"], out["check"]["max_abs_diff"], out["check"]["transcripts_identical"])


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
    _evaluated: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)

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
            # With keep-best, every evaluated state is a candidate: it is saved with its metrics.
            evaluated = self.eval_metrics_at(step) if self.checkpoints.best_metric else None
            if (step % t.save_steps == 0 or evaluated) and step != steps:
                self.checkpoints.save(step, state, evaluated)
        bar.update(step - bar.n)
        bar.close()
        last["train/compiled_shapes"] = self.step_fn._cache_size()  # noqa: SLF001 - jax has no public counter
        last["train/buckets_used"] = len(shapes)
        logger.info("stopped at step %d of %d; %d updates skipped for non-finite values; %d step shapes "
                    "compiled for %d bucket shapes", step, steps, int(jax.device_get(state.skipped)),
                    last["train/compiled_shapes"], len(shapes))
        return state, last

    def eval_metrics_at(self, step: int) -> dict[str, float] | None:
        """The eval metrics of `step` if it was evaluated (what keep-best ranks a checkpoint by)."""
        return self._evaluated.get(step)

    def evaluate(self, state, step: int) -> dict[str, float]:
        scores, predictions = predict(state.params, self.data.eval, self.eval_fn, self.data.vocab, self.mesh)
        scores = {f"eval/{k}": v for k, v in scores.items()}
        self._evaluated = {step: scores}
        self.writer.write(step, scores)
        shown = "\n".join(f"  ref: {p.reference}\n  hyp: {p.hypothesis}"
                          for p in predictions[: self.config.eval.num_examples_to_print])
        logger.info("step %d eval: loss %.3f  WER %.2f%%  CER %.2f%% (%d utterances)\n%s", step, scores["eval/loss"],
                    100 * scores["eval/wer"], 100 * scores["eval/cer"], scores["eval/examples"], shown)
        self.writer.text(step, "eval/examples", shown)
        return scores
