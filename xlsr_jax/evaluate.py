"""Evaluation: CTC loss, WER and CER (jiwer) over a whole eval set, with example transcripts."""

from __future__ import annotations

from typing import Callable

import jiwer
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from xlsr_jax import parallel
from xlsr_jax.data import BatchLoader
from xlsr_jax.text import Vocab
from xlsr_jax.train.step import MODEL_INPUTS


def error_rates(references: list[str], hypotheses: list[str]) -> dict[str, float]:
    """Corpus-level WER and CER (errors over all reference words / characters)."""
    return {"wer": float(jiwer.wer(references, hypotheses)), "cer": float(jiwer.cer(references, hypotheses))}


def evaluate(params, loader: BatchLoader, eval_fn: Callable, vocab: Vocab, mesh: Mesh
             ) -> tuple[dict[str, float], list[tuple[str, str]]]:
    """Run `eval_fn` (the jitted eval step) over one pass of `loader`.

    Returns ({"loss", "wer", "cer", "examples"}, [(reference, hypothesis)] in dataset order).
    """
    loss_sum, count = 0.0, 0.0
    predictions: dict[int, str] = {}
    for local in loader.iter_epoch():
        batch = parallel.global_batch({k: local[k] for k in MODEL_INPUTS}, mesh)
        out = eval_fn(params, batch)
        ids = multihost_utils.process_allgather(out["pred_ids"], tiled=True)
        frames = multihost_utils.process_allgather(out["frames"], tiled=True)
        index = multihost_utils.process_allgather(local["index"], tiled=True)
        loss_sum += float(out["loss_sum"])
        count += float(out["examples"])
        for i, text in zip(index, vocab.decode_ctc_batch(np.asarray(ids), np.asarray(frames))):
            if i >= 0:
                predictions[int(i)] = text
    pairs = [(loader.dataset.texts[i], predictions[i]) for i in sorted(predictions)]
    refs, hyps = [r for r, _ in pairs], [h for _, h in pairs]
    metrics = {"loss": loss_sum / max(count, 1.0), **error_rates(refs, hyps), "examples": float(len(pairs))}
    return metrics, pairs

