"""`xlsr-jax pseudo-label`: a fine-tuned model transcribes audio nobody transcribed, and the transcripts it
is surest of become a manifest that `train` mixes with the labelled data (`manifest:FILE?weight=W`).

One pass of the evaluation step over the audio (bucketed, jitted per shape, on the mesh), greedy or with
an n-gram LM. Each utterance gets a confidence: the mean over its frames of the greedy path's log-prob
(infer/step.py `utterance_confidence`), and with an LM the best beam's score as well. Rows are kept by
`min_confidence`, by `top_fraction` (the surest part), or both; every row, kept or not, is listed in a
second file so that another threshold needs no second pass.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import logging
import math
import os
from pathlib import Path
from typing import Any, Sequence

import jax

from xlsr_jax.data.audio import SAMPLING_RATE
from xlsr_jax.data.pipeline import eval_loader, read_examples
from xlsr_jax.data.sources import cv_path_and_splits, is_test_split, split_options
from xlsr_jax.errors import UserError
from xlsr_jax.infer.evaluate import compiled_eval_step, model_pass
from xlsr_jax.infer.predict import Prediction, run_predictions
from xlsr_jax.model import feat_extract_output_lengths
from xlsr_jax.rundir import write_atomically

logger = logging.getLogger(__name__)

# Splits whose audio is (or holds) a benchmark's: transcribing them for training would train on the test clips.
_BENCHMARK_SPLITS = ("test", "validated")


@dataclasses.dataclass(frozen=True)
class Labelled:
    """One transcribed utterance: its audio file, the model's transcript and confidence, and whether the
    filter kept it."""

    path: str
    sentence: str
    confidence: float
    lm_score: float | None
    duration_s: float
    speaker: str
    source: str
    kept: bool


def all_rows_path(out: str | os.PathLike) -> Path:
    """Where every labelled row goes beside the kept ones: labels.tsv -> labels.all.tsv."""
    out = Path(out)
    return out.with_name(out.stem + ".all" + (out.suffix or ".tsv"))


def _check_data(data: Sequence[str]) -> None:
    if not data:
        raise UserError("pseudo-label: give the audio to transcribe, e.g. --data cv:/path/to/tr:other")
    for spec in data:
        parsed = cv_path_and_splits(split_options(spec)[0])
        named = set(parsed[1]) if parsed is not None else set()
        if is_test_split(spec) or named & set(_BENCHMARK_SPLITS):
            raise UserError(f"{spec}: a test split (or Common Voice's validated.tsv, which holds the test clips) "
                            "is the benchmark; transcripts of its audio must not reach training. Label other "
                            "audio (e.g. cv:DIR:other+invalidated)")


def _check_fraction(top_fraction: float | None) -> None:
    if top_fraction is not None and not 0.0 < top_fraction <= 1.0:
        raise UserError(f"--top-fraction {top_fraction}: must be in (0, 1]")


def select(predictions: Sequence[Prediction], *, min_confidence: float | None = None,
           top_fraction: float | None = None) -> list[bool]:
    """Which predictions to keep: a transcript that is not empty, with confidence >= `min_confidence`, and
    among the `top_fraction` of all predictions by confidence (ties broken by dataset order)."""
    _check_fraction(top_fraction)
    keep = [bool(p.hypothesis) and (min_confidence is None or p.confidence >= min_confidence) for p in predictions]
    if top_fraction is not None:
        ranked = sorted(range(len(predictions)), key=lambda i: (-predictions[i].confidence, i))
        top = set(ranked[:math.ceil(top_fraction * len(predictions))])
        keep = [k and i in top for i, k in enumerate(keep)]
    return keep


def write_rows(path: str | os.PathLike, rows: Sequence[Labelled], *, with_kept: bool) -> Path:
    """A manifest TSV (path, sentence, confidence[, lm_score], duration_s, speaker, source[, kept]) that
    `manifest:` reads back; `with_kept` adds the filter's verdict (the file of every row)."""
    columns = ["path", "sentence", "confidence"] + (["lm_score"] if any(r.lm_score is not None for r in rows) else [])
    columns += ["duration_s", "speaker", "source"] + (["kept"] if with_kept else [])

    def save(file: str) -> None:
        with open(file, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, lineterminator="\n")
            writer.writerow(columns)
            for r in rows:
                values = {**dataclasses.asdict(r), "confidence": f"{r.confidence:.6f}",
                          "duration_s": f"{r.duration_s:.3f}", "kept": int(r.kept),
                          "lm_score": "" if r.lm_score is None else f"{r.lm_score:.4f}"}
                writer.writerow([_cell(values[c]) for c in columns])
    write_atomically(path, save)
    return Path(path)


