"""Check an exported model folder, then push it to the Hugging Face Hub.

`check_export` finds what would make the uploaded repo load wrongly or not at all, each problem
naming its file. Only the files an export writes go up, named one by one in the commit: a folder may
hold other things (`.env`, notes, a git clone's `.git`) that must never leave the machine. The token is
huggingface_hub's business: passed through to `HfApi`, or found by it (HF_TOKEN, the login cache); this
module never prints, logs or writes it.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
from pathlib import Path

from xlsr_jax.errors import UserError
from xlsr_jax.hub.card import NOT_EVALUATED, README
from xlsr_jax.rundir import EXPORT_FILES, LM_DIR
from xlsr_jax.text import PAD

log = logging.getLogger(__name__)

REQUIRED_FILES = ("config.json", "preprocessor_config.json", "vocab.json", "tokenizer_config.json",
                  "special_tokens_map.json", README)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HEAD = "lm_head.weight"  # PyTorch layout [vocab, hidden]
# The files push sends: what an export writes (rundir.EXPORT_FILES); of LM_DIR, its files (pyctcdecode's
# layout is flat: attrs.json, unigrams.txt, the kenlm model).
UPLOAD_FILES = tuple(name for name in EXPORT_FILES if name != LM_DIR)


def check_export(folder: str | Path) -> list[str]:
    """Every problem found in an export folder, as 'FILE: what is wrong'; empty when it is fine."""
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder}: not a folder"]
    problems = [f"{name}: missing" for name in REQUIRED_FILES if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        problems.append(f"{' or '.join(WEIGHT_FILES)}: missing (no model weights)")
    config = _read_json(folder / "config.json", problems)
    vocab = _read_json(folder / "vocab.json", problems)
    if config is not None and vocab is not None:
        problems += _check_sizes(folder, config, vocab)
    if (folder / "preprocessor_config.json").is_file() and vocab is not None:
        problems += _check_processor(folder, config)
    if (folder / README).is_file():
        problems += _check_card(folder / README)
    if (folder / LM_DIR).is_dir() and not (folder / "alphabet.json").is_file():
        problems.append("alphabet.json: missing, but language_model/ exists (pyctcdecode's "
                        "load_from_dir needs both)")
    return problems


def _read_json(path: Path, problems: list[str]) -> dict | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        problems.append(f"{path.name}: not valid JSON ({err})")
        return None
    if not isinstance(value, dict):
        problems.append(f"{path.name}: expected a JSON object, got {type(value).__name__}")
        return None
    return value


def _check_sizes(folder: Path, config: dict, vocab: dict) -> list[str]:
    """config.json's vocab_size against vocab.json and the CTC head; pad_token_id against [PAD]."""
    problems = []
    size = config.get("vocab_size")
    if size != len(vocab):
        problems.append(f"config.json: vocab_size is {size} but vocab.json has {len(vocab)} entries")
    head_rows, weights = head_size(folder)
    if head_rows is not None and head_rows != size:
        problems.append(f"{weights}: {HEAD} has {head_rows} rows (vocab entries) but config.json "
                        f"vocab_size is {size}")
    elif head_rows is None and weights is not None:
        problems.append(f"{weights}: no {HEAD} (not a Wav2Vec2ForCTC checkpoint)")
    if PAD not in vocab:
        problems.append(f"vocab.json: no {PAD} token (the CTC blank)")
    elif config.get("pad_token_id") != vocab[PAD]:
        problems.append(f"config.json: pad_token_id is {config.get('pad_token_id')} but vocab.json has "
                        f"{PAD} = {vocab[PAD]}")
    return problems


def head_size(folder: str | Path) -> tuple[int | None, str | None]:
    """(rows of lm_head.weight, the weights file read); (None, file) without a head; (None, None)
    when there is no weights file to read."""
    folder = Path(folder)
    safetensors_path = folder / "model.safetensors"
    if safetensors_path.is_file():
        from safetensors import safe_open

        # Reads the header only: no tensor is loaded.
        with safe_open(str(safetensors_path), framework="numpy") as f:
            if HEAD not in f.keys():
                return None, safetensors_path.name
            return int(f.get_slice(HEAD).get_shape()[0]), safetensors_path.name
    bin_path = folder / "pytorch_model.bin"
    if bin_path.is_file():
        from xlsr_jax.model.torch_bin import load_torch_state_dict  # no torch needed, no code run

        state = load_torch_state_dict(bin_path)
        return (int(state[HEAD].shape[0]) if HEAD in state else None), bin_path.name
    return None, None


def _check_processor(folder: Path, config: dict | None) -> list[str]:
    from transformers import Wav2Vec2Processor

    try:
        processor = Wav2Vec2Processor.from_pretrained(str(folder))
    except Exception as err:  # any failure here is what a user of the repo would hit
        message = str(err) if len(str(err)) <= 300 else str(err)[:300] + "…"
        return [f"processor files: Wav2Vec2Processor.from_pretrained({str(folder)!r}) fails "
                f"({type(err).__name__}: {message})"]
    size = (config or {}).get("vocab_size")
    if size is not None and len(processor.tokenizer) != size:
        # Added tokens (e.g. <s>, </s>) would be ids the CTC head never emits.
        return [f"tokenizer_config.json: the tokenizer has {len(processor.tokenizer)} tokens but "
                f"config.json vocab_size is {size}"]
    return []


