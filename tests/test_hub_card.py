"""Model card: Hub metadata that huggingface_hub parses back, and a body whose code runs."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from huggingface_hub import ModelCard

from _exports import FORCED, TR_TEST, add_lm, make_export, run_config
from xlsr_jax.hub.card import NOT_EVALUATED, write_model_card


def result(wer, cer, *, decoder=None, headline="wer", dataset=TR_TEST):
    return {"data": "cv:/data/cv-corpus-23.0-2025-09-05/tr:test", "dataset": dict(dataset), "step": 600,
            "wer": wer, "cer": cer, "num_utterances": 70, "language": "tr", "headline": headline,
            "decoder": decoder or {"type": "greedy"}, "date": "2026-11-27T12:00:00+00:00"}


def test_card_with_results_round_trips_through_the_hub_parser(tmp_path):
    lm_decoder = {"type": "lm", "lm": "lm.arpa", "alpha": 0.5, "beta": 1.0, "beam_width": 100}
    results = [result(0.312345, 0.0917), result(0.2456, 0.0801, decoder=lm_decoder)]
    normalization = {"language": "tr", "lowercase": False, "chars_to_ignore": ",.\u00ad`"}

    path = write_model_card(tmp_path, config=run_config(), language="tr", step=600, results=results,
                            curves_png="training_curves.png", has_lm=True, repo_id="me/xlsr-tr",
                            normalization=normalization)

    assert path == tmp_path / "README.md"
    card = ModelCard.load(path)
    data = card.data
    assert data.language == "tr"
    assert data.license == "apache-2.0"
    assert data.tags == ["audio", "automatic-speech-recognition", "speech", "xlsr-fine-tuning-week",
                         "xlsr-jax"]
    assert data.datasets == ["common_voice", "manifest:/data/extra.tsv"]
    assert data.metrics == ["wer", "cer"]
    assert data.base_model == "facebook/wav2vec2-large-xlsr-53"
    assert data.model_name == "me/xlsr-tr"
    got = [(r.metric_type, r.metric_name, r.metric_value) for r in data.eval_results]
    assert got == [
        ("wer", "Test WER", round(100 * 0.312345, 2)), ("cer", "Test CER", round(100 * 0.0917, 2)),
        ("wer", "Test WER (n-gram LM)", 24.56), ("cer", "Test CER (n-gram LM)", 8.01),
    ]
    assert got[0][2] == 31.23
    first = data.eval_results[0]
    assert (first.task_type, first.dataset_type, first.dataset_name, first.dataset_config,
            first.dataset_split) == ("automatic-speech-recognition", "common_voice", "Common Voice 23.0 (tr)",
                                     "tr", "test")

    body = card.text
    assert NOT_EVALUATED not in body
    assert "| Common Voice 23.0 (tr) | test | greedy | 31.23 | 9.17 | 70 |" in body
    assert ("| Common Voice 23.0 (tr) | test | n-gram LM (alpha=0.5, beta=1.0, beam_width=100) "
            "| 24.56 | 8.01 | 70 |") in body
    assert "![training curves](training_curves.png)" in body
    assert "BeamSearchDecoderCTC.load_from_dir(folder" in body
    assert "xlsr-jax evaluate me/xlsr-tr --data cv:PATH/TO/cv-corpus/tr:test" in body
    # The normalisation shown is the folder's, not the config's.
    assert "lowercase: False" in body and repr(",.\u00ad`") in body
    assert "- `cv:/data/cv-corpus-23.0-2025-09-05/tr:train+dev`" in body
    assert "tr:test`" not in body  # the eval split is never listed as training data
    for row in ("| learning rate | 0.0003 |", "| steps trained | 600 |", "| per-device batch size | 16 |",
                "| layerdrop | 0.1 |", "| mask_time_prob | 0.05 |", "| freeze_feature_encoder | True |"):
        assert row in body


def test_card_without_results_says_so_and_has_no_model_index(tmp_path):
    folder = tmp_path / "wav2vec2-tiny-tr"
    folder.mkdir()
    config = run_config(pretrained=None, architecture={"hidden_size": 32})

    path = write_model_card(folder, config=config, language=None, step=40, results=[])

    text = path.read_text(encoding="utf-8")
    assert "model-index" not in text
    card = ModelCard.load(path)
    assert card.data.eval_results is None
    assert card.data.language == "tr"  # from config.data.language
    assert card.data.base_model is None
    assert f"{NOT_EVALUATED}: this card reports no WER or CER." in card.text
    assert "xlsr-jax evaluate PATH/TO/THIS/FOLDER --data cv:PATH/TO/cv-corpus/tr:test" in card.text
    assert "| WER (%)" not in card.text and "training curves" not in card.text
    assert "# wav2vec2-tiny-tr" in card.text  # the folder names the model without a repo id
    assert "trained from scratch" in card.text


def test_character_language_puts_cer_first(tmp_path):
    zh = {"type": "common_voice", "name": "Common Voice 23.0 (zh-CN)", "config": "zh-CN", "split": "test"}
    path = write_model_card(tmp_path, config=run_config(), language="zh-CN", step=10,
                            results=[result(0.9, 0.25, headline="cer", dataset=zh)], repo_id="me/zh")

    got = [(r.metric_type, r.metric_value) for r in ModelCard.load(path).data.eval_results]
    assert got == [("cer", 25.0), ("wer", 90.0)]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    greedy = make_export(root / "greedy")
    return {"greedy": greedy, "lm": add_lm(shutil.copytree(greedy, root / "lm"))}


def _python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


@pytest.mark.slow  # a subprocess
@pytest.mark.parametrize("kind", ["greedy", "lm"])
def test_usage_snippets_run_against_an_exported_folder(kind, exports, tmp_path):
    """The card's Python blocks, run in order as one script in a fresh interpreter (as a reader would,
    and without JAX: pyctcdecode forks), with the repo id pointed at a local export."""
    import soundfile as sf

    folder = shutil.copytree(exports[kind], tmp_path / "model")
    path = write_model_card(folder, config=run_config(), language="tr", step=600, results=[],
                            has_lm=kind == "lm", repo_id="me/xlsr-tr")
    blocks = _python_blocks(path.read_text(encoding="utf-8"))
    assert len(blocks) == (3 if kind == "lm" else 2)
    script = "\n".join(blocks + ["print(tuple(logits.shape))\n"])
    assert 'model_id = "me/xlsr-tr"' in script
    script = script.replace('model_id = "me/xlsr-tr"', f"model_id = {str(folder)!r}")
    (tmp_path / "usage.py").write_text(script, encoding="utf-8")
    sf.write(tmp_path / "audio.wav", 0.1 * np.sin(np.linspace(0, 2000, 16_000)).astype(np.float32), 16_000)

    run = subprocess.run([sys.executable, "usage.py"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)

    assert run.returncode == 0, run.stderr[-3000:]
    printed = run.stdout.splitlines()
    assert printed[0] == str([FORCED])  # processor.batch_decode(argmax ids)
    assert printed[1] == FORCED  # the pipeline's text
    if kind == "lm":
        assert printed[2] == str([FORCED])  # pyctcdecode's beam search over the folder's LM
    # 16000 samples through convs (kernel, stride) (10, 5), (3, 2), (3, 2): 3199, 1599, 799 frames.
    assert printed[-1] == "(1, 799, 16)"
    assert len(printed) == (4 if kind == "lm" else 3)
