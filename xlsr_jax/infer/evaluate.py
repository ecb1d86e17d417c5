"""`xlsr-jax evaluate`: score a run's checkpoint, an export or a hub model on any data, with the text
normalisation it trained with; write the predictions TSV and record the result in eval_results.json,
where `export` finds it for the model card."""

from __future__ import annotations

import csv
import dataclasses
import datetime
import functools
import logging
import os
import re
from pathlib import Path
from typing import Any, Sequence

import jax
from jax.sharding import Mesh

from xlsr_jax import parallel
from xlsr_jax.aot import ShapeDispatch, StepToCompile, abstract_like, compile_steps
from xlsr_jax.config import DataConfig, MeshConfig
from xlsr_jax.data.report import REASONS, format_counts
from xlsr_jax.data.sources import cv_path_and_splits, split_hf_spec, split_options
from xlsr_jax.errors import UserError
from xlsr_jax.data.pipeline import eval_loader, read_examples
from xlsr_jax.infer.predict import Prediction, predict, utterance_errors
from xlsr_jax.infer.load import LoadedModel, load_model
from xlsr_jax.infer.step import jit_eval_step
from xlsr_jax.model import feat_extract_output_lengths
from xlsr_jax.rundir import record_eval_result
from xlsr_jax.text import headline_metric

logger = logging.getLogger(__name__)

PREDICTION_COLUMNS = ("path", "reference", "hypothesis", "word_errors", "reference_words", "char_errors",
                      "reference_chars")


def write_predictions(path: str | Path, predictions: Sequence[Prediction], audio_paths: Sequence[str]) -> Path:
    """A TSV of `PREDICTION_COLUMNS`, one row per utterance (`audio_paths[p.index]` names its clip)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        writer.writerow(PREDICTION_COLUMNS)
        for p in predictions:
            errors = utterance_errors(p.reference, p.hypothesis)
            writer.writerow([audio_paths[p.index], p.reference, p.hypothesis, *errors.values()])
    return path


_CV_VERSION = re.compile(r"cv-corpus-(\d+(?:\.\d+)?)")


def describe_dataset(spec: str, language: str | None) -> dict[str, str]:
    """Model-card fields of a data spec: type, name, config, split.

    `cv:/data/cv-corpus-23.0-2025-09-05/tr:test` -> common_voice, "Common Voice 23.0 (tr)", tr, test;
    `hf:google/fleurs:tr_tr:test` -> google/fleurs, google/fleurs, tr_tr, test.
    """
    base = split_options(spec)[0]
    if base.startswith("hf:"):  # the Hub's own ids, so the card's model-index links the dataset
        name, config, splits = split_hf_spec(base[len("hf:"):])
        local = os.path.exists(os.path.expanduser(name))
        return {"type": "local" if local else name, "name": os.path.basename(os.path.normpath(name)) if local else name,
                "config": config or language or "", "split": "+".join(splits)}
    parsed = cv_path_and_splits(spec)
    if parsed is None:
        return {"type": spec.partition(":")[0] or "local", "name": spec, "config": language or "", "split": "eval"}
    path, splits = parsed
    version = _CV_VERSION.search(path)
    locale = language or os.path.basename(os.path.normpath(path))
    name = f"Common Voice {version.group(1)}" if version else "Common Voice"
    return {"type": "common_voice", "name": f"{name} ({locale})", "config": locale, "split": "+".join(splits)}


def eval_result(data: Sequence[str], step: int | None, metrics: dict[str, float], *, language: str | None,
                headline: str, decoder: dict[str, Any], averaged: Sequence[int] = ()) -> dict[str, Any]:
    """One entry of eval_results.json (what the model card reports). `averaged`: the checkpoints whose mean
    was scored (`step` is the newest of them); empty for one checkpoint."""
    spec = ",".join(data)
    return {
        "data": spec,
        "dataset": describe_dataset(data[0], language),
        "step": step,
        **({"averaged": list(averaged)} if averaged else {}),
        "wer": metrics["wer"],
        "cer": metrics["cer"],
        "num_utterances": int(metrics["examples"]),
        "language": language,
        "headline": headline,
        "decoder": decoder,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------- the `xlsr-jax evaluate` command


def _decoder_info(lm: str | None, decoder) -> dict[str, Any]:
    if decoder is None:
        return {"type": "greedy"}
    return {"type": "lm", "lm": str(lm), "alpha": decoder.alpha, "beta": decoder.beta,
            "beam_width": decoder.beam_width}


def _outputs(loaded: LoadedModel, result: dict[str, Any], out: str | None) -> tuple[Path, Path]:
    """(predictions TSV, eval_results.json): in the run / model folder; a hub id's go to the cwd."""
    local = Path(loaded.source).exists()
    folder = loaded.folder if local else Path.cwd()
    if out is None:
        split = result["dataset"]["split"].replace("+", "-")
        tags = [split] + ([f"step{loaded.step}"] if loaded.step is not None else [])
        tags += [f"avg{len(loaded.averaged)}"] if loaded.averaged else []
        tags += ["lm"] if result["decoder"]["type"] == "lm" else []
        out = folder / f"predictions-{'-'.join(tags)}.tsv"
    return Path(out), folder / "eval_results.json"


def compiled_eval_step(loaded: LoadedModel, loader, mesh, *, with_log_probs: bool) -> ShapeDispatch:
    """The eval step compiled for every bucket shape of `loader` before the first batch (in parallel),
    so none compiles in the middle of the pass."""
    jitted = jit_eval_step(loaded.model, blank_id=loaded.vocab.pad_id, reduction=loaded.model.config.ctc_loss_reduction,
                           params_shardings=jax.tree.map(lambda x: x.sharding, loaded.params), mesh=mesh,
                           with_log_probs=with_log_probs)
    step = StepToCompile("eval", jitted, abstract_like(loaded.params), loader.batch_shapes.values())
    return compile_steps([step], parallel.batch_sharding(mesh))["eval"]