def _cell(value: Any) -> str:
    """A TSV cell without the tabs and newlines that would break its row (paths and speakers are free text)."""
    return " ".join(str(value).split("\t")).replace("\n", " ")


def pseudo_label(source: str, data: Sequence[str], out: str | os.PathLike, *, step: int | None = None,
                 best: bool = False, average: int = 1, lm: str | None = None, alpha: float | None = None, beta: float | None = None,
                 beam_width: int = 100, min_confidence: float | None = None, top_fraction: float | None = None,
                 batch_size: int | None = None, fsdp: int = 1, cache_dir: str | None = None) -> dict[str, Any]:
    """Transcribe the audio of `data` with `source` (a run, an exported folder or a hub id) and write the
    kept rows to `out` and every row to `all_rows_path(out)`. Their transcripts, if any, are never read.

    Returns {"out", "all", "labelled", "kept", "empty", "dropped" (clips that could not be used, by the data
    report), "no_file" (rows without an audio file a manifest can name), "min_confidence", "top_fraction"}.
    """
    _check_data(data)
    _check_fraction(top_fraction)  # before the pass, not after it
    mesh, loaded, data_config, decoder, global_batch = model_pass(
        source, step=step, best=best, fsdp=fsdp, cache_dir=cache_dir, lm=lm, alpha=alpha, beta=beta,
        beam_width=beam_width, batch_size=batch_size, average=average)
    # Audio alone (no vocabulary: transcripts neither needed nor checked); a clip the model gives no frame is dropped.
    loader, report = eval_loader(read_examples(data, data_config, need_text=False), data=data_config, vocab=None,
                                 normalization=None,
                                 frames_fn=functools.partial(feat_extract_output_lengths, loaded.model.config),
                                 batch_size=global_batch, name="pseudo-label", min_frames=1)
    if not len(loader.dataset):
        raise UserError(f"pseudo-label: no usable audio in {list(data)} (see the data report above)")
    eval_fn = compiled_eval_step(loaded, loader, mesh, with_log_probs=decoder is not None)
    _, predictions = run_predictions(loaded.params, loader, eval_fn, loaded.vocab, mesh, decoder)
    keep = select(predictions, min_confidence=min_confidence, top_fraction=top_fraction)
    rows, no_file = [], 0
    for p, k in zip(predictions, keep):
        example = loader.dataset.examples[p.index]
        if not os.path.isfile(example.path):  # e.g. a Hub dataset's row held in a parquet shard
            no_file += 1
            continue
        rows.append(Labelled(os.path.abspath(example.path), p.hypothesis, float(p.confidence), p.lm_score,
                             float(loader.dataset.lengths[p.index]) / SAMPLING_RATE, example.speaker, example.source, k))
    rows.sort(key=lambda r: -r.confidence)
    out, every = Path(out), all_rows_path(out)
    if jax.process_index() == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_rows(out, [r for r in rows if r.kept], with_kept=False)
        write_rows(every, rows, with_kept=True)
    if no_file:
        logger.warning("%d utterances have no audio file a manifest can name (a Hub dataset's rows): left out",
                       no_file)
    return {"out": str(out), "all": str(every), "labelled": len(rows), "kept": sum(r.kept for r in rows),
            "empty": sum(not p.hypothesis for p in predictions), "dropped": report["total"] - report["kept"],
            "no_file": no_file, "min_confidence": min_confidence, "top_fraction": top_fraction,
            "source": source, "step": loaded.step}


def format_summary(result: dict[str, Any]) -> str:
    """The lines `xlsr-jax pseudo-label` prints."""
    rule = ", ".join(f"{name} {result[key]}" for name, key in (("confidence >=", "min_confidence"),
                                                               ("top fraction", "top_fraction"))
                     if result[key] is not None) or "every non-empty transcript"
    return "\n".join([
        f"labelled {result['labelled']} utterances with {result['source']}"
        + (f" (step {result['step']})" if result["step"] is not None else "")
        + f"; {result['empty']} came out empty, {result['dropped']} clips could not be used (data report)",
        f"kept {result['kept']} ({rule}): {result['out']}",
        f"every row with its confidence: {result['all']}",
        f"next: xlsr-jax train ... --set 'data.train=[\"<your labelled data>\", \"manifest:{result['out']}?weight=1.0\"]'",
    ])
