"""How a run starts in its output directory: fresh, resuming its own checkpoints, or from another run's
parameters; and the checks that keep a resume from loading weights that do not belong.

The rule for an existing `train.output_dir`:
- it holds checkpoints: the run resumes (the newest checkpoint that restores, or
  `checkpoint.resume_step`), with the vocabulary it trained with, after checking that vocabulary,
  model shape, global batch and data plan are unchanged (`run_signature.json`);
- `train.overwrite_output_dir=true`: the old run's files (the paths `RunDir` names, and under
  checkpoints/ only step folders) are deleted and a fresh run starts; what else the folder holds stays
  and is listed in the log;
- no checkpoints: a fresh run; leftovers of a run that never saved (its vocab.json, metrics.jsonl)
  are replaced, never reused;
- a fresh start (with or without overwrite) in a folder that is not a run (`RunDir.is_ours`) but holds
  names a run writes (a config.yaml of the user's, say): an error, before any work; nothing is touched;
- checkpoints but `checkpoint.resume=false` or `train.init_from`: an error, before any work.
`train.init_from=RUN_DIR[:STEP]` starts at step 0 with a fresh optimizer from that run's parameters,
its model config and its vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from xlsr_jax.checkpoint import Checkpointer, abstract_with_shardings, kept_steps
from xlsr_jax.config import Config
from xlsr_jax.errors import UserError
from xlsr_jax.rundir import RunDir, write_atomically
from xlsr_jax.text import Vocab
from xlsr_jax.train.metrics import keep_metrics_through
from xlsr_jax.train.signature import PARAMETER_KEYS, RESUME_KEYS, differences

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Start:
    """kind: "fresh", "resume" (own checkpoints) or "init" (`train.init_from`). step: the checkpoint to
    resume (None: the newest that restores) or to take parameters from. clear: delete the old run first."""

    kind: str
    step: int | None = None
    source: RunDir | None = None
    clear: bool = False


def _split_init_from(value: str) -> tuple[str, int | None]:
    """"RUN_DIR[:STEP]" -> (RUN_DIR, STEP or None); `gs://b/run:100` keeps its scheme's colon."""
    head, sep, tail = value.rpartition(":")
    return (head, int(tail)) if sep and tail.isdigit() and head else (value, None)


def _init_source(config: Config) -> tuple[RunDir, int]:
    path, step = _split_init_from(config.train.init_from)
    source = RunDir(path)
    if not source.is_run():
        raise UserError(f"train.init_from={config.train.init_from}: {path} is not a training run (no config.yaml "
                        "and checkpoints/); a Hugging Face model folder goes in model.pretrained")
    steps = kept_steps(source.checkpoints)
    if not steps or (step is not None and step not in steps):
        raise UserError(f"train.init_from={config.train.init_from}: {source.checkpoints} has "
                        f"{'no checkpoint for step ' + str(step) if steps else 'no checkpoints'}; steps kept: {steps}")
    return source, steps[-1] if step is None else step


def check_output_dir(output_dir: str) -> None:
    """A run's folder is its own: not empty (the current folder), the root or the home folder. Checked
    before anything reads or writes there."""
    folder = os.path.abspath(output_dir) if output_dir.strip() else ""
    if folder in ("", os.path.abspath(os.sep), os.path.expanduser("~")):
        raise UserError(f"train.output_dir={output_dir!r}{f' ({folder})' if folder else ''}: name a folder of the "
                        "run's own (runs/NAME), not the current folder, the root or your home folder")


def plan_start(config: Config) -> Start:
    """How this run starts, by the rule in the module docstring; errors name the keys to change."""
    t, c = config.train, config.checkpoint
    run = RunDir(t.output_dir)
    steps = [] if t.overwrite_output_dir else kept_steps(run.checkpoints)
    instead = "set train.overwrite_output_dir=true to delete that run and start over, or use another train.output_dir"
    if steps:
        if not c.resume:
            raise UserError(f"{run.checkpoints} holds checkpoints (steps {steps}) and checkpoint.resume is false: "
                            f"{instead}")
        if t.init_from:
            raise UserError(f"train.init_from starts a new run, but {run.checkpoints} holds checkpoints (steps "
                            f"{steps}): {instead}")
        if c.resume_step is not None and c.resume_step not in steps:
            raise UserError(f"checkpoint.resume_step={c.resume_step}: {run.checkpoints} has no checkpoint for "
                            f"that step; steps kept: {steps}")
        return Start("resume", c.resume_step)
    if c.resume_step is not None:
        raise UserError(f"checkpoint.resume_step={c.resume_step}: {run.checkpoints} holds no checkpoints"
                        f"{' (train.overwrite_output_dir is true)' if t.overwrite_output_dir else ''}")
    foreign = run.foreign_files()
    if foreign:
        raise UserError(f"train.output_dir={t.output_dir} holds {', '.join(foreign)}, but is not an xlsr-jax run "
                        "(no run_signature.json, no config.yaml written by xlsr-jax): a new run there would "
                        f"{'delete' if t.overwrite_output_dir else 'overwrite'} them. Choose another "
                        "train.output_dir, or move those files away.")
    if t.init_from:
        source, step = _init_source(config)
        return Start("init", step, source, clear=t.overwrite_output_dir)
    return Start("fresh", clear=t.overwrite_output_dir)


