"""The user's road: (train ->) evaluate -> export -> load the export with transformers (model +
processor, and pipeline) and get the transcripts `evaluate` wrote, word for word -> a model card
whose WER is `evaluate`'s -> push --dry-run passes."""

from __future__ import annotations

import csv
import shutil

import jiwer
import pytest
import torch
from huggingface_hub import ModelCard
from transformers import Wav2Vec2ForCTC, Wav2Vec2Processor, pipeline

from _forced import REFERENCES
from xlsr_jax.data import load_audio
from xlsr_jax.hub.export import export_run
from xlsr_jax.hub.push import push_folder
from xlsr_jax.infer.evaluate import evaluate


def test_train_evaluate_export_and_run_in_transformers(forced_run, cv_dir, tmp_path):
    """On the forced run (a trained run's checkpoints with known transcripts): the card gives the exported
    (newest) step's dev+test WER, 1.5, not its dev WER (4/3) nor the best step's dev+test WER (0.75),
    both evaluated too."""
    config, original = forced_run
    run = tmp_path / "run"
    shutil.copytree(original, run)
    result = evaluate(str(run), [f"cv:{cv_dir}:dev+test"], cache_dir=config.data.cache_dir)
    with open(result["predictions"], encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    refs, hyps = [r["reference"] for r in rows], [r["hypothesis"] for r in rows]
    assert (refs, hyps) == (REFERENCES["dev"] + REFERENCES["test"], ["nasılsan merhaba"] * 3)
    assert result["step"] == 6 and result["wer"] == pytest.approx(jiwer.wer(refs, hyps), abs=1e-12)
    other_split = evaluate(str(run), [f"cv:{cv_dir}:dev"], cache_dir=config.data.cache_dir)
    other_step = evaluate(str(run), [f"cv:{cv_dir}:dev+test"], step=3, cache_dir=config.data.cache_dir)
    assert (result["wer"], other_split["wer"], other_step["wer"]) == pytest.approx((1.5, 4 / 3, 0.75), abs=1e-12)

    out = tmp_path / "export"
    export_run(run, out)
    processor = Wav2Vec2Processor.from_pretrained(out)
    model = Wav2Vec2ForCTC.from_pretrained(out).eval()
    asr = pipeline("automatic-speech-recognition", model=str(out))
    for row in rows:
        audio = load_audio(row["path"])
        inputs = processor(audio, sampling_rate=16000, return_tensors="pt")
        with torch.no_grad():
            ids = model(inputs["input_values"], attention_mask=inputs.get("attention_mask")).logits.argmax(-1)
        assert processor.batch_decode(ids)[0].split() == row["hypothesis"].split(), row["path"]
        assert asr({"raw": audio, "sampling_rate": 16000})["text"].split() == row["hypothesis"].split()

    card = ModelCard.load(out / "README.md")
    (wer,) = [m for m in card.data.eval_results if m.metric_type == "wer"]
    assert wer.metric_value == round(100 * result["wer"], 2) and wer.dataset_split == "dev+test"
    assert push_folder(out, "someone/xlsr-jax-tiny-tr", dry_run=True)
