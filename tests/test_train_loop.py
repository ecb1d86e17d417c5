"""End to end: `train(config)` on a tiny Common Voice folder over 4 fake devices: logs, evaluation,
checkpoints, exact resume, one compilation per bucket, a Hugging Face folder that PyTorch loads."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from _compiles import compile_events
from _resumed import assert_resumed, tag_records
from _runs import TWO_BUCKETS, tiny_run_config
from xlsr_jax.config import load_config
from xlsr_jax.recipe import train
from xlsr_jax.train.loop import _Loop, _Progress


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def loop_record():
    """What the steady-state loop of `finished_run` started with, and the compilations during it."""
    return {}


@contextlib.contextmanager
def _recording_loop(record: dict):
    """Records the executables `_Loop.run` is handed, the shapes the loaders announce, and every JAX
    compilation event while it runs."""
    original = _Loop.run

    def run(self, *args, **kwargs):
        record["compiled"] = {"train": set(self.step_fn.executables), "eval": set(self.eval_fn.executables)}
        record["announced"] = {"train": set(self.data.train.batch_shapes.values()),
                               "eval": set(self.data.eval.batch_shapes.values())}
        with compile_events() as events:
            try:
                return original(self, *args, **kwargs)
            finally:
                record["events"] = list(events)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_Loop, "run", run)
        yield


@pytest.fixture(scope="module")
def finished_run(cv_dir, tmp_path_factory, loop_record):
    out = tmp_path_factory.mktemp("loop")
    config = tiny_run_config(cv_dir, out, data=TWO_BUCKETS, max_steps=4, eval_steps=2, save_steps=2)
    with _recording_loop(loop_record):
        result = train(config)
    return config, out / "run", result


@pytest.mark.slow  # trains (finished_run)
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


@pytest.mark.slow  # trains (finished_run)
def test_every_shape_compiled_before_the_first_step_and_nothing_during_the_run(finished_run, loop_record):
    _, _, result = finished_run
    assert loop_record["compiled"] == loop_record["announced"], "every train and eval bucket shape, ahead of time"
    assert len(loop_record["announced"]["train"]) == len(loop_record["announced"]["eval"]) == 2
    assert result["train/buckets_used"] == result["train/compiled_shapes"] == 2, \
        "the tiny corpus exercises both buckets in 4 steps"
    # Orbax compiles its own slicing ops when it saves a checkpoint; nothing else may trace or compile.
    assert [e for e in loop_record["events"] if not e.via("orbax")] == [], "4 steps, 2 evaluations, 2 checkpoints"


class _Bar:
    def __init__(self):
        self.n = 0

    def update(self, n):
        self.n += n

    def set_postfix(self, **_):
        pass


class _Step:
    """A dispatched step's output: never ready by itself; waiting for it is logged."""

    def __init__(self, k, waited, ready=False):
        self.k, self.waited, self.ready = k, waited, ready

    def is_ready(self):
        return self.ready

    def block_until_ready(self):
        if not self.ready:
            self.waited.append(self.k)
        return self


def test_dispatch_stays_at_most_two_steps_ahead_without_waiting_every_step():
    bar, waited = _Bar(), []
    progress = _Progress(bar, in_flight=2)
    steps = {k: _Step(k, waited) for k in range(1, 8)}
    for k in range(1, 6):
        progress.dispatched(steps[k])
    assert waited == [1, 2, 3], "after step k is dispatched, the host waits only for step k - 2"
    assert bar.n == 3 and len(progress.pending) == 2
    steps[4].ready = steps[5].ready = True  # the device finished them: counted without waiting
    progress.dispatched(steps[6])
    assert waited == [1, 2, 3] and bar.n == 5 and len(progress.pending) == 1
    progress.dispatched(steps[7])
    progress.finished(7)  # the metrics of step 7 were read: every step has run
    assert waited == [1, 2, 3] and bar.n == 7 and not progress.pending


@pytest.mark.slow  # trains (finished_run)
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


@pytest.mark.slow  # trains
def test_resume_continues_exactly(finished_run, cv_dir, tmp_path, caplog):
    config, run, _ = finished_run
    resumed = tmp_path / "run"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "4")
    shutil.rmtree(resumed / "hf_model")
    tagged = tag_records(resumed)
    caplog.set_level(logging.INFO)
    train(tiny_run_config(cv_dir, tmp_path, data=TWO_BUCKETS, max_steps=4, eval_steps=2, save_steps=2))
    assert assert_resumed(resumed, 2, tagged, caplog.text) == [3, 4, 4], "steps 3-4 trained again, 4 evaluated"
    steps = [r["step"] for r in _records(resumed) if "train/loss" in r]
    assert steps == [1, 2, 3, 4], "resumed after the step-2 checkpoint, the first run's steps 3-4 replaced"
    first = load_file(str(run / "hf_model" / "model.safetensors"))
    second = load_file(str(resumed / "hf_model" / "model.safetensors"))
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(second[key], first[key], err_msg=key)


