"""`export`: any kept checkpoint of a run -> a Hugging Face folder whose weights are the checkpoint's,
bit for bit, that checks itself against PyTorch; also from an FSDP-sharded checkpoint of a run stopped
by SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from _exports import transformers_lm_problem
from _runs import tiny_run_config
from xlsr_jax.checkpoint import Checkpointer
from xlsr_jax.errors import UserError
from xlsr_jax.hub import export as export_module
from xlsr_jax.hub.export import export_run
from xlsr_jax.hub.verify import ExportCheckError
from xlsr_jax.config import load_config
from xlsr_jax.model import FlaxWav2Vec2ForCTC, flax_to_pytorch
from xlsr_jax.rundir import EXPORT_INFO
from xlsr_jax.recipe import train
from transformers import Wav2Vec2Config

SEEN_BY_TRANSFORMERS = ("config.json", "model.safetensors", "preprocessor_config.json", "processor_config.json",
                        "vocab.json", "tokenizer_config.json", "special_tokens_map.json")


def _checkpoint_params(run, step):
    """The parameters of `step`'s checkpoint, restored independently of the exporter."""
    config = Wav2Vec2Config.from_json_file(str(run / "model_config.json"))
    scanned = load_config(run / "config.yaml").model.scan_layers  # the layout the run trained (and saved) in
    abstract = FlaxWav2Vec2ForCTC(config, scan_layers=scanned).abstract_params()
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), abstract)
    return jax.device_get(Checkpointer(run / "checkpoints", read_only=True).restore_params(abstract, step))


def _assert_weights_are_the_checkpoints(folder, run, step):
    exported = load_file(str(folder / "model.safetensors"))
    expected = flax_to_pytorch(_checkpoint_params(run, step))
    assert sorted(exported) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_export_a_given_step_bit_for_bit(trained_run, tmp_path):
    _, run = trained_run
    out = export_run(run, tmp_path / "step3", step=3, torch_bin=True)
    folder = tmp_path / "step3"
    assert out["step"] == 3 and json.loads((folder / EXPORT_INFO).read_text())["step"] == 3
    for name in SEEN_BY_TRANSFORMERS + ("text_normalization.json", "README.md", "pytorch_model.bin"):
        assert (folder / name).is_file(), name
    _assert_weights_are_the_checkpoints(folder, run, 3)
    assert not (np.asarray(load_file(str(folder / "model.safetensors"))["lm_head.weight"]) ==
                flax_to_pytorch(_checkpoint_params(run, 6))["lm_head.weight"]).all(), "step 3 is not step 6"
    binary = torch.load(folder / "pytorch_model.bin", weights_only=True)
    safetensors = load_file(str(folder / "model.safetensors"))
    assert all(np.array_equal(binary[k].numpy(), v) for k, v in safetensors.items())
    assert out["check"]["transcripts_identical"] and out["check"]["max_abs_diff"] < 1e-4
    assert not list(tmp_path.glob("*.partial-*")), "no temporary folder left behind"


def test_export_the_mean_of_the_newest_checkpoints_with_its_own_results(trained_run, tmp_path):
    """--average 2: the weights are the mean of steps 3 and 6, the card says so and reports the results of
    that mean (evaluate --average 2), not step 6's."""
    import shutil

    from xlsr_jax.infer.evaluate import evaluate

    _, trained = trained_run
    run = tmp_path / "run"
    shutil.copytree(trained, run)  # evaluate writes eval_results.json into the run
    config = load_config(run / "config.yaml")
    scored = evaluate(str(run), [config.data.eval[0]], average=2)
    assert (scored["step"], scored["averaged"]) == (6, [3, 6])
    out = export_run(run, tmp_path / "mean", average=2, verify=True)
    folder = tmp_path / "mean"
    assert (out["step"], out["selected"]) == (6, "mean of the 2 newest checkpoints")
    assert json.loads((folder / EXPORT_INFO).read_text())["averaged"] == [3, 6]
    expected = flax_to_pytorch(jax.tree.map(lambda a, b: (a + b) / 2, _checkpoint_params(run, 3),
                                            _checkpoint_params(run, 6)))
    exported = load_file(str(folder / "model.safetensors"))
    for key, value in expected.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    (result,) = json.loads((folder / "eval_results.json").read_text())["results"]
    assert (result["averaged"], result["wer"]) == ([3, 6], scored["wer"])
    assert "mean of the checkpoints of steps 3, 6" in (folder / "README.md").read_text()
    assert out["check"]["transcripts_identical"]


