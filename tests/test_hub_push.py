"""Export checks and pushing to the Hub (HfApi replaced by a recorder: no network)."""

from __future__ import annotations

import json
import logging
import shutil

import huggingface_hub
import pytest

from _exports import add_lm, make_export, run_config
from xlsr_jax.errors import UserError
from xlsr_jax.hub.card import write_model_card
from xlsr_jax.hub.push import check_export, push_folder

TOKEN = "hf_NotARealTokenButSecret123"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folder = make_export(tmp_path_factory.mktemp("push") / "model")
    write_model_card(folder, config=run_config(), language="tr", step=40, results=[])
    return folder


@pytest.fixture
def export(built, tmp_path):
    """A fresh copy of a good export folder (card included) to break."""
    return shutil.copytree(built, tmp_path / "model")


def _edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text(encoding="utf-8")), **changes}), encoding="utf-8")


class RecordingApi:
    """Stands in for huggingface_hub.HfApi; records every call."""

    calls: list = []

    def __init__(self, token=None):
        RecordingApi.calls.append(("init", {"token": token}))

    def create_repo(self, repo_id, **kwargs):
        RecordingApi.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, **kwargs):
        RecordingApi.calls.append(("upload_folder", kwargs))
        return None


@pytest.fixture
def recorder(monkeypatch):
    RecordingApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    return RecordingApi.calls


def test_good_export_passes_and_dry_run_lists_files(export, recorder):
    assert check_export(export) == []

    listing = push_folder(export, "me/xlsr-tr", dry_run=True)

    names = ["README.md", "config.json", "model.safetensors", "preprocessor_config.json", "processor_config.json",
             "special_tokens_map.json", "text_normalization.json", "tokenizer_config.json", "vocab.json"]
    assert [line.split(" (")[0] for line in listing] == names
    vocab_bytes = (export / "vocab.json").stat().st_size
    assert vocab_bytes < 1000 and f"vocab.json ({vocab_bytes} B)" in listing
    weights_kb = (export / "model.safetensors").stat().st_size / 1000
    assert f"model.safetensors ({weights_kb:.1f} kB)" in listing
    assert recorder == []  # a dry run never touches the Hub


def test_missing_vocab_is_named(export):
    (export / "vocab.json").unlink()

    assert "vocab.json: missing" in check_export(export)
    with pytest.raises(UserError, match="vocab.json: missing"):
        push_folder(export, "me/xlsr-tr", dry_run=True)


def test_vocab_size_mismatch_is_named(export):
    _edit_json(export / "config.json", vocab_size=17)

    problems = check_export(export)

    assert "config.json: vocab_size is 17 but vocab.json has 16 entries" in problems
    assert ("model.safetensors: lm_head.weight has 16 rows (vocab entries) but config.json vocab_size "
            "is 17") in problems
    assert "tokenizer_config.json: the tokenizer has 16 tokens but config.json vocab_size is 17" in problems
    with pytest.raises(UserError, match="vocab_size is 17 but vocab.json has 16 entries"):
        push_folder(export, "me/xlsr-tr", dry_run=True)


def test_pad_id_card_processor_and_lm_problems_are_named(export):
    _edit_json(export / "config.json", pad_token_id=0)
    (export / "README.md").write_text("---\nlicense: apache-2.0\n---\n# A card with no results\n")
    broken = {"feature_extractor_type": "NoSuchExtractor"}
    (export / "preprocessor_config.json").write_text(json.dumps(broken))
    _edit_json(export / "processor_config.json", feature_extractor=broken)  # transformers 5 reads this one
    (export / "language_model").mkdir()

    problems = check_export(export)

    assert problems[0] == "config.json: pad_token_id is 0 but vocab.json has [PAD] = 15"
    assert problems[1].startswith(f"processor files: Wav2Vec2Processor.from_pretrained({str(export)!r}) "
                                  "fails (ValueError: Unrecognized feature extractor")
    assert problems[2:] == [
        "README.md: no model-index WER and no 'This model has not been evaluated yet' statement",
        "alphabet.json: missing, but language_model/ exists (pyctcdecode's load_from_dir needs both)",
    ]


def test_export_with_language_model_passes(export):
    add_lm(export)

    assert (export / "alphabet.json").is_file()
    assert check_export(export) == []


def test_push_creates_repo_and_uploads_without_leaking_the_token(export, recorder, caplog, capsys):
    caplog.set_level(logging.DEBUG)

    listing = push_folder(export, "me/xlsr-tr", private=True, token=TOKEN, commit_message="step 40")

    assert recorder == [
        ("init", {"token": TOKEN}),
        ("create_repo", {"repo_id": "me/xlsr-tr", "private": True, "exist_ok": True, "repo_type": "model"}),
        ("upload_folder", {"folder_path": str(export), "repo_id": "me/xlsr-tr", "repo_type": "model",
                           "commit_message": "step 40"}),
    ]
    assert len(listing) == 9
    assert "uploaded 9 files" in caplog.text  # it does log; the token is not in what it logs
    out, err = capsys.readouterr()
    assert TOKEN not in caplog.text + out + err


def test_bad_repo_id_fails_before_anything_else(export, recorder):
    with pytest.raises(UserError, match="'me/xlsr tr': not a valid Hub repo id"):
        push_folder(export, "me/xlsr tr")
    assert recorder == []