@pytest.mark.slow  # trains
def test_sigterm_saves_a_checkpoint_and_stops_without_evaluating(cv_dir, tmp_path):
    """Evaluating every step: the step a SIGTERM stops at is saved but not evaluated (a preempted machine's
    grace period is for the checkpoint). Bounded: a lost signal ends the run at step 60 and fails."""
    import os
    import signal
    import threading
    import time

    config = tiny_run_config(cv_dir, tmp_path, max_steps=60, eval_steps=1, save_steps=10_000)
    config = dataclasses.replace(config, checkpoint=dataclasses.replace(config.checkpoint, best_metric=None))
    run = tmp_path / "run"

    def preempt():  # as a TPU VM's maintenance event would, once training is under way
        deadline = time.monotonic() + 120
        while (not (run / "metrics.jsonl").exists() or len(_records(run)) < 3) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    signaller = threading.Thread(target=preempt, daemon=True)
    signaller.start()
    train(config)
    signaller.join(timeout=10)
    logged = [r["step"] for r in _records(run) if "train/loss" in r]
    evaluated = [r["step"] for r in _records(run) if "eval/wer" in r]
    saved = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert 2 <= logged[-1] < 60, "the signal stopped the run"
    assert saved == [logged[-1]], "the checkpoint must hold the last step that ran"
    assert evaluated == list(range(1, logged[-1])), "every step but the one the signal stopped at is evaluated"
    assert not (run / "hf_model").exists(), "a preempted run is not finished: nothing is exported"


@pytest.mark.slow  # trains
def test_token_budget_trains_each_bucket_with_its_own_batch_size(cv_maker, tmp_path, caplog):
    """train.per_device_audio_seconds=1.4 over 4 devices x 2 accumulation steps: the 0.68 s bucket
    gets 2 clips per device (a batch of 16), the 1.26 s bucket 1 (a batch of 8); both shapes train."""
    rows = [("train", f"short_{k}", f"spk_{k % 3}", 0.6 + 0.005 * k, "bir iki") for k in range(16)]
    rows += [("train", f"long_{k}", "spk_l", 1.2 + 0.02 * k, "üç dört beş altı") for k in range(4)]
    cv = cv_maker(tmp_path / "tr", rows=rows)
    config = tiny_run_config(cv, tmp_path, data=TWO_BUCKETS, max_steps=2, eval_steps=100, save_steps=100,
                             per_device_audio_seconds=1.4)
    config = dataclasses.replace(
        config, data=dataclasses.replace(config.data, train=(f"cv:{cv}:train",), eval=()),
        optim=dataclasses.replace(config.optim, gradient_accumulation_steps=2))
    caplog.set_level(logging.INFO, logger="xlsr_jax.train.loop")
    result = train(config)
    assert "20 utterances, 2 batches of [16, 8] (by bucket) per epoch" in caplog.text
    assert result["train/buckets_used"] == result["train/compiled_shapes"] == 2
    losses = [r["train/loss"] for r in _records(tmp_path / "run") if "train/loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))


@pytest.mark.slow  # trains a 2-layer model of XLS-R 2B's width
def test_xls_r_2b_width_trains_with_its_state_sharded_over_four_devices(cv_dir, tmp_path):
    """Two updates of a model as wide as XLS-R 2B (1920, 2 of its 48 layers) with mesh.fsdp=4 on the tests' 4 CPU
    devices, bfloat16 compute and remat, as a slice would run it: the loss is finite and the weights moved."""
    from _models import family_config
    from xlsr_jax.config import from_dict, to_dict
    from xlsr_jax.infer.load import load_run

    arch = family_config("xls-r-2b", layers=2).to_dict()
    tree = to_dict(tiny_run_config(cv_dir, tmp_path, mesh={"fsdp": 4}, max_steps=2, eval_steps=10_000,
                                   save_steps=1, precision="bfloat16"))
    tree["model"].update(remat_policy="full", scan_layers=True, freeze_feature_encoder=True,
                         architecture={key: arch[key] for key in tree["model"]["architecture"]})
    tree["checkpoint"] = {"save_total_limit": 2}
    train(from_dict(tree))
    run = tmp_path / "run"
    losses = [r["train/loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if "train/loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
    first, second = load_run(run, step=1), load_run(run, step=2)
    assert first.model.config.hidden_size == 1920
    moved = {jax.tree_util.keystr(path): not np.array_equal(a, b) for (path, a), b in
             zip(jax.tree_util.tree_leaves_with_path(first.params), jax.tree.leaves(second.params))}
    frozen = {k for k in moved if "feature_extractor" in k}
    assert frozen and not any(moved[k] for k in frozen)  # the conv feature encoder is frozen
    # (masked_spec_embed only trains where SpecAugment masked a frame; one step may not)
    assert all(moved[k] for k in moved.keys() - frozen if "masked_spec_embed" not in k), moved
