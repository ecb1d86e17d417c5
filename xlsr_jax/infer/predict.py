"""The evaluation loop shared by the trainer and `xlsr-jax evaluate`, and WER/CER (jiwer).

Batches are bucketed and jitted like training; the argmax happens on device and only `[B, frames]`
ids come back (log-probabilities only when an n-gram LM decodes them). Every array that comes back,
the example indices included, is gathered from the same global layout, so predictions meet their
references whatever the order of devices and processes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jiwer
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from xlsr_jax import parallel
from xlsr_jax.data import BatchLoader
from xlsr_jax.data.batch import MODEL_INPUTS
from xlsr_jax.text import Vocab


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One scored utterance (`index` is its row in the loader's dataset). `confidence`: the eval step's mean
    frame log-prob of the greedy path (infer/step.py); `lm_score`: the LM beam's score, with a decoder."""

    index: int
    reference: str
    hypothesis: str
    confidence: float | None = None
    lm_score: float | None = None
    frames: int = 0  # the model's frames of the utterance
    blank_frames: int = 0  # of those, the frames whose most likely token is the CTC blank


def error_rates(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
    """Corpus-level WER and CER: all errors over all reference words / characters (jiwer)."""
    return {"wer": float(jiwer.wer(list(references), list(hypotheses))),
            "cer": float(jiwer.cer(list(references), list(hypotheses)))}


def utterance_errors(reference: str, hypothesis: str) -> dict[str, int]:
    """Edit operations of one utterance: word_errors over reference_words, char_errors over
    reference_chars (substitutions + deletions + insertions, as jiwer counts them)."""
    words = jiwer.process_words(reference, hypothesis)
    chars = jiwer.process_characters(reference, hypothesis)
    return {
        "word_errors": words.substitutions + words.deletions + words.insertions,
        "reference_words": words.substitutions + words.deletions + words.hits,
        "char_errors": chars.substitutions + chars.deletions + chars.insertions,
        "reference_chars": chars.substitutions + chars.deletions + chars.hits,
    }


def _gather(x) -> np.ndarray:
    """A global (possibly multi-process) array -> the whole array on this host, in global order."""
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _fetch(index: jax.Array, out: dict[str, jax.Array], loader: BatchLoader, vocab: Vocab,
           decoder) -> tuple[float, float, list[Prediction]]:
    """(loss sum, examples, predictions) of one evaluated batch, fetched from the device (filler rows,
    index -1, left out)."""
    index = _gather(index)
    real = index >= 0  # filler rows of the last batch
    frames = _gather(out["frames"])[real]
    if decoder is None:
        ids = _gather(out["pred_ids"])[real]
        texts, lm_scores = vocab.decode_ctc_batch(ids, frames), [None] * len(frames)
    else:
        log_probs = _gather(out["log_probs"])[real]
        scored = decoder.decode_scored([lp[:n] for lp, n in zip(log_probs, frames)])
        texts, lm_scores, ids = [text for text, _ in scored], [score for _, score in scored], log_probs.argmax(-1)
    blanks = ((ids == vocab.pad_id) & (np.arange(ids.shape[1]) < frames[:, None])).sum(-1).tolist()
    confidence = _gather(out["confidence"])[real].tolist() if "confidence" in out else [None] * len(frames)
    predictions = [Prediction(i, loader.dataset.texts[i], text, c, s, int(n), b)
                   for i, text, c, s, n, b in zip(index[real].tolist(), texts, confidence, lm_scores, frames, blanks)]
    return float(out["loss_sum"]), float(out["examples"]), predictions


def run_predictions(params: Any, loader: BatchLoader, eval_fn: Callable, vocab: Vocab, mesh: Mesh,
                    decoder=None) -> tuple[float, list[Prediction]]:
    """One pass of `eval_fn` over `loader`: the jitted `infer.step.eval_step`, or the
    `compile.ShapeDispatch` of its executables compiled ahead of time for the loader's shapes.

    Batch k+1 is dispatched before batch k's outputs are fetched, so the device computes the next
    batch while the host decodes this one (two batches in flight at most).
    With `decoder` (an `infer.lm.LMDecoder`), `eval_fn` must return log_probs, which the decoder's
    beam search turns into text instead of the greedy decode.
    Returns (mean loss per example, predictions in dataset order).
    """
    fetched = []
    in_flight = None  # (index, outputs) of the batch dispatched last
    for _, arrays in parallel.device_batches(loader.iter_epoch(), mesh, (*MODEL_INPUTS, "index")):
        index = arrays.pop("index")
        dispatched = (index, eval_fn(params, arrays))
        if in_flight is not None:
            fetched.append(_fetch(*in_flight, loader, vocab, decoder))
        in_flight = dispatched
    if in_flight is not None:
        fetched.append(_fetch(*in_flight, loader, vocab, decoder))
    predictions = sorted((p for _, _, batch in fetched for p in batch), key=lambda p: p.index)
    loss_sum, count = sum(f[0] for f in fetched), sum(f[1] for f in fetched)
    return loss_sum / max(count, 1.0), predictions


def predict(params: Any, loader: BatchLoader, eval_fn: Callable, vocab: Vocab, mesh: Mesh,
            decoder=None) -> tuple[dict[str, float], list[Prediction]]:
    """`run_predictions` scored against the loader's transcripts: ({"loss", "wer", "cer", "examples",
    "blank_frames": the share of frames whose most likely token is the blank, "empty": the share of empty
    transcripts}, predictions in dataset order). Both near 1 past the warm-up: a model collapsed to blanks."""
    loss, predictions = run_predictions(params, loader, eval_fn, vocab, mesh, decoder)
    metrics = {"loss": loss, **error_rates([p.reference for p in predictions], [p.hypothesis for p in predictions]),
               "examples": float(len(predictions)), **collapse_shares(predictions)}
    return metrics, predictions


def collapse_shares(predictions: Sequence[Prediction]) -> dict[str, float]:
    """{"blank_frames": blank frames / frames, "empty": empty transcripts / utterances} over `predictions`."""
    frames = sum(p.frames for p in predictions)
    return {"blank_frames": sum(p.blank_frames for p in predictions) / max(frames, 1),
            "empty": sum(not p.hypothesis.strip() for p in predictions) / max(len(predictions), 1)}
