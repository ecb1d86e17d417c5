"""The converter: Flax parameters (any checkpoint of a run, or a finished run's state) -> the Hugging
Face PyTorch folder that `Wav2Vec2ForCTC`, `Wav2Vec2Processor` and
`pipeline("automatic-speech-recognition", model=DIR)` load, with the text normalisation, the
evaluation results and a model card. With torch installed the folder checks itself: the PyTorch model
and the Flax model run on the same clips and must agree.

A folder is written under a temporary name and renamed into place only when complete (and checked),
so a failed export never leaves a half-written model where a good one was.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from transformers import Wav2Vec2Config

from xlsr_jax.errors import UserError
from xlsr_jax.hub.verify import reference_clips, verify_folder
from xlsr_jax.model import flax_to_pytorch, save_pytorch_weights
from xlsr_jax.model.layout import unstack_layers
from xlsr_jax.rundir import CURVES_FILE, EXPORT_INFO, RunDir, read_eval_results
from xlsr_jax.text import NORMALIZATION_FILE, PAD, UNK, WORD_DELIMITER, TextNormalization, Vocab

logger = logging.getLogger(__name__)


def host_params(params: Any) -> Any:
    """Device params -> numpy on this host, also when FSDP shards them across processes (then every
    process must call this: it is a collective)."""
    leaves = jax.tree.leaves(params)
    if all(getattr(x, "is_fully_addressable", True) for x in leaves):
        return jax.device_get(params)
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(params, tiled=True))


def processor_for(vocab: Vocab, config: Wav2Vec2Config, directory: Path):
    """transformers' Wav2Vec2Processor for our vocabulary (vocab.json is written into `directory`)."""
    from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2Processor

    vocab.save(directory / "vocab.json")
    # No <s>/</s>: the tokenizer would append ids the model never emits, making len(tokenizer) differ
    # from the head's size.
    tokenizer = Wav2Vec2CTCTokenizer(str(directory / "vocab.json"), unk_token=UNK, pad_token=PAD,
                                     word_delimiter_token=WORD_DELIMITER, bos_token=None, eos_token=None)
    # Layer-norm (XLSR / large) models are trained with padding masks; group-norm base models are not.
    extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                                         return_attention_mask=config.feat_extract_norm == "layer")
    return Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer)


def write_hf_folder(params: Any, config: Wav2Vec2Config, vocab: Vocab, out_dir: str | Path, *,
                    normalization: TextNormalization | None = None, torch_bin: bool = False) -> Path:
    """config.json, model.safetensors (+ pytorch_model.bin), the processor's files and
    text_normalization.json, into `out_dir` (created). `params` are host (numpy) arrays."""
    out_dir = Path(out_dir)
    save_pytorch_weights(params, config, out_dir)
    if torch_bin:
        _save_torch_bin(params, out_dir)
    processor = processor_for(vocab, config, out_dir)
    processor.save_pretrained(out_dir)  # tokenizer_config.json, vocab.json, processor_config.json
    processor.feature_extractor.save_pretrained(out_dir)  # preprocessor_config.json (5.x folds it otherwise)
    # transformers 5 no longer writes special_tokens_map.json; 4.x readers (and the Hub's widget) use it.
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps({"unk_token": UNK, "pad_token": PAD}, indent=2) + "\n", encoding="utf-8")
    (normalization or TextNormalization()).save(out_dir / NORMALIZATION_FILE)
    return out_dir


def _save_torch_bin(params: Any, out_dir: Path) -> None:
    try:
        import torch
    except ImportError as err:
        raise UserError("--bin writes pytorch_model.bin with torch: pip install 'xlsr-jax[torch]'") from err
    state = flax_to_pytorch(params)
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, out_dir / "pytorch_model.bin")


def _replace_folder(tmp: Path, out_dir: Path) -> None:
    """Move the finished `tmp` to `out_dir`, replacing an earlier export there."""
    if out_dir.exists():
        old = out_dir.with_name(f"{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old)
    else:
        tmp.rename(out_dir)


def _check_target(out_dir: Path) -> None:
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "config.json").exists():
        raise UserError(f"{out_dir}: exists and is not a model folder; choose an empty or new folder")


