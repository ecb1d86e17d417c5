"""Check an exported model folder, then push it to the Hugging Face Hub.

`check_export` finds what would make the uploaded repo load wrongly or not at all, each problem
naming its file. The token is huggingface_hub's business: passed through to `HfApi`, or found by it
(HF_TOKEN, the login cache); this module never prints, logs or writes it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from xlsr_jax.errors import UserError
from xlsr_jax.hub.card import NOT_EVALUATED, README
from xlsr_jax.text import PAD

log = logging.getLogger(__name__)

REQUIRED_FILES = ("config.json", "preprocessor_config.json", "vocab.json", "tokenizer_config.json",
                  "special_tokens_map.json", README)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HEAD = "lm_head.weight"  # PyTorch layout [vocab, hidden]


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
    if (folder / "language_model").is_dir() and not (folder / "alphabet.json").is_file():
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


def list_files(folder: str | Path) -> list[tuple[str, int]]:
    """(relative path, bytes) of what `upload_folder` would send, sorted by path."""
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    folder = Path(folder)
    paths = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    kept = filter_repo_objects(paths, ignore_patterns=DEFAULT_IGNORE_PATTERNS)
    return sorted((rel, (folder / rel).stat().st_size) for rel in kept)


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    dry_run: bool = False,
    token: str | None = None,
    commit_message: str = "Upload wav2vec2 CTC model exported by xlsr-jax",
) -> list[str]:
    """Check `folder`, then create `repo_id` (if needed) and upload the folder as one commit.

    Returns 'path (size)' lines of the files sent, sorted; with `dry_run`, of the files that would be
    sent, and nothing else happens. Raises UserError listing every problem `check_export` finds.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    folder = Path(folder)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise UserError(f"{repo_id!r}: not a valid Hub repo id ({err})") from None
    problems = check_export(folder)
    if problems:
        raise UserError(f"{folder}: not ready to push:\n" + "\n".join(f"  - {p}" for p in problems))
    listing = [f"{rel} ({_human_size(size)})" for rel, size in list_files(folder)]
    if dry_run:
        log.info("dry run: %s is complete; %d files would go to %s", folder, len(listing), repo_id)
        return listing
    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    repo_id = getattr(url, "repo_id", None) or repo_id  # 'name' alone becomes 'user/name'
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                             commit_message=commit_message)
    log.info("uploaded %d files from %s to %s (%s)", len(listing), folder, repo_id,
             getattr(info, "commit_url", None) or "no commit url")
    return listing


def _human_size(size: int) -> str:
    if size < 1000:
        return f"{size} B"
    value = float(size)
    for unit in ("kB", "MB", "GB"):
        value /= 1000
        if value < 1000:
            break
    return f"{value:.1f} {unit}"
