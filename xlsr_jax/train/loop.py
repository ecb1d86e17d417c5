"""`train(config, tasks)`: the whole run, cut into phases (output / mesh / data / model+state / steps /
checkpoint / loop). Stops cleanly on SIGINT/SIGTERM (TPU preemption) with a checkpoint; an error leaves
the last good checkpoint as it was.

Evaluation and export come in as `Tasks` (as big_vision's trainers take their evaluators): train/ never
imports infer/ or hub/. `xlsr_jax.recipe.train(config)` passes xlsr-jax's own."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
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
from xlsr_jax.checkpoint import Checkpointer, abstract_with_shardings
from xlsr_jax.config import Config, save_config, to_dict
from xlsr_jax.aot import ShapeDispatch, StepToCompile, batch_shape, compile_steps
from xlsr_jax.data.audio import SAMPLING_RATE
from xlsr_jax.data.batch import MODEL_INPUTS
from xlsr_jax.data.stream import load_stream_state, save_stream_state
from xlsr_jax.plots import plot_training_curves
from xlsr_jax.rundir import CONFIG_MARK, RunDir, write_atomically
from xlsr_jax.train.metrics import MetricsWriter
from xlsr_jax.train.optim import check_consecutive_skips
from xlsr_jax.train.resume import (check_output_dir, check_start, clear_output_dir, init_model, plan_start,
                                   start_state, write_signature)
from xlsr_jax.train.setup import Data, build_data, build_model, build_state
from xlsr_jax.train.signature import loader_plan_sha256, run_signature
from xlsr_jax.train.step import jit_train_step
from xlsr_jax.train.stopping import EarlyStopping, EvalCallback
from xlsr_jax.train.summary import read_finished, write_finished

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Tasks:
    """What a run does besides training steps; `xlsr_jax.recipe.tasks()` gives xlsr-jax's own.

    eval_step(model, *, blank_id, reduction, params_shardings, mesh) -> a jitted step that `aot` compiles
        for every eval bucket: (params, batch) -> per-utterance loss and greedy ids (infer/step.py).
    predict(params, loader, eval_step, vocab, mesh) -> ({"loss", "wer", "cer", "examples", ...},
        predictions with .reference and .hypothesis): one pass over the eval loader (infer/predict.py).
    export(params, model_config, vocab, folder, *, normalization, run, run_config, step, clips, info)
        -> {"check": None or the PyTorch self-check's report}: the hf_model/ folder (hub/export.py).
    """

    eval_step: Callable[..., Any]
    predict: Callable[..., tuple[dict[str, float], list]]
    export: Callable[..., dict[str, Any]]


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
    """Run training as configured, evaluating and exporting with `tasks`; returns the last eval metrics
    (or the last train metrics).

    A run that already finished (same step budget) returns its stored summary with
    "run/already_finished" set instead of training again. `on_eval(step, eval metrics)` returning True
    ends the run after that evaluation, as `train.early_stopping_patience` does ("run/stopped_early").
    """
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
    data = build_data(config, run.path, batch_size, eval_batch_size, data_parallel=dp)
    data.report_bad_clips(run.data_report, config.data.max_skip_fraction, write=is_main)  # may stop the run
    # Each host built its data alone: one host's transient decode failure would give it another plan (a
    # hang, or other batches). Compared before the first collective that depends on it.
    parallel.assert_hosts_agree(_host_fields(config, data))
    streaming = getattr(data.train, "streaming", False)
    steps = total_steps(config, data.train.batches_per_epoch)
    sizes = data.train.batch_sizes  # one per bucket: differ under train.per_device_audio_seconds
    clips = data.clips or data.train.dataset  # speed perturbation makes several rows of one clip
    rows = "" if clips is data.train.dataset else f" ({len(data.train.dataset)} rows, one per speed)"
    logger.info("train: %d utterances%s, %s batches of %s per epoch, buckets %s, padding %.1f%%; %d steps",
                len(clips), " in the stream's probe" if streaming else rows,
                "(streaming: unknown)" if streaming else data.train.batches_per_epoch,
                sizes[0] if len(set(sizes)) == 1 else f"{list(sizes)} (by bucket)", data.train.shapes,
                100 * data.train.padding_fraction, steps)

    # --- model, optimizer and state, built sharded
    if begin.kind == "init":
        model, host_params = init_model(begin.source, config, data.vocab)
    else:
        model, host_params = build_model(config, data.vocab)
    state, shardings, tx, schedule = build_state(config, model, host_params, mesh, steps)
    del host_params
    signature = run_signature(config, data, model.config)
    check_start(begin, run, signature)  # before any file of the run is rewritten
    run.path.mkdir(parents=True, exist_ok=True)
    if is_main:  # each written whole or not at all: a kill here must not spoil the next resume
        write_atomically(run.config, lambda tmp: save_config(config, tmp, header=CONFIG_MARK))
        write_atomically(run.vocab, data.vocab.save)
        write_atomically(run.normalization, data.normalization.save)
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
    step_fn, eval_fn = _compile(config, data, model, tx, schedule, state, shardings, mesh, tasks.eval_step)

    writer = MetricsWriter(run.path, enabled=is_main)
    stopping = None
    if config.train.early_stopping_patience:
        stopping = EarlyStopping.resumed(c.best_metric, c.best_mode, config.train.early_stopping_patience,
                                         checkpoints, start)
    loop = _Loop(config, step_fn, eval_fn, data, mesh, checkpoints, writer, stopping, on_eval, run_dir=run,
                 predict=tasks.predict)
    try:
        with _StopSignal().installed() as stop:
            state, last = loop.run(state, start, steps, stop)
        final_step = int(jax.device_get(state.step))
        if checkpoints.latest_step() != final_step:
            loop.save(final_step, state, loop.eval_metrics_at(final_step))
        checkpoints.wait()
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
            _export(tasks.export, run, config, model, params, data, step, is_main, selected)
            if is_main:
                write_finished(run, config, final_step, steps, last, best_step=checkpoints.best_step())
    finally:
        checkpoints.close()
        writer.close()
        if is_main:
            plot_training_curves(run.metrics, run.curves)
    return last


def _host_fields(config: Config, data: Data) -> dict[str, Any]:
    """What every process of a run must hold identically: config, vocabulary, text normalisation and the
    data plans (examples, lengths, labels and the first epoch's batches)."""
    tree = to_dict(config)
    tree["mesh"].pop("process_id")  # the one key that differs by design
    fields = {"config": tree, "vocab": list(data.vocab.tokens), "normalization": dataclasses.asdict(data.normalization)}
    for name, loader in (("train", data.train), ("eval", data.eval)):
        if loader is None:
            continue
        d = loader.dataset
        fields[f"{name}.examples"] = [e.path for e in d.examples]
        fields[f"{name}.labels"] = np.concatenate([np.asarray([len(x) for x in d.labels]), *d.labels])
        fields[f"{name}.plan"] = loader_plan_sha256(loader)
    return fields


def _compile(config: Config, data: Data, model, tx, schedule, state, shardings, mesh: Mesh,
             jit_eval_step: Callable) -> tuple[ShapeDispatch, ShapeDispatch | None]:
    """(train step, eval step or None without eval data), each compiled for every batch shape its
    loader announces (`batch_shapes`), with the shardings they run with: the state and its
    parameters as `shardings` says, batches split over the batch axes. Lands in (or comes from) the
    persistent compilation cache when `train.compilation_cache` is set."""
    blank, reduction = data.vocab.pad_id, config.model.ctc_loss_reduction
    train_jit = jit_train_step(model, tx, schedule, blank_id=blank, reduction=reduction,
                               accum=config.optim.gradient_accumulation_steps, state_shardings=shardings, mesh=mesh)
    steps = [StepToCompile("train", train_jit, abstract_with_shardings(state, shardings),
                           data.train.batch_shapes.values())]
    if data.eval is not None:
        eval_jit = jit_eval_step(model, blank_id=blank, reduction=reduction, params_shardings=shardings.params,
                                 mesh=mesh)
        steps.append(StepToCompile("eval", eval_jit, abstract_with_shardings(state.params, shardings.params),
                                   data.eval.batch_shapes.values()))
    compiled = compile_steps(steps, parallel.batch_sharding(mesh))
    return compiled["train"], compiled.get("eval")


def _export(export_params: Callable, run: RunDir, config: Config, model, params, data: Data, step: int,
            is_main: bool, selected: str = "final") -> None:
    """hf_model/: the same converter, card and (with torch) check as `xlsr-jax export`."""
    params = parallel.host_params(params)  # a collective when parameters are sharded across processes
    if not is_main:
        return
    dataset = (data.eval or data.train).dataset
    held = range(len(dataset)) if dataset.owners is None else np.flatnonzero(dataset.owners == jax.process_index())
    clips = [np.asarray(dataset.audio[int(i)]) for i in held[:3]]  # clips whose audio this host decoded
    out = export_params(params, model.config, data.vocab, run.hf_model, normalization=data.normalization, run=run,
                        run_config=config, step=step, clips=clips, info={"run": str(run.path if "://" in str(run.path) else run.path.absolute()),
                                                                          "selected": selected})
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
    step_fn: ShapeDispatch
    eval_fn: ShapeDispatch | None
    data: Data
    mesh: Mesh
    checkpoints: Checkpointer
    writer: MetricsWriter
    early_stopping: EarlyStopping | None = None
    on_eval: EvalCallback | None = None
    run_dir: RunDir | None = None  # where a streaming loader's state is saved with each checkpoint
    predict: Callable | None = None  # Tasks.predict: needed when there is eval data
    _evaluated: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)

    def run(self, state, start: int, steps: int, stop: _StopSignal):
        t = self.config.train
        tracker, last, shapes = _TrainMetrics(), {}, set()
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
                progress.finished(step, loss=f"{last['train/loss']:.3f}", lr=f"{last['train/learning_rate']:.2e}",
                                  audio_s_per_s=f"{last['train/audio_seconds_per_second']:.0f}")
            if stopping:  # no evaluation: a preempted machine's grace period is for the checkpoint
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
        last["train/compiled_shapes"] = len(self.step_fn)
        last["train/buckets_used"] = len(shapes)
        logger.info("stopped at step %d of %d; %d updates skipped for non-finite values; %d step shapes "
                    "compiled ahead of time, %d used", step, steps, int(jax.device_get(state.skipped)),
                    last["train/compiled_shapes"], len(shapes))
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
        scores, predictions = self.predict(state.params, self.data.eval, self.eval_fn, self.data.vocab, self.mesh)
        scores = {f"eval/{k}": v for k, v in scores.items()}
        self._evaluated = {step: scores}
        self.writer.write(step, scores)
        shown = "\n".join(f"  ref: {p.reference}\n  hyp: {p.hypothesis}"
                          for p in predictions[: self.config.eval.num_examples_to_print])
        logger.info("step %d eval: loss %.3f  WER %.2f%%  CER %.2f%% (%d utterances)\n%s", step, scores["eval/loss"],
                    100 * scores["eval/wer"], 100 * scores["eval/cer"], scores["eval/examples"], shown)
        self.writer.text(step, "eval/examples", shown)
        return scores
