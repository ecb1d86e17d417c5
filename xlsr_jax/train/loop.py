"""`run_training(config, objective)`: the whole run, cut into phases (output / mesh / data / model+state /
steps / checkpoint / loop), for any `Objective` (train/objective.py): CTC fine-tuning (`train(config, tasks)`,
train/ctc.py) or pretraining (xlsr_jax/pretrain/). Stops cleanly on SIGINT/SIGTERM (TPU preemption) with a
checkpoint; an error leaves the last good checkpoint as it was.

Evaluation and export come in as `Tasks` (as big_vision's trainers take their evaluators): train/ never
imports infer/ or hub/. `xlsr_jax.recipe.train(config)` passes xlsr-jax's own."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm.auto import tqdm

from xlsr_jax import parallel
from xlsr_jax.aot import ShapeDispatch, batch_shape
from xlsr_jax.checkpoint import Checkpointer, abstract_with_shardings
from xlsr_jax.config import Config, save_config, to_dict
from xlsr_jax.data.audio import SAMPLING_RATE
from xlsr_jax.data.batch import MODEL_INPUTS
from xlsr_jax.data.stream import load_stream_state, save_stream_state
from xlsr_jax.errors import UserError
from xlsr_jax.rundir import CONFIG_MARK, RunDir, write_atomically
from xlsr_jax.train.ctc import CTC, Tasks, ctc_summary
from xlsr_jax.train.metrics import MetricsWriter
from xlsr_jax.train.objective import Evaluator, Guard, Objective, compile_run_steps
from xlsr_jax.train.optim import check_consecutive_skips
from xlsr_jax.train.resume import (check_output_dir, check_start, clear_output_dir, plan_start, start_state,
                                   write_signature)
from xlsr_jax.train.setup import Data, build_state
from xlsr_jax.train.signature import loader_plan_sha256, run_signature
from xlsr_jax.train.stopping import EarlyStopping, EvalCallback
from xlsr_jax.train.summary import read_finished, write_finished

__all__ = ["Tasks", "run_training", "total_steps", "train"]

logger = logging.getLogger(__name__)


class _StopSignal:
    """SIGINT/SIGTERM (a TPU VM's preemption notice) stop the run after a step, every process at the same one.

    One process: a Python handler sets a flag. Several: JAX's preemption service (started with
    `jax.distributed.initialize`) catches a SIGTERM on any process and has all of them agree on the step at
    which to stop (`multihost_utils.reached_preemption_sync_point`, asked once per step); a SIGINT is handed
    to it as a SIGTERM. Processes that each stopped at the step they saw a signal would wait in different
    collectives (one in a checkpoint's barrier, another in a train step) and hang. A second SIGINT
    interrupts at once.
    """

    def __init__(self):
        self.received = False  # this process got a signal
        self.requested = False  # the run stops after the current step (the same step on every process)

    @contextlib.contextmanager
    def installed(self):
        shared = jax.process_count() > 1

        def handler(signum, _frame):
            if self.received and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.received = True
            logger.warning("signal %d: saving a checkpoint and stopping%s", signum,
                           " at a step all processes agree on" if shared else " after this step")
            if shared:
                os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption notifier, which tells every process
            else:
                self.requested = True

        # With several processes JAX's notifier owns SIGTERM (a C handler): a Python one would replace it.
        signals = (signal.SIGINT,) if shared else (signal.SIGINT, signal.SIGTERM)
        previous = {s: signal.signal(s, handler) for s in signals}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def check(self, step: int) -> bool:
        """Whether to stop after `step`; every process must call this at every step."""
        if not self.requested and jax.process_count() > 1:
            self.requested = multihost_utils.reached_preemption_sync_point(step)
        return self.requested


def total_steps(config: Config, batches_per_epoch: int) -> int:
    if config.train.max_steps > 0:
        return config.train.max_steps
    return max(1, math.ceil(config.train.num_train_epochs * batches_per_epoch))


class _TrainMetrics:
    """Accumulates device metrics between log lines without forcing a device sync every step.

    `summarize(fetched)` turns the steps' metrics (a list of dicts of numbers) into the logged ones; the
    throughput is added under `namespace`."""

    def __init__(self, summarize: Callable[[list[dict]], dict[str, float]], namespace: str = "train"):
        self.summarize, self.namespace = summarize, namespace
        self.pending, self.audio_seconds, self.start = [], 0.0, time.perf_counter()

    def add(self, metrics, local_batch) -> None:
        self.pending.append(metrics)
        self.audio_seconds += float(local_batch["attention_mask"].sum()) * jax.process_count() / SAMPLING_RATE

    def flush(self, padding: float) -> dict[str, float]:
        fetched = jax.device_get(self.pending)
        elapsed = time.perf_counter() - self.start
        out = {
            **self.summarize(fetched),
            f"{self.namespace}/audio_seconds_per_second": self.audio_seconds / max(elapsed, 1e-9),
            f"{self.namespace}/padding_fraction": padding,
        }
        self.pending, self.audio_seconds, self.start = [], 0.0, time.perf_counter()
        return out


class _Progress:
    """The progress bar, and the bound on how far dispatch runs ahead of the device.

    Steps are dispatched asynchronously; the bar counts a step when its loss is ready, which it learns
    without waiting (`is_ready`) or from the metrics read at logging steps. At most `in_flight` steps
    wait on the device: then the host waits for the oldest, while the device still has the others
    queued, so it never idles for the host. Unbounded, every queued step holds its batch in device
    memory, and XLA:CPU's collectives across (fake) devices deadlock past a few dozen queued steps.
    """

    def __init__(self, bar: tqdm, in_flight: int = 2):
        self.bar, self.in_flight, self.pending = bar, in_flight, collections.deque()

    def dispatched(self, done: jax.Array) -> None:
        """`done`: an output of the step just dispatched (ready when the step has run)."""
        self.pending.append(done)
        while self.pending and (len(self.pending) > self.in_flight or self.pending[0].is_ready()):
            self.pending.popleft().block_until_ready()
            self.bar.update(1)

    def finished(self, step: int, **postfix) -> None:
        """Every step up to `step` has run (its metrics were just read)."""
        self.pending.clear()
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(**postfix)

    def close(self, step: int) -> None:
        self.bar.update(step - self.bar.n)
        self.bar.close()


def train(config: Config, tasks: Tasks, *, on_eval: EvalCallback | None = None) -> dict[str, float]:
    """Fine-tune with CTC as configured, evaluating and exporting with `tasks`: `run_training` of the CTC
    objective (train/ctc.py)."""
    return run_training(config, CTC(tasks), on_eval=on_eval)


def run_training(config: Config, objective: Objective, *, on_eval: EvalCallback | None = None) -> dict[str, float]:
    """Run training of `objective` as configured; returns the last eval metrics (or the last train metrics).

    A run that already finished (same step budget) returns its stored summary with
    "run/already_finished" set instead of training again. `on_eval(step, eval metrics)` returning True
    ends the run after that evaluation, as `train.early_stopping_patience` does ("run/stopped_early").
    The objective's guard stopping the run saves a checkpoint, then raises its UserError.
    """
    objective.check(config)
    check_output_dir(config.train.output_dir)
    run = RunDir(config.train.output_dir)
    finished = None if config.train.overwrite_output_dir else read_finished(run, config)
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

    # --- output directory: resume its checkpoints, start over, or start from another run (train/resume.py)
    begin = plan_start(config)
    if begin.clear:
        clear_output_dir(run, is_main)

    # --- data (before the run's files are written: a bad source leaves only data_report.tsv behind)
    data = objective.build_data(config, run.path, batch_size, eval_batch_size, data_parallel=dp)
    data.report_bad_clips(run.data_report, config.data.max_skip_fraction, write=is_main)  # may stop the run
    # Each host built its data alone: one host's transient decode failure would give it another plan (a
    # hang, or other batches). Compared before the first collective that depends on it.
    parallel.assert_hosts_agree(_host_fields(config, data))
    streaming = getattr(data.train, "streaming", False)
    steps = total_steps(config, data.train.batches_per_epoch)
    _log_data(data, steps)

    # --- model, optimizer and state, built sharded
    model, host_params = objective.build_model(config, data, begin)
    state, shardings, tx, schedule = build_state(config, model, host_params, mesh, steps)
    del host_params
    signature = run_signature(config, data, model.config, objective=objective.name)
    check_start(begin, run, signature)  # before any file of the run is rewritten
    run.path.mkdir(parents=True, exist_ok=True)
    if is_main:  # each written whole or not at all: a kill here must not spoil the next resume
        write_atomically(run.config, lambda tmp: save_config(config, tmp, header=CONFIG_MARK))
        for path, save in objective.run_files(run, data):
            write_atomically(path, save)
        write_atomically(run.model_config, model.config.to_json_file)
        write_signature(run, signature)
    c = config.checkpoint
    checkpoints = Checkpointer(run.checkpoints, c.save_total_limit, best_metric=c.best_metric, best_mode=c.best_mode)
    state = start_state(begin, run, checkpoints, state, shardings, is_main)
    start = int(jax.device_get(state.step))
    # A checkpoint that one host cannot read (and skips as damaged) would start the hosts at different steps.
    parallel.assert_hosts_agree({"start step": start})
    if streaming and start > 0:  # the stream goes on after the batch of the restored step, not from its start
        data.train.restore(load_stream_state(run.stream_state, start))

    # --- compiled steps: every train and eval bucket shape, ahead of time (nothing compiles mid-run)
    step_fn, eval_fn = compile_run_steps(*objective.jit_steps(config, data, model, tx, schedule, shardings, mesh),
                                         data, state, shardings, mesh)

    writer = MetricsWriter(run.path, enabled=is_main)
    stopping = None
    if config.train.early_stopping_patience:
        stopping = EarlyStopping.resumed(c.best_metric, c.best_mode, config.train.early_stopping_patience,
                                         checkpoints, start)
    evaluator = objective.evaluator(config, data, eval_fn, mesh) if eval_fn is not None else None
    loop = _Loop(config, step_fn, eval_fn, data, mesh, checkpoints, writer, stopping, on_eval, run_dir=run,
                 evaluator=evaluator, summarize=objective.summarize, namespace=objective.namespace,
                 guard=objective.guard(config, model.config), advise=functools.partial(objective.advise, config))
    try:
        with _StopSignal().installed() as stop:
            state, last = loop.run(state, start, steps, stop)
        final_step = int(jax.device_get(state.step))
        if checkpoints.latest_step() != final_step:
            loop.save(final_step, state, loop.eval_metrics_at(final_step))
        checkpoints.wait()
        if loop.stopped_by_guard:  # checkpoint kept, nothing exported: the run did not finish
            raise UserError(loop.stopped_by_guard)
        if not stop.requested:
            params, step, selected = state.params, final_step, "final"
            best = checkpoints.best_step()
            if "run/stopped_early" in last and best is not None and best != final_step:
                # Stopped for lack of progress: the last state is `patience` evaluations past the best one.
                # A read-only manager: the writing one has no handler for a partial (params only) restore.
                kept = Checkpointer(run.checkpoints, read_only=True)
                params = kept.restore_params(abstract_with_shardings(state.params, shardings.params), best)
                kept.close()
                step, selected = best, "best"
                logger.info("hf_model: the best checkpoint (step %d by %s) is exported", best, c.best_metric)
            objective.export(run, config, model, params, data, step, is_main=is_main, selected=selected)
            if is_main:
                write_finished(run, config, final_step, steps, last, best_step=checkpoints.best_step())
    finally:
        checkpoints.close()
        writer.close()
        if is_main:
            objective.plot(run.metrics, run.curves)
    return last


def _log_data(data: Data, steps: int) -> None:
    streaming = getattr(data.train, "streaming", False)
    sizes = data.train.batch_sizes  # one per bucket: differ under train.per_device_audio_seconds
    clips = data.clips or data.train.dataset  # speed perturbation makes several rows of one clip
    rows = "" if clips is data.train.dataset else f" ({len(data.train.dataset)} rows, one per speed)"
    logger.info("train: %d utterances%s, %s batches of %s per epoch, buckets %s, padding %.1f%%; %d steps",
                len(clips), " in the stream's probe" if streaming else rows,
                "(streaming: unknown)" if streaming else data.train.batches_per_epoch,
                sizes[0] if len(set(sizes)) == 1 else f"{list(sizes)} (by bucket)", data.train.shapes,
                100 * data.train.padding_fraction, steps)


def _host_fields(config: Config, data: Data) -> dict[str, Any]:
    """What every process of a run must hold identically: config, vocabulary, text normalisation and the
    data plans (examples, lengths, labels and the first epoch's batches)."""
    tree = to_dict(config)
    tree["mesh"].pop("process_id")  # the one key that differs by design
    fields = {"config": tree, "vocab": list(data.vocab.tokens) if data.vocab is not None else None,
              "normalization": dataclasses.asdict(data.normalization) if data.normalization is not None else None}
    for name, loader in (("train", data.train), ("eval", data.eval)):
        if loader is None:
            continue
        d = loader.dataset
        fields[f"{name}.examples"] = [e.path for e in d.examples]
        fields[f"{name}.labels"] = np.concatenate([np.asarray([len(x) for x in d.labels]), *d.labels])
        fields[f"{name}.plan"] = loader_plan_sha256(loader)
    return fields


@dataclasses.dataclass
class _Loop:
    """The steady state of a run: steps, periodic logs, evals and checkpoints."""

    config: Config
    step_fn: ShapeDispatch
    eval_fn: ShapeDispatch | None
    data: Data
    mesh: Mesh
    checkpoints: Checkpointer
    writer: MetricsWriter
    early_stopping: EarlyStopping | None = None
    on_eval: EvalCallback | None = None
    run_dir: RunDir | None = None  # where a streaming loader's state is saved with each checkpoint
    evaluator: Evaluator | None = None  # needed when there is eval data
    summarize: Callable[[list[dict]], dict[str, float]] = ctc_summary  # the step metrics -> logged ones
    namespace: str = "train"  # of the logged training metrics
    guard: Guard | None = None  # (step, logged metrics) -> a reason to stop the run, or None
    advise: Callable[[int, dict[str, float]], str | None] | None = None  # (step, eval scores) -> a warning
    stopped_by_guard: str | None = None  # the guard's reason, once it stopped the run
    _evaluated: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)

    def run(self, state, start: int, steps: int, stop: _StopSignal):
        t, ns = self.config.train, self.namespace
        tracker, last, shapes = _TrainMetrics(self.summarize, ns), {}, set()
        # The next batch's host-to-device copy overlaps this step; resuming starts at batch `start`.
        batches = parallel.device_batches(self.data.train.iter_from_step(start), self.mesh, MODEL_INPUTS)
        progress = _Progress(tqdm(total=steps, initial=start, disable=jax.process_index() != 0, dynamic_ncols=True,
                                  unit="step"))
        step = start
        while step < steps:
            step += 1
            local, batch = next(batches)
            shapes.add(batch_shape(batch))
            state, metrics = self.step_fn(state, batch)
            tracker.add(metrics, local)
            progress.dispatched(metrics["loss"])
            stopping = stop.check(step)
            if step % t.logging_steps == 0 or step == steps or stopping:
                last = tracker.flush(self.data.train.padding_fraction)  # the only read of train metrics
                if getattr(self.data.train, "streaming", False):  # epoch and clips dropped so far
                    last.update(self.data.train.metrics_at(step))
                self.writer.write(step, last)
                # Read with the metrics: no extra wait. Every process holds the same count, so all stop.
                check_consecutive_skips(state.opt_state, self.config.optim.max_consecutive_skips, step)
                progress.finished(step, loss=f"{last[f'{ns}/loss']:.3f}", lr=f"{last[f'{ns}/learning_rate']:.2e}",
                                  audio_s_per_s=f"{last[f'{ns}/audio_seconds_per_second']:.0f}")
                # The logged metrics are the same on every process: all stop at the same step.
                self.stopped_by_guard = self.guard(step, last) if self.guard is not None else None
            # No evaluation: a preempted machine's grace period is for the checkpoint.
            if stopping or self.stopped_by_guard:
                break
            ending = False
            if self.data.eval is not None and (step % t.eval_steps == 0 or (step == steps and self.config.eval.at_end)):
                last = self.evaluate(state, step)
                ending = self._ends_after(step, last)
            # With keep-best, every evaluated state is a candidate: it is saved with its metrics.
            evaluated = self.eval_metrics_at(step) if self.checkpoints.best_metric else None
            if (step % t.save_steps == 0 or evaluated) and step != steps and not ending:
                self.save(step, state, evaluated)
            if ending:  # saved by the caller, as the last step of a finished run
                last = {**last, "run/stopped_early": float(step)}
                break
        progress.close(step)
        last[f"{ns}/compiled_shapes"] = len(self.step_fn)
        last[f"{ns}/buckets_used"] = len(shapes)
        logger.info("stopped at step %d of %d; %d updates skipped for non-finite values; %d step shapes "
                    "compiled ahead of time, %d used", step, steps, int(jax.device_get(state.skipped)),
                    last[f"{ns}/compiled_shapes"], len(shapes))
        return state, last

    def _ends_after(self, step: int, scores: dict[str, float]) -> bool:
        """Whether early stopping or the caller's `on_eval` ends the run after this evaluation. Both see
        every evaluation (the patience count must not skip one because the callback already said stop)."""
        patience_out = self.early_stopping is not None and self.early_stopping.update(scores)
        if self.early_stopping is not None:  # saved with this step's checkpoint, for a resume
            self._evaluated[step] = {**scores, **self.early_stopping.state()}
        if patience_out:
            logger.info("step %d: no better %s in %d evaluations (best %.4f); stopping early", step,
                        self.early_stopping.metric, self.early_stopping.patience, self.early_stopping.best)
        asked = self.on_eval is not None and bool(self.on_eval(step, scores))
        if asked:
            logger.info("step %d: stopping as the caller asked after this evaluation", step)
        return patience_out or asked

    def save(self, step: int, state, metrics: dict[str, float] | None = None) -> None:
        """Checkpoint `step`; under data.streaming first the loader's state after that step's batch (process 0
        writes it: every host holds the same), which a resume continues from."""
        if getattr(self.data.train, "streaming", False) and jax.process_index() == 0:
            save_stream_state(self.run_dir.stream_state, step, self.data.train.state_at(step),
                              keep=self.checkpoints.all_steps())
        self.checkpoints.save(step, state, metrics)

    def eval_metrics_at(self, step: int) -> dict[str, float] | None:
        """The eval metrics of `step` if it was evaluated (what keep-best ranks a checkpoint by)."""
        return self._evaluated.get(step)

    def evaluate(self, state, step: int) -> dict[str, float]:
        scores, summary, examples = self.evaluator(state.params)
        self._evaluated = {step: scores}
        self.writer.write(step, scores)
        logger.info("step %d eval: %s%s", step, summary, f"\n{examples}" if examples else "")
        advice = self.advise(step, scores) if self.advise is not None else None
        if advice:
            logger.warning(advice)
        if examples:
            self.writer.text(step, "eval/examples", examples)
        return scores
