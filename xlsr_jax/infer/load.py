"""What `evaluate`, `transcribe` and `export` read: a model from a training run directory (any kept
orbax checkpoint), a Hugging Face model folder, or a hub id, with its vocabulary and the text
normalisation it was trained with."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Iterable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from transformers import Wav2Vec2Config

from xlsr_jax import parallel
from xlsr_jax.checkpoint import Checkpointer, abstract_with_shardings
from xlsr_jax.config import Config, load_config
from xlsr_jax.errors import UserError
from xlsr_jax.model import FlaxWav2Vec2ForCTC, load_pretrained
from xlsr_jax.model.pretrained import resolve_model_dir
from xlsr_jax.rundir import EXPORT_INFO, RunDir
from xlsr_jax.text import NORMALIZATION_FILE, TextNormalization, Vocab

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class LoadedModel:
    """A model ready to run. `params` live on the requested shardings (one device by default)."""

    model: FlaxWav2Vec2ForCTC
    params: Any
    vocab: Vocab
    normalization: TextNormalization
    step: int | None  # the training step of the weights, when known
    source: str  # as the user named it
    folder: Path  # the run directory or the model folder (a hub id's download)
    run: RunDir | None = None  # set when the source is a training run
    config: Config | None = None  # the run's config
    averaged: tuple[int, ...] = ()  # the checkpoints whose mean `params` is (`step`: the newest of them)


def _single_device():
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _shardings(abstract_params: Any, mesh: Mesh | None) -> Any:
    if mesh is None:
        return jax.tree.map(lambda _: _single_device(), abstract_params)
    return parallel.tree_shardings(abstract_params, mesh)


def run_model_config(run: RunDir, config: Config, vocab: Vocab) -> Wav2Vec2Config:
    """The Wav2Vec2Config a run trained (its model_config.json; runs older than that file rebuild it)."""
    if run.model_config.exists():
        return Wav2Vec2Config.from_json_file(str(run.model_config))
    from xlsr_jax.model.hf_config import model_config  # only for runs written before model_config.json

    return model_config(config.model, vocab)


# Scanned layers compile once for all 24 of XLSR-53; nothing else matters without a backward pass.
INFERENCE_OPTIONS = {"scan_layers": True}


def stored_normalization(run: RunDir, config: Config) -> TextNormalization:
    """The normalisation a run trained with (its text_normalization.json, which train/setup.py's
    `choose_normalization` decided); runs older than that file fall back to their config's data fields."""
    if run.normalization.exists():
        return TextNormalization.load(run.normalization)
    logger.warning("%s: no %s (a run older than it); using data.language/lowercase/chars_to_ignore from "
                   "its config.yaml", run.path, NORMALIZATION_FILE)
    d = config.data
    # Such runs predate the language presets: score them the way they trained (NFC, apostrophes dropped).
    return TextNormalization(language=d.language, lowercase=d.lowercase, chars_to_ignore=d.chars_to_ignore,
                             keep_apostrophes=False, unicode_normalization="NFC")


def run_checkpointer(run: RunDir, config: Config) -> Checkpointer:
    c = config.checkpoint
    return Checkpointer(run.checkpoints, best_metric=c.best_metric, best_mode=c.best_mode, read_only=True)


def load_run(path: str | Path, *, step: int | None = None, best: bool = False,
             mesh: Mesh | None = None, average: int = 1) -> LoadedModel:
    """The parameters of one kept checkpoint of a run (the newest, `step`, or the best by
    `checkpoint.best_metric`), restored onto `mesh` (or one device) whatever mesh saved them. `average` > 1:
    the mean of the `average` newest kept checkpoints (with `best`: the best ones), as icefall's averaged model."""
    run = RunDir(path)
    config = load_config(run.config)
    if not run.vocab.exists():
        raise UserError(f"{run.vocab}: missing; is {run.path} a complete xlsr-jax run directory?")
    vocab = Vocab.load(run.vocab)
    # The checkpoints hold the layout the run trained with (stacked layers when scanned).
    model = FlaxWav2Vec2ForCTC(run_model_config(run, config, vocab), scan_layers=config.model.scan_layers)
    checkpoints = run_checkpointer(run, config)
    if average > 1 and step is not None:
        raise UserError(f"{path}: --average takes the newest (or with --best, the best) checkpoints, not --step")
    try:
        chosen = checkpoints.select_steps(average, best) if average > 1 else [checkpoints.select_step(step, best)]
        abstract = model.abstract_params()
        target = abstract_with_shardings(abstract, _shardings(abstract, mesh))
        params = average_params(checkpoints.restore_params(target, s) for s in chosen)
    finally:
        checkpoints.close()
    return LoadedModel(model, params, vocab, stored_normalization(run, config), max(chosen), str(path), run.path,
                       run=run, config=config, averaged=tuple(chosen) if average > 1 else ())


def average_params(trees: Iterable[Any]) -> Any:
    """The element-wise mean of parameter trees, taken one tree at a time (two in memory at once): summed
    in float32 in order, then divided by their count; a tree alone is returned as is."""
    total, count = None, 0
    for tree in trees:
        total = tree if total is None else _add(total, tree)
        count += 1
    return total if count == 1 else jax.jit(lambda t: jax.tree.map(lambda x: x / count, t), donate_argnums=0)(total)


_add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b), donate_argnums=0)


def load_folder(source: str | Path, *, mesh: Mesh | None = None, language: str | None = None) -> LoadedModel:
    """A Hugging Face model folder or hub id (ours, or any Wav2Vec2ForCTC with a vocab.json)."""
    try:
        folder = resolve_model_dir(source)
    except OSError as err:  # not a folder, and not on the Hub (or no network)
        raise UserError(str(err)) from err
    if not (folder / "vocab.json").exists():
        raise UserError(f"{folder}: no vocab.json; a CTC model folder needs its tokenizer's vocabulary")
    vocab = Vocab.load(folder / "vocab.json")
    model, host_params = load_pretrained(folder, options=INFERENCE_OPTIONS)
    if model.config.vocab_size != len(vocab):
        raise UserError(f"{folder}: config.json has vocab_size {model.config.vocab_size} but vocab.json "
                        f"has {len(vocab)} entries")
    if (folder / NORMALIZATION_FILE).exists():
        normalization = TextNormalization.load(folder / NORMALIZATION_FILE)
    else:
        normalization = TextNormalization(language=language)
        logger.warning("%s: no %s (not an xlsr-jax export); scoring with the default normalisation "
                       "(lowercase, XLSR punctuation removed, language %s)", folder, NORMALIZATION_FILE, language)
    info = json.loads((folder / EXPORT_INFO).read_text()) if (folder / EXPORT_INFO).exists() else {}
    params = jax.device_put(host_params, _shardings(host_params, mesh))
    return LoadedModel(model, params, vocab, normalization, info.get("step"), str(source), folder)


def load_model(source: str | Path, *, step: int | None = None, best: bool = False, mesh: Mesh | None = None,
               language: str | None = None, average: int = 1) -> LoadedModel:
    """A run directory, a Hugging Face model folder, or a hub id -> LoadedModel."""
    if RunDir(source).is_run():
        model = load_run(source, step=step, best=best, mesh=mesh, average=average)
    else:
        if step is not None or best or average > 1:
            raise UserError(f"{source}: --step, --best and --average choose among a training run's checkpoints; "
                            "this is a model folder or hub id")
        model = load_folder(source, mesh=mesh, language=language)
    if language and model.normalization.language != language:
        logger.warning("scoring with language %s; the model was trained with %s", language,
                       model.normalization.language)
        model.normalization = dataclasses.replace(model.normalization, language=language)
    return model