def test_a_failed_self_check_leaves_nothing(trained_run, tmp_path, monkeypatch):
    _, run = trained_run
    real = export_module.save_pytorch_weights

    def corrupt(params, config, out_dir):  # a converter bug: the head written transposed-and-scaled
        params = jax.tree.map(np.array, params)
        params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 1.5
        return real(params, config, out_dir)

    monkeypatch.setattr(export_module, "save_pytorch_weights", corrupt)
    with pytest.raises(ExportCheckError, match="disagrees with the Flax checkpoint"):
        export_run(run, tmp_path / "bad")
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_a_folder_that_is_not_a_model(trained_run, tmp_path):
    _, run = trained_run
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(UserError, match="notes: not empty, and not a folder xlsr-jax exported to"):
        export_run(run, tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"
    with pytest.raises(UserError, match="not a training run"):
        export_run(tmp_path / "notes", tmp_path / "x")


@pytest.mark.slow  # trains
def test_export_from_an_fsdp_checkpoint_of_a_run_stopped_by_sigterm(cv_dir, tmp_path):
    # Bounded: a lost signal ends the run at step 200, finished and exported, and the test fails.
    config = tiny_run_config(cv_dir, tmp_path, mesh={"fsdp": 4}, max_steps=200, eval_steps=10_000,
                             save_steps=10_000)
    run = tmp_path / "run"

    def preempt():  # as a TPU VM's maintenance event would, once training is under way
        while not (run / "metrics.jsonl").exists() or len((run / "metrics.jsonl").read_text().splitlines()) < 2:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=preempt, daemon=True).start()
    train(config)
    assert not (run / "hf_model").exists()
    (step,) = [int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()]
    kernel = run / "checkpoints" / str(step) / "default" / "_sharding"
    assert "fsdp" in kernel.read_text(), "the checkpoint was written FSDP-sharded"
    out = export_run(run, tmp_path / "export")
    assert out["step"] == step and out["check"]["transcripts_identical"]
    _assert_weights_are_the_checkpoints(tmp_path / "export", run, step)


@pytest.fixture(scope="module")
def lm_export(forced_run, cv_dir, tmp_path_factory):
    """A run exported with an n-gram LM (alpha 0.7, beta 0.2), checked: (export folder, export_run's result).
    The forced run's peaked logits keep the self-check's beam searches short (trained_run's nearly flat
    ones took pyctcdecode 18 s a clip on 2 busy cores)."""
    from xlsr_jax.infer.build_lm import build_lm

    _, run = forced_run
    root = tmp_path_factory.mktemp("lm_export")
    build_lm([f"cv:{cv_dir}:train"], root / "lm.arpa", run=str(run))
    out = export_run(run, root / "export", lm={"path": str(root / "lm.arpa"), "alpha": 0.7, "beta": 0.2})
    return root / "export", out


def test_export_carries_an_lm_that_pyctcdecode_reads(lm_export):
    from pyctcdecode import BeamSearchDecoderCTC

    from xlsr_jax.hub.push import check_export

    folder, out = lm_export
    # The self-check decoded its clips' PyTorch logits through the folder's LM, as the card shows users.
    assert out["check"]["clips"] == len(out["check"]["lm_transcripts"]) == 3
    assert all(user == ours for user, ours in out["check"]["lm_transcripts"])
    language_model = BeamSearchDecoderCTC.load_from_dir(str(folder), unigram_encoding="utf-8")._language_model
    assert (language_model.alpha, language_model.beta) == (0.7, 0.2)
    assert "istanbulda" in language_model._unigram_set
    assert check_export(folder) == []


@pytest.mark.skipif(bool(transformers_lm_problem()), reason=str(transformers_lm_problem()))
def test_export_lm_loads_in_transformers_processor_with_lm(lm_export):
    from transformers import Wav2Vec2ProcessorWithLM

    processor = Wav2Vec2ProcessorWithLM.from_pretrained(lm_export[0])
    assert (processor.language_model.alpha, processor.language_model.beta) == (0.7, 0.2)
    assert "istanbulda" in processor.language_model._unigram_set


