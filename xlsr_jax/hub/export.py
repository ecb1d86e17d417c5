"""The converter: Flax parameters (any checkpoint of a run, or a finished run's state) -> the Hugging
Face PyTorch folder that `Wav2Vec2ForCTC`, `Wav2Vec2Processor` and
`pipeline("automatic-speech-recognition", model=DIR)` load, with the text normalisation, the
evaluation results and a model card. With torch installed the folder checks itself: the PyTorch model
and the Flax model run on the same clips and must agree.

A folder is written under a temporary name and moved into place only when complete (and checked),
so a failed export never leaves a half-written model where a good one was. Into an existing folder, an
export writes only the names in `EXPORT_FILES`: a folder it wrote before (it holds `xlsr_jax.json`) gets
the new export's files and loses the earlier export's that the new one does not write; any other
non-empty folder is refused unless forced, and then only the export's own names are replaced. Nothing
else in the folder (a git clone's `.git`, a user's notes) is ever touched.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from transformers import Wav2Vec2Config

from xlsr_jax import parallel
from xlsr_jax.data.audio import SAMPLING_RATE
from xlsr_jax.errors import UserError
from xlsr_jax.hub.verify import reference_clips, verify_folder
from xlsr_jax.model import flax_to_pytorch, save_pytorch_weights
from xlsr_jax.model.hf_config import feature_extractor
from xlsr_jax.model.layout import unstack_layers
from xlsr_jax.rundir import CURVES_FILE, EXPORT_FILES, EXPORT_INFO, RunDir, read_eval_results
from xlsr_jax.text import NORMALIZATION_FILE, PAD, UNK, WORD_DELIMITER, TextNormalization, Vocab

logger = logging.getLogger(__name__)


def processor_for(vocab: Vocab, config: Wav2Vec2Config, directory: Path):
    """transformers' Wav2Vec2Processor for our vocabulary (vocab.json is written into `directory`)."""
    from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2Processor

    vocab.save(directory / "vocab.json")
    # No <s>/</s>: the tokenizer would append ids the model never emits, making len(tokenizer) differ
    # from the head's size.
    tokenizer = Wav2Vec2CTCTokenizer(str(directory / "vocab.json"), unk_token=UNK, pad_token=PAD,
                                     word_delimiter_token=WORD_DELIMITER, bos_token=None, eos_token=None)
    return Wav2Vec2Processor(feature_extractor=feature_extractor(config, SAMPLING_RATE), tokenizer=tokenizer)


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