def card_results(results: list[dict], step: int | None) -> list[dict]:
    """What a card reports of a run's eval_results.json: the exported step's results, the newest per
    data spec and decoder kind (greedy / LM), and only those on test splits when there are any (the
    benchmark; dev scores used to tune LM weights stay in the run's file)."""
    newest: dict[tuple, dict] = {}
    for r in results:
        if r.get("step") == step:
            newest[(r["data"], r["decoder"]["type"])] = r
    chosen = list(newest.values())
    tests = [r for r in chosen if "test" in r["dataset"]["split"].split("+")]
    return tests or chosen


def finish_folder(tmp: Path, out_dir: Path, *, run: RunDir | None, config, step: int | None,
                  normalization: TextNormalization, has_lm: bool) -> list[dict]:
    """Curves, evaluation results of `step` and the model card into `tmp`; returns those results."""
    from xlsr_jax.hub.card import write_model_card
    from xlsr_jax.plots import plot_training_curves

    results = card_results(read_eval_results(run.eval_results), step) if run else []
    if results:
        (tmp / "eval_results.json").write_text(json.dumps({"results": results}, indent=1, ensure_ascii=False) + "\n")
    curves = plot_training_curves(run.metrics, tmp / CURVES_FILE) if run else None
    write_model_card(tmp, config=config, language=normalization.language, step=step, results=results,
                     curves_png=CURVES_FILE if curves else None, has_lm=has_lm, normalization=vars(normalization),
                     model_name=out_dir.name)
    return results


def export_params(params: Any, config: Wav2Vec2Config, vocab: Vocab, out_dir: str | Path, *,
                  normalization: TextNormalization, run: RunDir | None, run_config=None, step: int | None,
                  torch_bin: bool = False, lm: dict | None = None, verify: bool | None = None,
                  clips: list[np.ndarray] | None = None, info: dict | None = None) -> dict[str, Any]:
    """Write, card and (with torch) check a complete folder; move it to `out_dir` when it passed.
    `params`: host arrays, per-layer or stacked.

    `verify` None checks when torch is importable; True requires torch. `lm`: {"path", "alpha", "beta"}.
    Returns {"out_dir", "results", "check"} (check: the verify report or None).
    """
    out_dir = Path(out_dir)
    _check_target(out_dir)
    params = unstack_layers(params)  # a scanned run's stacked layers -> Hugging Face's per-layer names
    tmp = out_dir.with_name(f"{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_hf_folder(params, config, vocab, tmp, normalization=normalization, torch_bin=torch_bin)
        (tmp / EXPORT_INFO).write_text(json.dumps({"step": step, **(info or {})}, indent=1) + "\n")
        decoder = None
        if lm is not None:
            from xlsr_jax.infer.lm import LMDecoder

            decoder = LMDecoder.from_path(lm["path"], vocab, alpha=lm["alpha"], beta=lm["beta"])
            decoder.save_for_processor(tmp)
        results = finish_folder(tmp, out_dir, run=run, config=run_config, step=step, normalization=normalization,
                                has_lm=lm is not None)
        check = None
        if verify or (verify is None and _torch_available()):
            check = verify_folder(tmp, config, params, vocab, clips if clips is not None else
                                  reference_clips(run_config), lm=decoder)
        _replace_folder(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"out_dir": str(out_dir), "results": results, "check": check}


def _torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def export_run(run_dir: str | Path, out_dir: str | Path, *, step: int | None = None, best: bool = False,
               torch_bin: bool = False, lm: dict | None = None, verify: bool | None = None) -> dict[str, Any]:
    """`xlsr-jax export`: one kept checkpoint of a run (newest, `step`, or the best by eval metric)
    -> a complete, checked Hugging Face folder. Works whatever mesh saved it (restored onto one device)."""
    from xlsr_jax.infer.source import load_run

    if not RunDir(run_dir).is_run():
        raise UserError(f"{run_dir}: not a training run directory (no config.yaml and checkpoints/)")
    loaded = load_run(run_dir, step=step, best=best)
    selected = "best" if best else "step" if step is not None else "latest"
    out = export_params(host_params(loaded.params), loaded.model.config, loaded.vocab, out_dir,
                        normalization=loaded.normalization, run=loaded.run, run_config=loaded.config,
                        step=loaded.step, torch_bin=torch_bin, lm=lm, verify=verify,
                        info={"run": str(Path(run_dir).absolute()), "selected": selected})
    return {**out, "step": loaded.step, "selected": selected}
