"""`xlsr-jax build-lm`: a word n-gram (ARPA) from training transcripts, normalised exactly as the
model's labels were, so the LM's words are the words the acoustic model spells."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from xlsr_jax.config import DataConfig, load_config
from xlsr_jax.data.sources import is_test_split
from xlsr_jax.errors import UserError
from xlsr_jax.data.pipeline import read_examples
from xlsr_jax.infer.ngram import build_arpa
from xlsr_jax.infer.load import stored_normalization
from xlsr_jax.rundir import RunDir
from xlsr_jax.text import TextNormalization


def build_lm(data: Sequence[str], out: str | Path, *, order: int = 3, run: str | None = None,
             language: str | None = None) -> dict[str, Any]:
    """Write `out` (ARPA) from the transcripts of `data`; returns what was counted."""
    tests = [spec for spec in data if is_test_split(spec)]
    if tests:
        raise UserError(f"build-lm: {tests} names a Common Voice test split; an LM built from the benchmark's "
                        "sentences would make its WER meaningless. Use train (and dev) text.")
    data_config, normalization = DataConfig(), TextNormalization(language=language)
    if run is not None:
        if not RunDir(run).is_run():
            raise UserError(f"{run}: not a training run directory (no config.yaml and checkpoints/)")
        config = load_config(RunDir(run).config)
        data_config, normalization = config.data, stored_normalization(RunDir(run), config)
    sentences = [normalization(e.text, e.language) for e in read_examples(data, data_config)]
    sentences = [s for s in sentences if s]
    if not sentences:
        raise UserError(f"build-lm: no transcripts in {list(data)}")
    path = build_arpa(sentences, out, order=order)
    words = [w for s in sentences for w in s.split()]
    return {"path": str(path), "order": order, "sentences": len(sentences), "words": len(words),
            "unigrams": len(set(words))}