def _check_target(out_dir: Path, force: bool) -> bool:
    """Whether `out_dir` is an earlier export (holds EXPORT_INFO); a UserError for a non-empty folder that
    is not one, unless `force`."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a folder")
    ours = (out_dir / EXPORT_INFO).is_file()
    if not ours and not force and out_dir.is_dir() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir}: not empty, and not a folder xlsr-jax exported to (no {EXPORT_INFO}): choose a "
                        "new or empty folder, or add --force to write the export's files into it (only those "
                        "names are replaced; nothing else there is touched)")
    return ours


def _install(tmp: Path, out_dir: Path, ours: bool) -> None:
    """Move the finished, checked export `tmp` to `out_dir`: in one rename where `out_dir` is new, empty
    or an earlier export holding nothing else; else name by name, only EXPORT_FILES (an earlier export's
    names that this one does not write go where the folder is ours), leaving the rest as it is."""
    others = sorted(p.name for p in out_dir.iterdir() if p.name not in EXPORT_FILES) if out_dir.exists() else []
    if not others and (ours or not out_dir.exists() or not any(out_dir.iterdir())):
        _swap(tmp, out_dir)
        return
    for name in EXPORT_FILES:
        new, old = tmp / name, out_dir / name
        if new.exists():
            _swap(new, old)
        elif ours and (old.exists() or old.is_symlink()):
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    if others:
        logger.info("%s: kept what export does not write: %s", out_dir, ", ".join(others))


def _swap(new: Path, target: Path) -> None:
    """`new` renamed to `target`, replacing what was there (a folder moved aside first, then deleted)."""
    if target.is_dir() and not target.is_symlink():
        old = target.with_name(f"{target.name}.old-{os.getpid()}")
        target.rename(old)
        new.rename(target)
        shutil.rmtree(old)
    else:
        os.replace(new, target)  # a symlink at `target` is replaced itself, never written through


def card_results(results: list[dict], step: int | None, averaged: Sequence[int] = ()) -> list[dict]:
    """What a card reports of a run's eval_results.json: the exported weights' results (`step`'s, or those
    of the mean of the `averaged` checkpoints), the newest per data spec and decoder kind (greedy / LM), and
    only those on test splits when there are any (the benchmark; dev scores used to tune LM weights stay in
    the run's file)."""
    newest: dict[tuple, dict] = {}
    for r in results:
        if r.get("step") == step and list(r.get("averaged", [])) == list(averaged):
            newest[(r["data"], r["decoder"]["type"])] = r
    chosen = list(newest.values())
    tests = [r for r in chosen if "test" in r["dataset"]["split"].split("+")]
    return tests or chosen


def finish_folder(tmp: Path, out_dir: Path, *, run: RunDir | None, config, step: int | None,
                  normalization: TextNormalization, has_lm: bool, averaged: Sequence[int] = ()) -> list[dict]:
    """Curves, evaluation results of `step` (of the mean of `averaged`) and the model card into `tmp`;
    returns those results."""
    from xlsr_jax.hub.card import write_model_card
    from xlsr_jax.plots import plot_training_curves

    results = card_results(read_eval_results(run.eval_results), step, averaged) if run else []
    if results:
        (tmp / "eval_results.json").write_text(json.dumps({"results": results}, indent=1, ensure_ascii=False) + "\n")
    curves = plot_training_curves(run.metrics, tmp / CURVES_FILE) if run else None
    write_model_card(tmp, config=config, language=normalization.language, step=step, results=results,
                     curves_png=CURVES_FILE if curves else None, has_lm=has_lm, normalization=vars(normalization),
                     model_name=out_dir.name, averaged=averaged)
    return results


def export_params(params: Any, config: Wav2Vec2Config, vocab: Vocab, out_dir: str | Path, *,
                  normalization: TextNormalization, run: RunDir | None, run_config=None, step: int | None,
                  torch_bin: bool = False, lm: dict | None = None, verify: bool | None = None,
                  clips: list[np.ndarray] | None = None, info: dict | None = None,
                  force: bool = False, averaged: Sequence[int] = ()) -> dict[str, Any]:
    """Write, card and (with torch) check a complete folder; move it to `out_dir` when it passed.
    `params`: host arrays, per-layer or stacked.

    `verify` None checks when torch is importable; True requires torch. `lm`: {"path", "alpha", "beta"}.
    `force`: write into a non-empty folder that is no earlier export (see the module docstring).
    Returns {"out_dir", "results", "check"} (check: the verify report or None).
    """
    out_dir = Path(out_dir)
    ours = _check_target(out_dir, force)
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
                                has_lm=lm is not None, averaged=averaged)
        check = None
        if verify or (verify is None and _torch_available()):
            check = verify_folder(tmp, config, params, vocab, clips if clips is not None else
                                  reference_clips(run_config), lm=decoder)
        _install(tmp, out_dir, ours)
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
               average: int = 1, torch_bin: bool = False, lm: dict | None = None, verify: bool | None = None,
               force: bool = False) -> dict[str, Any]:
    """`xlsr-jax export`: one kept checkpoint of a run (newest, `step`, or the best by eval metric)
    -> a complete, checked Hugging Face folder. Works whatever mesh saved it (restored onto one device)."""
    from xlsr_jax.infer.load import load_run

    if not RunDir(run_dir).is_run():
        raise UserError(f"{run_dir}: not a training run directory (no config.yaml and checkpoints/)")
    loaded = load_run(run_dir, step=step, best=best, average=average)
    selected = "best" if best else "step" if step is not None else "latest"
    if loaded.averaged:
        selected = f"mean of the {len(loaded.averaged)} {'best' if best else 'newest'} checkpoints"
    out = export_params(parallel.host_params(loaded.params), loaded.model.config, loaded.vocab, out_dir,
                        normalization=loaded.normalization, run=loaded.run, run_config=loaded.config,
                        step=loaded.step, torch_bin=torch_bin, lm=lm, verify=verify, force=force,
                        averaged=loaded.averaged,
                        info={"run": str(Path(run_dir).absolute()), "selected": selected,
                              **({"averaged": list(loaded.averaged)} if loaded.averaged else {})})
    return {**out, "step": loaded.step, "selected": selected}
