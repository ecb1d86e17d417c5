"""The user's road: train -> evaluate -> export -> load the export with transformers (model +
processor, and pipeline) and get the transcripts `evaluate` wrote, word for word -> a model card
whose WER is `evaluate`'s -> push --dry-run passes."""

from __future__ import annotations

import csv
import shutil

import torch
from huggingface_hub import ModelCard
from transformers import Wav2Vec2ForCTC, Wav2Vec2Processor, pipeline

from xlsr_jax.data import load_audio
from xlsr_jax.hub.export import export_run
from xlsr_jax.hub.push import push_folder
from xlsr_jax.infer.evaluate import evaluate


def test_train_evaluate_export_and_run_in_transformers(trained_run, cv_dir, tmp_path):
    config, original = trained_run
    run = tmp_path / "run"
    shutil.copytree(original, run)
    result = evaluate(str(run), [f"cv:{cv_dir}:dev+test"], cache_dir=config.data.cache_dir)
    with open(result["predictions"], encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert len(rows) == 3 and any(r["hypothesis"] for r in rows), "a test on empty transcripts proves little"

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
