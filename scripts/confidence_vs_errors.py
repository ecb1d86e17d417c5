#!/usr/bin/env python3
"""Does `xlsr-jax pseudo-label`'s confidence rank the utterances a model gets wrong below the ones it gets
right? Joins, by audio path, `xlsr-jax evaluate`'s predictions TSV (per-utterance character errors) and
pseudo-label's `.all.tsv` of the same model on the same transcribed split:

    xlsr-jax evaluate RUN --data cv:data/demo_tr:dev --out pred.tsv
    xlsr-jax pseudo-label RUN --data cv:data/demo_tr:dev --out pl/labels.tsv
    python scripts/confidence_vs_errors.py pred.tsv pl/labels.all.tsv

Prints how many transcripts agree, Spearman's rho between confidence and utterance CER, and the corpus CER
of the surest half against the rest.
"""

from __future__ import annotations

import argparse
import csv

import numpy as np
from scipy.stats import spearmanr


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("predictions", help="xlsr-jax evaluate's predictions TSV")
    parser.add_argument("all_rows", help="xlsr-jax pseudo-label's OUT.all.tsv")
    args = parser.parse_args(argv)
    with open(args.predictions, encoding="utf-8", newline="") as f:
        scored = {r["path"]: r for r in csv.DictReader(f, delimiter="\t")}
    with open(args.all_rows, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    missing = [r["path"] for r in rows if r["path"] not in scored]
    if missing or len(rows) != len(scored):
        raise SystemExit(f"the files list different utterances ({len(rows)} vs {len(scored)}; e.g. {missing[:3]})")
    same = sum(scored[r["path"]]["hypothesis"] == r["sentence"] for r in rows)
    confidence = np.array([float(r["confidence"]) for r in rows])
    errors = np.array([int(scored[r["path"]]["char_errors"]) for r in rows])
    chars = np.array([int(scored[r["path"]]["reference_chars"]) for r in rows])
    rho, p = spearmanr(confidence, errors / np.maximum(chars, 1))
    order = np.argsort(-confidence, kind="stable")  # surest first
    top, rest = order[:len(rows) // 2], order[len(rows) // 2:]
    print(f"utterances {len(rows)}; pseudo-label transcript == evaluate's hypothesis: {same}/{len(rows)}")
    print(f"Spearman(confidence, utterance CER) = {rho:.3f} (p = {p:.2g})")
    print(f"corpus CER: all {errors.sum() / chars.sum():.4f}, surest half {errors[top].sum() / chars[top].sum():.4f}, "
          f"the rest {errors[rest].sum() / chars[rest].sum():.4f}")
    print(f"confidence {confidence.min():.4f} .. {confidence.max():.4f}, median {np.median(confidence):.4f}")


if __name__ == "__main__":
    main()
