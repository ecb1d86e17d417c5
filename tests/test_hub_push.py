"""Export checks and pushing to the Hub (HfApi replaced by a recorder: no network)."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import socket

import huggingface_hub
import pytest

from _exports import add_lm, make_export, run_config
from xlsr_jax.cli import main
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

    def create_commit(self, *, operations, **kwargs):
        # What would go up: (path in the repo, the local file read).
        sent = [(op.path_in_repo, op.path_or_fileobj) for op in operations]
        RecordingApi.calls.append(("create_commit", {"operations": sent, **kwargs}))
        return None


@pytest.fixture
def recorder(monkeypatch):
    RecordingApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    return RecordingApi.calls


# What make_export + a card hold: all of it goes up.
NAMES = ["README.md", "config.json", "model.safetensors", "preprocessor_config.json", "processor_config.json",
         "special_tokens_map.json", "text_normalization.json", "tokenizer_config.json", "vocab.json"]


def test_good_export_passes_and_dry_run_lists_files(export, recorder):
    assert check_export(export) == []

    upload = push_folder(export, "me/xlsr-tr", dry_run=True)

    assert [line.split(" (")[0] for line in upload.files] == NAMES
    vocab_bytes = (export / "vocab.json").stat().st_size
    assert vocab_bytes < 1000 and f"vocab.json ({vocab_bytes} B)" in upload.files
    weights_kb = (export / "model.safetensors").stat().st_size / 1000
    assert f"model.safetensors ({weights_kb:.1f} kB)" in upload.files
    assert upload.left_out == []
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

    upload = push_folder(export, "me/xlsr-tr", private=True, token=TOKEN, commit_message="step 40")

    assert recorder == [
        ("init", {"token": TOKEN}),
        ("create_repo", {"repo_id": "me/xlsr-tr", "private": True, "exist_ok": True, "repo_type": "model"}),
        ("create_commit", {"operations": [(name, str(export / name)) for name in NAMES], "repo_id": "me/xlsr-tr",
                           "commit_message": "step 40", "repo_type": "model"}),
    ]
    assert len(upload.files) == 9 and upload.left_out == []
    assert "uploaded 9 files" in caplog.text  # it does log; the token is not in what it logs
    out, err = capsys.readouterr()
    assert TOKEN not in caplog.text + out + err


def test_bad_repo_id_fails_before_anything_else(export, recorder):
    with pytest.raises(UserError, match="'me/xlsr tr': not a valid Hub repo id"):
        push_folder(export, "me/xlsr tr")
    assert recorder == []


def test_only_the_export_files_go_up(export, recorder, tmp_path, caplog, capsys):
    add_lm(export)
    (export / ".env").write_text(f"HF_TOKEN={TOKEN}\n")
    (export / "notes").mkdir()
    (export / "notes" / "todo.txt").write_text("ask for the dataset licence\n")
    (export / "draft_card.md").write_text("# not the card\n")
    (export / "language_model" / ".DS_Store").write_bytes(b"\0")
    (export / "language_model" / "old").mkdir()
    secret = tmp_path / "outside" / "id_rsa"
    secret.parent.mkdir()
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    (export / "key.txt").symlink_to(secret)  # a link to a file outside the folder
    (export / "config-copy.json").symlink_to("config.json")  # and one inside it
    lm_files = ["alphabet.json", "language_model/attrs.json", "language_model/model.arpa",
                "language_model/unigrams.txt"]
    left_out = [".env (hidden)",
                "config-copy.json (symlink to config.json; push follows no symlinks)",
                "draft_card.md (not a file export writes)",
                f"key.txt (symlink to {secret}; push follows no symlinks)",
                "language_model/.DS_Store (hidden)",
                "language_model/old/ (not a file export writes)",
                "notes/ (not a file export writes)"]
    caplog.set_level(logging.INFO)

    upload = push_folder(export, "me/xlsr-tr")

    sent = sorted(NAMES + lm_files)
    assert [line.split(" (")[0] for line in upload.files] == sent
    assert upload.left_out == left_out
    (commit,) = [kwargs for call, kwargs in recorder if call == "create_commit"]
    assert commit["operations"] == [(name, str(export / name)) for name in sent]
    assert "left out: " + ", ".join(left_out) in caplog.text

    assert main(["push", str(export), "--repo-id", "me/xlsr-tr", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"would upload {len(sent)} files to https://huggingface.co/me/xlsr-tr:" in out
    assert out.endswith("left out 7 (only the files export writes go up):\n"
                        + "".join(f"  {line}\n" for line in left_out))


def test_an_export_file_that_is_a_symlink_stops_the_push(export, recorder, tmp_path):
    shutil.move(export / "vocab.json", tmp_path / "vocab.json")
    (export / "vocab.json").symlink_to(tmp_path / "vocab.json")
    assert check_export(export) == []  # the link's target is a fine vocab...

    with pytest.raises(UserError, match=r"vocab.json: a symlink \(to .+\); push follows no symlinks"):
        push_folder(export, "me/xlsr-tr")  # ...but it would not go up
    assert recorder == []


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_network_is_a_user_error_naming_the_repo(export, monkeypatch):
    # The real HfApi against a port nobody listens on: the connection error huggingface_hub raises.
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")

    with pytest.raises(UserError, match=r"^me/xlsr-tr: could not reach the Hugging Face Hub, nothing was "
                                        r"committed \(ConnectError: .*refused.*\)$"):
        push_folder(export, "me/xlsr-tr", token=TOKEN)


@pytest.mark.parametrize("failing", ["create_repo", "create_commit"])
def test_offline_mode_and_timeouts_are_user_errors(export, recorder, monkeypatch, failing):
    from huggingface_hub.errors import OfflineModeIsEnabled

    transport = importlib.import_module("httpx2" if importlib.util.find_spec("httpx2") else "httpx")
    error = {"create_repo": OfflineModeIsEnabled("offline mode is enabled"),
             "create_commit": transport.ReadTimeout("The read operation timed out")}[failing]

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(RecordingApi, failing, fail)
    with pytest.raises(UserError, match=f"^me/xlsr-tr: could not reach the Hugging Face Hub, nothing was "
                                        f"committed \\({type(error).__name__}: {error}\\)$"):
        push_folder(export, "me/xlsr-tr")