def model_pass(source: str, *, step: int | None, best: bool, fsdp: int, cache_dir: str | None, lm: str | None,
               alpha: float | None, beta: float | None, beam_width: int, batch_size: int | None,
               language: str | None = None, average: int = 1) -> tuple[Mesh, LoadedModel, DataConfig, Any, int]:
    """What a pass of a model over data needs (evaluate, pseudo-label): (mesh with `fsdp`, the loaded model,
    its data settings with `cache_dir`, the LM decoder or None for greedy, the global batch size: `batch_size`
    or the run's eval / train per-device batch, else 8, times the data-parallel devices)."""
    mesh = parallel.make_mesh(MeshConfig(fsdp=fsdp))
    loaded = load_model(source, step=step, best=best, mesh=mesh, language=language, average=average)
    data_config = loaded.config.data if loaded.config is not None else DataConfig()
    if cache_dir:
        data_config = dataclasses.replace(data_config, cache_dir=cache_dir)
    decoder = None
    if lm is not None:
        from xlsr_jax.infer.lm import LMDecoder  # needs the `lm` extra

        decoder = LMDecoder.from_path(lm, loaded.vocab, alpha=alpha, beta=beta, beam_width=beam_width)
    per_device = batch_size or (loaded.config.eval.per_device_batch_size or loaded.config.train.per_device_batch_size
                                if loaded.config is not None else 8)
    return mesh, loaded, data_config, decoder, per_device * parallel.data_parallel_size(mesh)


def evaluate(source: str, data: Sequence[str], *, step: int | None = None, best: bool = False, average: int = 1,
             out: str | None = None, lm: str | None = None, alpha: float | None = None,
             beta: float | None = None, beam_width: int = 100, batch_size: int | None = None, fsdp: int = 1,
             language: str | None = None, cache_dir: str | None = None) -> dict[str, Any]:
    """Score `source` (run dir, model folder or hub id) on the `data` specs; write the predictions TSV
    and record the result in eval_results.json. Returns the result (see `eval_result`) with the
    paths written under "predictions" and "results_file", and the data report under "report"."""
    if not data:
        raise UserError("evaluate: give the data to score, e.g. --data cv:/path/to/tr:test")
    mesh, loaded, data_config, decoder, global_batch = model_pass(
        source, step=step, best=best, fsdp=fsdp, cache_dir=cache_dir, lm=lm, alpha=alpha, beta=beta,
        beam_width=beam_width, batch_size=batch_size, language=language, average=average)
    if loaded.config is not None and set(data) & set(loaded.config.data.train):
        logger.warning("%s: this run trained on %s; its score there says nothing about new speakers",
                       source, sorted(set(data) & set(loaded.config.data.train)))
    if loaded.model.config.feat_extract_norm == "group":
        logger.warning("%s is a group-norm (base-style) model: its conv features see the padding of a batch, "
                       "so, as with transformers' Trainer, scores can differ a little from unpadded inference",
                       source)
    loader, report = eval_loader(read_examples(data, data_config), data=data_config, vocab=loaded.vocab,
                                 normalization=loaded.normalization,
                                 frames_fn=functools.partial(feat_extract_output_lengths, loaded.model.config),
                                 batch_size=global_batch)
    eval_fn = compiled_eval_step(loaded, loader, mesh, with_log_probs=decoder is not None)
    metrics, predictions = predict(loaded.params, loader, eval_fn, loaded.vocab, mesh, decoder)
    language = loaded.normalization.language
    result = eval_result(data, loaded.step, metrics, language=language, headline=headline_metric(language),
                         decoder=_decoder_info(lm, decoder), averaged=loaded.averaged)
    predictions_path, results_path = _outputs(loaded, result, out)
    if jax.process_index() == 0:
        write_predictions(predictions_path, predictions, [e.path for e in loader.dataset.examples])
        record_eval_result(results_path, result)
    return {**result, "predictions": str(predictions_path), "results_file": str(results_path),
            "report": report, "source": source}


def format_summary(result: dict[str, Any]) -> str:
    """What `xlsr-jax evaluate` prints; the last two lines are `wer: X` and `cer: X` (fractions)."""
    report = result["report"]
    step = f" (step {result['step']})" if result["step"] is not None else ""
    if result.get("averaged"):
        step = f" (the mean of the checkpoints of steps {', '.join(map(str, result['averaged']))})"
    decoder = result["decoder"]
    decoded = "greedy (argmax)" if decoder["type"] == "greedy" else (
        f"n-gram LM {decoder['lm']} (alpha {decoder['alpha']}, beta {decoder['beta']}, beam {decoder['beam_width']})")
    headline = result["headline"]
    # Those two are scored; a reason newer than the report counts none.
    skipped = {r: report.get(r, 0) for r in REASONS if r not in ("infeasible", "out_of_vocabulary")}
    return "\n".join([
        f"evaluated {result['source']}{step} on {result['data']}",
        f"utterances: {result['num_utterances']} scored; {report['total'] - report['kept']} skipped "
        f"({format_counts(skipped)}); {report['infeasible']} longer in characters than the model has frames "
        f"and {report['out_of_vocabulary']} with characters outside the vocabulary (scored)",
        f"text normalisation: language {result['language']}",
        f"decoder: {decoded}",
        f"predictions: {result['predictions']}",
        f"results: {result['results_file']}",
        f"headline ({headline.upper()}{', a character-based language' if headline == 'cer' else ''}): "
        f"{100 * result[headline]:.2f} %",
        f"wer: {result['wer']:.4f}",
        f"cer: {result['cer']:.4f}",
    ])
