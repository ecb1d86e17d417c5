"""`xlsr-jax pretrain` end to end on the tiny Common Voice folder over 4 fake devices: the losses fall, the
collapse guard stops a run (checkpoint kept), a stopped run resumes bit for bit, hf_model/ is a folder
PyTorch's Wav2Vec2ForPreTraining loads with equal losses and that `xlsr-jax train` fine-tunes from."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import traverse_util
from transformers import Wav2Vec2Config

from _models import padded_batch
from _runs import TINY_ARCH, tiny_pretrain_config, tiny_run_config
from xlsr_jax.checkpoint import Checkpointer, abstract_with_shardings
from xlsr_jax.config import ConfigError, from_dict, save_config
from xlsr_jax.model import (FlaxWav2Vec2ForPreTraining, feat_extract_output_lengths, load_pretrained,
                            sample_mask_time_indices, sample_negative_indices)
from xlsr_jax.model.layout import unstack_layers
from xlsr_jax.pretrain.objective import pretrain

def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(cv_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    config = tiny_pretrain_config(cv_dir, out)
    return config, out / "run", pretrain(config)


@pytest.mark.slow  # trains
def test_contrastive_loss_falls_while_the_codebook_stays_in_use(finished):
    _, run, result = finished
    records = _records(run)
    trained = [r for r in records if "pretrain/loss" in r]
    evaluated = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in trained] == list(range(1, 9)) and [r["step"] for r in evaluated] == [4, 8]
    contrastive = [r["pretrain/contrastive_loss"] for r in trained]
    assert np.mean(contrastive[-3:]) < np.mean(contrastive[:3]) - 0.1, contrastive
    assert evaluated[-1]["eval/contrastive_loss"] < evaluated[0]["eval/contrastive_loss"], evaluated
    assert all(r["pretrain/codevector_perplexity"] > 1.5 for r in trained), trained
    assert all(r["eval/codevector_perplexity"] > 1.5 for r in evaluated), evaluated
    assert all(0.2 < r["pretrain/masked_share"] < 0.9 and 0 < r["pretrain/grad_norm"] for r in trained)
    temperatures = [r["pretrain/gumbel_temperature"] for r in trained]
    assert temperatures[0] == pytest.approx(2.0) and temperatures == sorted(temperatures, reverse=True)
    assert result["eval/loss"] == evaluated[-1]["eval/loss"]
    assert (run / "training_curves.png").stat().st_size > 0 and any((run / "tensorboard").iterdir())
    assert not (run / "vocab.json").exists()


@pytest.mark.slow  # trains (finished)
def test_the_folder_loads_in_pytorch_with_equal_losses(finished):
    import torch
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2ForPreTraining

    _, run, _ = finished
    reference = Wav2Vec2ForPreTraining.from_pretrained(run / "hf_model").eval()
    assert reference.config.architectures == ["Wav2Vec2ForPreTraining"]
    assert Wav2Vec2FeatureExtractor.from_pretrained(run / "hf_model").return_attention_mask
    # The run's own model and last checkpoint, not the folder read back: the folder must hold what was trained.
    model = FlaxWav2Vec2ForPreTraining(Wav2Vec2Config.from_json_file(str(run / "model_config.json")), scan_layers=True)
    abstract, device = model.abstract_params(), jax.sharding.SingleDeviceSharding(jax.devices()[0])
    checkpoints = Checkpointer(run / "checkpoints", read_only=True)
    params = checkpoints.restore_params(abstract_with_shardings(abstract, jax.tree.map(lambda _: device, abstract)), 8)
    checkpoints.close()
    x, attention_mask = padded_batch([16000, 11000], 16000)
    frames = int(feat_extract_output_lengths(model.config, 16000))
    frame_mask = model.frame_mask(attention_mask, frames)
    mask_key, negatives_key = jax.random.split(jax.random.key(0))
    mask = np.asarray(sample_mask_time_indices(mask_key, frame_mask, model.config) & frame_mask)
    negatives = np.asarray(sample_negative_indices(negatives_key, mask, model.config.num_negatives))
    ours = jax.jit(model.apply)({"params": params}, x, mask, negatives, attention_mask=attention_mask)
    with torch.no_grad():
        theirs = reference(torch.from_numpy(x), attention_mask=torch.from_numpy(attention_mask),
                           mask_time_indices=torch.from_numpy(np.array(mask)),
                           sampled_negative_indices=torch.from_numpy(np.array(negatives)).long())
    for name in ("loss", "contrastive_loss", "diversity_loss", "codevector_perplexity"):
        np.testing.assert_allclose(float(getattr(ours, name)), float(getattr(theirs, name)), rtol=1e-4, err_msg=name)


class _Started(Exception):
    pass


@pytest.mark.slow  # trains (finished), compiles a fine-tuning run
def test_finetuning_from_the_folder_starts_with_its_encoder_and_a_fresh_head(finished, cv_dir, tmp_path):
    from xlsr_jax.recipe import train
    from xlsr_jax.train.loop import _Loop

    _, run, _ = finished
    config = tiny_run_config(cv_dir, tmp_path, max_steps=2)
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, pretrained=str(run / "hf_model")))
    started = {}

    def first_state(self, state, *args, **kwargs):
        started["params"] = jax.device_get(state.params)
        raise _Started

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_Loop, "run", first_state)
        with pytest.raises(_Started):
            train(config)
    _, pretrained = load_pretrained(run / "hf_model", head="pretraining")
    encoder = traverse_util.flatten_dict(unstack_layers(started["params"])["wav2vec2"])
    expected = traverse_util.flatten_dict(unstack_layers(pretrained)["wav2vec2"])
    assert encoder.keys() == expected.keys() and ("masked_spec_embed",) in encoder
    for path, value in expected.items():
        np.testing.assert_array_equal(encoder[path], value, err_msg="/".join(path))
    head = started["params"]["lm_head"]
    vocab = json.loads((tmp_path / "run" / "vocab.json").read_text())
    assert head["kernel"].shape == (TINY_ARCH["hidden_size"], len(vocab)) and not head["bias"].any()
    assert 0.01 < float(np.std(head["kernel"])) < 0.03  # N(0, initializer_range=0.02): new, not loaded


# ---------------------------------------------------------------- a collapsed run, stopped and resumed


@pytest.fixture(scope="module")
def collapsed(cv_dir, tmp_path_factory):
    """`xlsr-jax pretrain` with a guard no quantizer of 2 x 8 codes passes (1000 codes per group): it stops
    after 3 logged steps. Returns (config, exit status, stderr)."""
    import contextlib
    import io

    from xlsr_jax.cli import main

    out = tmp_path_factory.mktemp("collapsed")
    config = tiny_pretrain_config(cv_dir, out, pretrain={"collapse_perplexity": 1000.0, "collapse_patience": 3})
    save_config(config, out / "config.yaml")
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        status = main(["pretrain", "--config", str(out / "config.yaml")])
    return config, status, stderr.getvalue()


@pytest.mark.slow  # trains
def test_a_collapsed_quantizer_stops_the_run_and_keeps_its_checkpoint(collapsed):
    config, status, stderr = collapsed
    run = config.train.output_dir
    assert status == 2, stderr
    assert "xlsr-jax pretrain: error: the quantizer collapsed" in stderr
    assert "at 3 logged steps in a row, up to step 3" in stderr and "pretrain.diversity_loss_weight" in stderr
    from pathlib import Path

    run = Path(run)
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [3]
    assert [r["step"] for r in _records(run) if "pretrain/loss" in r] == [1, 2, 3]
    assert not (run / "hf_model").exists() and not (run / "finished.json").exists()


@pytest.mark.slow  # trains
def test_a_stopped_run_resumes_to_the_weights_of_an_uninterrupted_one(collapsed, finished, caplog):
    import logging
    from pathlib import Path

    from safetensors.numpy import load_file

    config, _, _ = collapsed
    caplog.set_level(logging.INFO)
    resumed = dataclasses.replace(config, pretrain=dataclasses.replace(config.pretrain, collapse_perplexity=0.0))
    pretrain(resumed)
    run = Path(config.train.output_dir)
    assert f"restoring checkpoint {(run / 'checkpoints').absolute()}/3" in caplog.text
    assert [r["step"] for r in _records(run) if "pretrain/loss" in r] == list(range(1, 9))
    first = load_file(str(finished[1] / "hf_model" / "model.safetensors"))
    second = load_file(str(run / "hf_model" / "model.safetensors"))
    assert first.keys() == second.keys() and "quantizer.codevectors" in first
    for key in first:
        np.testing.assert_array_equal(second[key], first[key], err_msg=key)


# ---------------------------------------------------------------- refusals before any work


@pytest.mark.parametrize("override, key", [
    ({"checkpoint": {"best_metric": "eval/wer"}}, "checkpoint.best_metric"),
    ({"model": {"freeze_transformer_steps": 5}}, "model.freeze_transformer_steps"),
    ({"train": {"init_from": "runs/x"}}, "train.init_from"),
    ({"data": {"streaming": True}, "train": {"max_steps": 4}}, "data.streaming"),
])
def test_keys_pretraining_cannot_honour_are_refused_by_name(tmp_path, override, key):
    # A source that does not exist: a key let through fails on the data instead, not by training.
    tree = {"model": {"pretrained": None, "architecture": TINY_ARCH},
            "data": {"train": [f"cv:{tmp_path}/missing:train"]}, "checkpoint": {"best_metric": None},
            "train": {"output_dir": str(tmp_path / "run")}}
    for section, values in override.items():
        tree[section] = {**tree.get(section, {}), **values}
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        pretrain(from_dict(tree))
    assert not (tmp_path / "run").exists()