def _check_card(path: Path) -> list[str]:
    from huggingface_hub import ModelCard

    try:
        card = ModelCard.load(path)
    except Exception as err:  # a malformed YAML header, a bad model-index
        return [f"{path.name}: cannot be parsed as a model card ({type(err).__name__}: {err})"]
    wers = [r for r in card.data.eval_results or [] if r.metric_type == "wer"]
    if not wers and NOT_EVALUATED not in card.text:
        return [f"{path.name}: no model-index WER and no '{NOT_EVALUATED}' statement"]
    return []


@dataclasses.dataclass(frozen=True)
class Upload:
    """What a push sends, 'path (size)', and what it leaves in the folder, 'path (why)'; both sorted."""

    files: list[str]
    left_out: list[str]


def plan_upload(folder: str | Path) -> tuple[list[tuple[str, int]], list[str], list[str]]:
    """(relative path, bytes) of the files a push sends; 'path (why)' of everything else in `folder`; and
    the problems: export files that are symlinks.

    Only UPLOAD_FILES and LM_DIR's files go, never a dotfile, never a symlink. Symlinks are not followed at
    all, not even those resolving inside the folder: export writes none, the Hub stores none (the
    target's bytes would go up under the link's name), and the one rule that cannot send a file from
    outside the folder is to send only regular files found there.
    """
    folder = Path(folder)
    sent: list[tuple[str, int]] = []
    left_out: list[str] = []
    problems: list[str] = []

    def visit(path: Path, rel: str, wanted: bool) -> None:
        is_dir = path.is_dir() and not path.is_symlink()
        if path.name.startswith("."):
            left_out.append(f"{rel}{'/' if is_dir else ''} (hidden)")
        elif path.is_symlink():
            left_out.append(f"{rel} (symlink to {os.readlink(path)}; push follows no symlinks)")
            if wanted:
                problems.append(f"{rel}: a symlink (to {os.readlink(path)}); push follows no symlinks, so put "
                                "the file itself in the folder")
        elif not wanted or not path.is_file():
            left_out.append(f"{rel}{'/' if is_dir else ''} (not a file export writes)")
        else:
            sent.append((rel, path.stat().st_size))

    for path in sorted(folder.iterdir()):
        if path.name == LM_DIR and path.is_dir() and not path.is_symlink():
            for inner in sorted(path.iterdir()):
                visit(inner, f"{LM_DIR}/{inner.name}", wanted=not inner.is_dir() or inner.is_symlink())
        else:
            # A symlink named language_model counts as wanted: the push stops and says why.
            visit(path, path.name, wanted=path.name in UPLOAD_FILES or (path.name == LM_DIR and path.is_symlink()))
    return sent, left_out, problems


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    dry_run: bool = False,
    token: str | None = None,
    commit_message: str = "Upload wav2vec2 CTC model exported by xlsr-jax",
) -> Upload:
    """Check `folder`, then create `repo_id` (if needed) and upload the export's files as one commit.

    Returns the files sent and those left out (see `plan_upload`); with `dry_run`, the files that would
    be sent, and nothing else happens. Raises UserError listing every problem found, or naming `repo_id`
    when the Hub cannot be reached.
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    folder = Path(folder)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise UserError(f"{repo_id!r}: not a valid Hub repo id ({err})") from None
    problems = check_export(folder)
    sent, left_out, symlinked = plan_upload(folder) if folder.is_dir() else ([], [], [])
    if problems or symlinked:
        raise UserError(f"{folder}: not ready to push:\n" + "\n".join(f"  - {p}" for p in problems + symlinked))
    upload = Upload([f"{rel} ({_human_size(size)})" for rel, size in sent], left_out)
    left = f"; left out: {', '.join(left_out)}" if left_out else ""
    if dry_run:
        log.info("dry run: %s is complete; %d files would go to %s%s", folder, len(sent), repo_id, left)
        return upload
    # The commit names each file: nothing else in the folder can go up (upload_folder would walk it,
    # following symlinks, and send whatever matched its patterns).
    operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(folder / rel)) for rel, _ in sent]
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        repo_id = getattr(url, "repo_id", None) or repo_id  # 'name' alone becomes 'user/name'
        info = api.create_commit(repo_id=repo_id, operations=operations, commit_message=commit_message,
                                 repo_type="model")
    except _network_errors() as err:
        raise UserError(f"{repo_id}: could not reach the Hugging Face Hub, nothing was committed "
                        f"({type(err).__name__}: {err})") from None
    log.info("uploaded %d files from %s to %s (%s)%s", len(sent), folder, repo_id,
             getattr(info, "commit_url", None) or "no commit url", left)
    return upload


def _network_errors() -> tuple[type[BaseException], ...]:
    """What huggingface_hub raises when the Hub cannot be reached: its HTTP client's transport errors
    (httpx2 in huggingface_hub 2.x, httpx in 1.x: DNS, refused connection, timeout, proxy, dropped
    connection; hf_api reads these as "cannot reach" itself), and ConnectionError / TimeoutError, of
    which OfflineModeIsEnabled (HF_HUB_OFFLINE=1) is one."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for client in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(client).TransportError)
        except ImportError:
            continue
    return tuple(errors)


def _human_size(size: int) -> str:
    if size < 1000:
        return f"{size} B"
    value = float(size)
    for unit in ("kB", "MB", "GB"):
        value /= 1000
        if value < 1000:
            break
    return f"{value:.1f} {unit}"