def test_the_card_reports_the_newest_test_results_of_the_exported_step():
    from xlsr_jax.hub.export import card_results

    def result(split, step, wer, decoder="greedy"):
        return {"data": f"cv:/cv/tr:{split}", "dataset": {"split": split}, "step": step, "wer": wer,
                "decoder": {"type": decoder}}

    results = [result("test", 600, 0.9), result("dev", 600, 0.7, "lm"), result("test", 400, 0.95),
               result("test", 600, 0.88), result("test", 600, 0.67, "lm")]
    assert card_results(results, 600) == [result("test", 600, 0.88), result("test", 600, 0.67, "lm")]
    assert card_results(results[1:3], 600) == [result("dev", 600, 0.7, "lm")]  # no test result: dev it is
    assert card_results(results, 200) == []
    averaged = {**result("test", 600, 0.8), "averaged": [400, 600]}
    assert card_results(results + [averaged], 600, averaged=[400, 600]) == [averaged]
    assert averaged not in card_results(results + [averaged], 600)  # step 600's own weights are not the mean


def _tiny_export(out_dir, **kw):
    """export_params of a tiny random model (no run, no check): the folder handling alone."""
    from _models import quiet_config
    from xlsr_jax.config import Config
    from xlsr_jax.hub.export import export_params
    from xlsr_jax.text import TextNormalization, Vocab

    vocab = Vocab.build(["merhaba dünya"])
    config = quiet_config(vocab_size=len(vocab), pad_token_id=vocab.pad_id)
    params = FlaxWav2Vec2ForCTC(config).init_params(jax.random.key(0))
    return export_params(jax.device_get(params), config, vocab, out_dir, normalization=TextNormalization(language="tr"),
                         run=None, run_config=Config(), step=None, verify=False, **kw)


def _user_folder(folder):
    """A user's model folder: an HF config.json, notes, data, a git clone's .git."""
    (folder / ".git").mkdir(parents=True)
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (folder / "config.json").write_text('{"mine": true}')
    (folder / "notes.md").write_text("do not lose me")
    (folder / "data").mkdir()
    (folder / "data" / "x.bin").write_bytes(b"\0\1\2")


def test_export_refuses_a_folder_it_did_not_write_and_keeps_every_byte(tmp_path):
    from test_rundir import _tree

    _user_folder(tmp_path / "mine")
    before = _tree(tmp_path / "mine")
    with pytest.raises(UserError, match=r"mine: not empty, and not a folder xlsr-jax exported to \(no xlsr_jax.json\)"):
        _tiny_export(tmp_path / "mine")
    assert _tree(tmp_path / "mine") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no partial folder left beside it


def test_forced_export_replaces_only_the_names_it_writes(tmp_path):
    from test_rundir import _tree

    _user_folder(tmp_path / "mine")
    before = _tree(tmp_path / "mine")
    _tiny_export(tmp_path / "mine", force=True)
    after = _tree(tmp_path / "mine")
    assert {k: v for k, v in after.items() if k in before and k != "config.json"} == {
        k: v for k, v in before.items() if k != "config.json"}
    assert json.loads(after["config.json"])["model_type"] == "wav2vec2"
    assert {"model.safetensors", "vocab.json", "xlsr_jax.json", "README.md"} <= set(after)


def test_reexport_replaces_an_earlier_export_and_keeps_what_the_user_added(tmp_path):
    from test_rundir import _tree

    _tiny_export(tmp_path / "out", torch_bin=True)
    assert (tmp_path / "out" / "pytorch_model.bin").is_file()
    (tmp_path / "out" / ".git").mkdir()
    (tmp_path / "out" / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (tmp_path / "out" / "notes.md").write_text("mine")
    _tiny_export(tmp_path / "out")  # no --bin this time: the earlier export's .bin is stale
    after = _tree(tmp_path / "out")
    assert after[".git/HEAD"] == b"ref: refs/heads/main\n" and after["notes.md"] == b"mine"
    assert "pytorch_model.bin" not in after and "model.safetensors" in after
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_self_check_runs_every_matmul_and_convolution_at_full_precision():
    """A TPU's default float32 matmul is bfloat16 passes (a GPU's TF32): the check asks for HIGHEST itself, so
    its tolerance holds on any backend."""
    import re

    from _models import tiny_config
    from xlsr_jax.hub.verify import flax_logits

    config = tiny_config()
    params = FlaxWav2Vec2ForCTC(config).abstract_params()
    with jax.default_matmul_precision("default"):  # a TPU's default (conftest sets "highest" for every test)
        text = flax_logits(config).lower(params, jax.ShapeDtypeStruct((1, 4000), np.float32)).as_text()
    ops = [line for line in text.splitlines() if re.search(r"stablehlo\.(dot_general|convolution)", line)]
    assert len(ops) >= 10  # the conv stack, the positional conv, every projection and the head
    assert all(line.count("HIGHEST") == 2 for line in ops), [line for line in ops if "HIGHEST" not in line][:2]