def vocab_to_reuse(config: Config, output_dir: str | Path) -> Path | None:
    """The vocab.json the checkpoints to continue from were trained with: the run's own when it resumes,
    `train.init_from`'s run's, else None (a fresh run builds its own)."""
    t = config.train
    run = RunDir(output_dir)
    if not t.overwrite_output_dir and config.checkpoint.resume and kept_steps(run.checkpoints):
        return run.vocab
    if t.init_from:
        return RunDir(_split_init_from(t.init_from)[0]).vocab
    return None


def clear_output_dir(run: RunDir, is_main: bool) -> None:
    """train.overwrite_output_dir: delete the old run's files (process 0; the others wait for it)."""
    if is_main:
        deleted, kept = run.clear() if run.path.exists() else ([], [])
        if deleted:
            logger.warning("train.overwrite_output_dir: deleted %s from %s", ", ".join(deleted), run.path)
        if kept:
            logger.info("train.overwrite_output_dir: kept what is not the run's in %s: %s", run.path, ", ".join(kept))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("xlsr_jax: output directory cleared")


def init_model(source: RunDir, config: Config, vocab: Vocab):
    """The model of `train.init_from`: the source run's model_config.json with this run's regularisation;
    no weights are loaded from model.pretrained (they come from the source's checkpoint). Returns
    (model, None) like setup.build_model."""
    from transformers import Wav2Vec2Config

    from xlsr_jax.model import FlaxWav2Vec2ForCTC
    from xlsr_jax.model.hf_config import model_overrides

    model_config = Wav2Vec2Config.from_json_file(str(source.model_config))
    for key, value in model_overrides(config.model, vocab).items():
        setattr(model_config, key, value)
    dtype = jnp.bfloat16 if config.train.precision == "bfloat16" else jnp.float32
    return FlaxWav2Vec2ForCTC(model_config, dtype=dtype, **config.model.execution_options()), None


def _read_signature(run: RunDir) -> dict[str, Any] | None:
    return json.loads(run.signature.read_text(encoding="utf-8")) if run.signature.exists() else None


def check_start(start: Start, run: RunDir, signature: dict[str, Any]) -> None:
    """Stop a resume (or an init_from) whose checkpoints were written under another vocab, model shape,
    global batch or data plan, naming each change and the way on."""
    if start.kind == "resume":
        old = _read_signature(run)
        if old is None:  # a run written before run_signature.json: orbax still rejects other shapes
            logger.warning("%s: missing; resuming without checking that the setup is unchanged", run.signature)
            return
        changed = differences(old, signature, RESUME_KEYS)
        if changed:
            raise UserError(f"{run.path} cannot resume: its checkpoints were trained with another setup "
                            f"(from {run.signature}):\n  " + "\n  ".join(changed) + "\nTo keep that run, choose "
                            "another train.output_dir (train.init_from=" f"{run.path} starts from its weights); to "
                            "start over here, set train.overwrite_output_dir=true; or undo the change.")
    elif start.kind == "init":
        old = _read_signature(start.source)
        changed = differences(old, signature, PARAMETER_KEYS) if old is not None else []
        if changed:
            vocab = (f"\n(vocabularies: {start.source.vocab} vs this run's; data.vocab must be left unset or be "
                     "that file)" if any(line.startswith("vocab.") for line in changed) else "")
            raise UserError(f"train.init_from={start.source.path}: its parameters do not fit this model:\n  "
                            + "\n  ".join(changed) + vocab)


def write_signature(run: RunDir, signature: dict[str, Any]) -> None:
    write_atomically(run.signature, lambda tmp: Path(tmp).write_text(json.dumps(signature, indent=1) + "\n"))


def start_state(start: Start, run: RunDir, checkpoints: Checkpointer, state, shardings, is_main: bool):
    """The state training starts from: restored (resume), with another run's parameters (init), or as
    built (fresh). metrics.jsonl is cut back to its step (process 0)."""
    if start.kind == "resume":
        state = checkpoints.restore(abstract_with_shardings(state, shardings), start.step)
    elif start.kind == "init":
        source = Checkpointer(start.source.checkpoints, read_only=True)
        try:
            params = source.restore_params(abstract_with_shardings(state.params, shardings.params), start.step)
        finally:
            source.close()
        state = state.replace(params=params)
        logger.info("train.init_from: step 0 with the parameters of %s/%d", start.source.checkpoints, start.step)
    step = int(jax.device_get(state.step))
    if is_main:
        dropped = keep_metrics_through(run.metrics, step)
        if dropped:
            logger.info("%s: dropped %d records after step %d (trained again now)", run.metrics, dropped, step)
    return state
