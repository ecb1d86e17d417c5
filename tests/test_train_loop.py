"""End to end: `train(config)` on a tiny Common Voice folder over 4 fake devices: logs, evaluation,
checkpoints, exact resume, one compilation per bucket, a Hugging Face folder that PyTorch loads."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from _runs import tiny_run_config
from xlsr_jax.config import load_config
from xlsr_jax.train.loop import train


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_run(cv_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("loop")
    config = tiny_run_config(cv_dir, out, max_steps=4, eval_steps=2, save_steps=2)
    result = train(config)
    return config, out / "run", result


def test_run_writes_logs_config_vocab_and_checkpoints(finished_run):
    config, run, result = finished_run
    records = _records(run)
    train_steps = [r["step"] for r in records if "train/loss" in r]
    eval_records = [r for r in records if "eval/wer" in r]
    assert train_steps == [1, 2, 3, 4]
    assert all(np.isfinite(r["train/loss"]) and r["train/audio_seconds_per_second"] > 0
               for r in records if "train/loss" in r)
    assert [r["step"] for r in eval_records] == [2, 4]
    assert all(0.0 <= r["eval/cer"] and r["eval/examples"] == 3 for r in eval_records)
    assert result["eval/wer"] == eval_records[-1]["eval/wer"]
    assert load_config(run / "config.yaml") == config
    assert json.loads((run / "vocab.json").read_text())["[PAD]"] == len(json.loads((run / "vocab.json").read_text())) - 1
    assert any((run / "tensorboard").iterdir())
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]


def test_one_compilation_per_bucket(finished_run):
    _, _, result = finished_run
    assert result["train/buckets_used"] >= 2, "the tiny corpus should exercise both buckets in 4 steps"
    assert result["train/compiled_shapes"] == result["train/buckets_used"]


def test_exported_folder_loads_in_pytorch_with_equal_logits(finished_run, cv_dir):
    from transformers import Wav2Vec2ForCTC, Wav2Vec2Processor

    from xlsr_jax.data import load_audio
    from xlsr_jax.model import load_pretrained

    _, run, _ = finished_run
    processor = Wav2Vec2Processor.from_pretrained(run / "hf_model")
    reference = Wav2Vec2ForCTC.from_pretrained(run / "hf_model").eval()
    audio = load_audio(f"{cv_dir}/clips/common_voice_tr_1.mp3")
    inputs = processor(audio, sampling_rate=16000, return_tensors="np")
    with torch.no_grad():
        expected = reference(torch.from_numpy(inputs["input_values"])).logits.numpy()
    model, params = load_pretrained(run / "hf_model")
    logits = np.asarray(model.apply({"params": params}, inputs["input_values"], deterministic=True))
    assert np.abs(logits - expected).max() <= 1e-4
    assert processor.tokenizer.pad_token_id == reference.config.pad_token_id == reference.config.vocab_size - 1


def test_resume_continues_exactly(finished_run, cv_dir, tmp_path):
    config, run, _ = finished_run
    resumed = tmp_path / "run"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "4")
    shutil.rmtree(resumed / "hf_model")
    train(tiny_run_config(cv_dir, tmp_path, max_steps=4, eval_steps=2, save_steps=2))
    steps = [r["step"] for r in _records(resumed) if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 3, 4], "the second run must start after the step-2 checkpoint"
    first = load_file(str(run / "hf_model" / "model.safetensors"))
    second = load_file(str(resumed / "hf_model" / "model.safetensors"))
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(second[key], first[key], err_msg=key)


def test_sigterm_saves_a_checkpoint_and_stops(cv_dir, tmp_path):
    import os
    import signal
    import threading
    import time

    config = tiny_run_config(cv_dir, tmp_path, max_steps=10_000, eval_steps=10_000, save_steps=10_000)
    run = tmp_path / "run"

    def preempt():  # as a TPU VM's maintenance event would, once training is under way
        while not (run / "metrics.jsonl").exists() or len(_records(run)) < 2:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=preempt, daemon=True).start()
    train(config)
    logged = [r["step"] for r in _records(run) if "train/loss" in r]
    saved = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert 2 <= logged[-1] < 10_000
    assert saved == [logged[-1]], "the checkpoint must hold the last step that ran"
    assert not (run / "hf_model").exists(), "a preempted run is not finished: nothing is exported"
