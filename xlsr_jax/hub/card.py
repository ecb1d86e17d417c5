"""The model card (README.md) of an exported model folder: Hub metadata plus a body that says what
the model is, how well it does (only numbers `xlsr-jax evaluate` measured), how to use it and how it
was trained.

Metadata goes through huggingface_hub's `ModelCardData` / `EvalResult`, so the YAML header and the
model-index are in the Hub's own format.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from xlsr_jax.config import Config

README = "README.md"
# Stated in every card without results; `check_export` looks for it. Never a placeholder number.
NOT_EVALUATED = "This model has not been evaluated yet"
TAGS = ["audio", "automatic-speech-recognition", "speech", "xlsr-fine-tuning-week", "xlsr-jax"]
TASK = "automatic-speech-recognition"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def write_model_card(
    out_dir: str | Path,
    *,
    config: Config,
    language: str | None,
    step: int,
    results: Sequence[Mapping[str, Any]],
    curves_png: str | None = None,
    has_lm: bool = False,
    repo_id: str | None = None,
    normalization: Mapping[str, Any] | None = None,
    model_name: str | None = None,
    averaged: Sequence[int] = (),
) -> Path:
    """Write `out_dir/README.md` and return its path.

    `results`: `eval_results.json` entries for the exported `step` (the caller filters), each with
    `dataset` {type, name, config, split}, `wer`, `cer` (fractions), `num_utterances`, `decoder`.
    `normalization`: the folder's `text_normalization.json` content; default: the config's data fields.
    `curves_png`: a file name inside `out_dir` to embed. `model_name`: the title (default: `repo_id`,
    else the folder's name). `averaged`: the checkpoints whose mean the weights are (empty: `step`'s own).
    """
    out_dir = Path(out_dir)
    model_name = model_name or repo_id or out_dir.resolve().name
    language = language or config.data.language or next((r.get("language") for r in results), None)
    data = ModelCardData(
        language=language,
        license="apache-2.0",
        library_name="transformers",
        pipeline_tag=TASK,
        tags=list(TAGS),
        datasets=train_datasets(config.data.train) or None,
        metrics=["wer", "cer"],
        base_model=config.model.pretrained if is_hub_id(config.model.pretrained) else None,
        model_name=model_name if results else None,
        eval_results=[e for r in results for e in eval_results(r)] or None,
    )
    body = "\n\n".join([
        f"# {model_name}",
        _about(config, language, has_lm),
        _results_section(results),
        _usage(repo_id or "PATH/TO/THIS/FOLDER", has_lm),
        _evaluation(repo_id or "PATH/TO/THIS/FOLDER", language, normalization, config),
        _training(config, step, curves_png, averaged),
    ])
    path = out_dir / README
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n").save(path)
    return path


def is_hub_id(name: str | None) -> bool:
    """'owner/name' that can be a Hub repo (not a local path like ./x/y or /data/m)."""
    return bool(name) and bool(_HUB_ID.match(name)) and not Path(name).expanduser().exists()


def train_datasets(specs: Sequence[str]) -> list[str]:
    """Hub `datasets` metadata from data.train specs: cv:... -> common_voice, others as written."""
    names: list[str] = []
    for spec in specs:
        name = "common_voice" if spec.split(":", 1)[0] == "cv" else spec
        if name not in names:
            names.append(name)
    return names


def eval_results(result: Mapping[str, Any]) -> list[EvalResult]:
    """WER and CER of one evaluation, as percentages rounded to 2 decimals; the headline first."""
    ds = result["dataset"]
    split = ds.get("split")
    suffix = " (n-gram LM)" if _is_lm(result) else ""
    metrics = ["wer", "cer"] if result.get("headline", "wer") == "wer" else ["cer", "wer"]
    return [
        EvalResult(
            task_type=TASK, task_name="Automatic Speech Recognition",
            dataset_type=ds["type"], dataset_name=ds["name"], dataset_config=ds.get("config"),
            dataset_split=split, metric_type=m, metric_value=percent(result[m]),
            metric_name=f"{(split or 'eval').capitalize()} {m.upper()}{suffix}",
        )
        for m in metrics if result.get(m) is not None
    ]


def percent(rate: float) -> float:
    return round(100 * float(rate), 2)


def _is_lm(result: Mapping[str, Any]) -> bool:
    return (result.get("decoder") or {}).get("type") == "lm"


def _decoder_text(result: Mapping[str, Any]) -> str:
    decoder = result.get("decoder") or {"type": "greedy"}
    if decoder.get("type") != "lm":
        return "greedy"
    knobs = [f"{k}={decoder[k]}" for k in ("alpha", "beta", "beam_width") if k in decoder]
    return "n-gram LM" + (f" ({', '.join(knobs)})" if knobs else "")


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|")


def _about(config: Config, language: str | None, has_lm: bool) -> str:
    base = config.model.pretrained
    if base is None:
        origin = "trained from scratch (no pretrained weights)"
    elif is_hub_id(base):
        origin = f"fine-tuned from [{base}](https://huggingface.co/{base})"
    else:
        origin = f"fine-tuned from `{base}`"
    lang = f"`{language}`" if language else "the language of its training data"
    text = (
        f"A [wav2vec 2.0](https://huggingface.co/docs/transformers/model_doc/wav2vec2) model {origin}, "
        f"with a CTC head over characters, for automatic speech recognition in {lang}. It was trained "
        "with xlsr-jax (JAX/Flax) and exported to this PyTorch `Wav2Vec2ForCTC` folder. "
        "Input audio must be sampled at 16 kHz."
    )
    if has_lm:
        text += (" The folder also holds an n-gram language model (`language_model/`, `alphabet.json`) "
                 "for beam-search decoding with [pyctcdecode](https://github.com/kensho-technologies/pyctcdecode).")
    return text


def _results_section(results: Sequence[Mapping[str, Any]]) -> str:
    if not results:
        return (f"## Results\n\n{NOT_EVALUATED}: this card reports no WER or CER. "
                "See *Evaluation* below for how to measure them.")
    rows = ["| Dataset | Split | Decoder | WER (%) | CER (%) | Utterances |",
            "|---|---|---|---:|---:|---:|"]
    for r in results:
        ds = r["dataset"]
        wer = f"{percent(r['wer']):.2f}" if r.get("wer") is not None else "–"
        cer = f"{percent(r['cer']):.2f}" if r.get("cer") is not None else "–"
        rows.append(f"| {_cell(ds['name'])} | {_cell(ds.get('split', ''))} | {_decoder_text(r)} "
                    f"| {wer} | {cer} | {r.get('num_utterances', '')} |")
    return "## Results\n\n" + "\n".join(rows)


def _usage(model_id: str, has_lm: bool) -> str:
    code = f'''```python
import librosa
import torch
from transformers import Wav2Vec2ForCTC, Wav2Vec2Processor

model_id = "{model_id}"
processor = Wav2Vec2Processor.from_pretrained(model_id)
model = Wav2Vec2ForCTC.from_pretrained(model_id).eval()

speech, _ = librosa.load("audio.wav", sr=16_000)  # any file librosa reads, resampled to 16 kHz
inputs = processor(speech, sampling_rate=16_000, return_tensors="pt", padding=True)
with torch.no_grad():
    logits = model(**inputs).logits  # [batch, frames, vocab]
predicted_ids = torch.argmax(logits, dim=-1)
print(processor.batch_decode(predicted_ids))
```'''
    pipe = '''```python
from transformers import pipeline

asr = pipeline("automatic-speech-recognition", model=model_id)
print(asr(speech)["text"])  # or asr("audio.wav") when ffmpeg is installed
```'''
    text = f"## Usage\n\n{code}\n\nOr with a pipeline:\n\n{pipe}"
    if has_lm:
        text += '''

With the n-gram language model, through pyctcdecode (`pip install pyctcdecode kenlm`; transformers'
`Wav2Vec2ProcessorWithLM` reads the same files, but is deprecated and goes in transformers v6):

```python
import os

from huggingface_hub import snapshot_download
from pyctcdecode import BeamSearchDecoderCTC

lm_files = ["alphabet.json", "language_model/*"]
folder = model_id if os.path.isdir(model_id) else snapshot_download(model_id, allow_patterns=lm_files)
decoder = BeamSearchDecoderCTC.load_from_dir(folder, unigram_encoding="utf-8")
print([decoder.decode(frames) for frames in logits.numpy()])  # beam search over each clip's logits
```'''
    return text


def _evaluation(model_id: str, language: str | None, normalization: Mapping[str, Any] | None,
                config: Config) -> str:
    norm = dict(normalization) if normalization is not None else {
        "language": config.data.language, "lowercase": config.data.lowercase,
        "chars_to_ignore": config.data.chars_to_ignore}
    lang_dir = language or "LANG"
    # A field left null (a run without one language) means each utterance's language preset (text.py).
    unicode_form = norm.get("unicode_normalization", "NFC")
    steps = [f"Unicode {unicode_form}" if unicode_form else "Unicode NFC or NFKC by each utterance's language"]
    if norm.get("lowercase", True):
        steps.append("lowercase (Turkish/Azerbaijani dotted and dotless i kept apart)")
    steps.append("the characters below removed")
    apostrophes = norm.get("keep_apostrophes", False)
    if apostrophes is None or apostrophes:
        steps.append("apostrophes between two letters kept" + (" where the language keeps them" if apostrophes is None else ""))
    steps.append("runs of whitespace collapsed to one space")
    norm_language = f"`{norm['language']}`" if norm.get("language") else "each utterance's own locale"
    return "\n\n".join([
        "## Evaluation",
        "On a Common Voice test split, with xlsr-jax:",
        f"```bash\nxlsr-jax evaluate {model_id} --data cv:PATH/TO/cv-corpus/{lang_dir}:test\n```",
        "References and predictions are compared after the text normalisation the training labels "
        f"got (`text_normalization.json`): {', '.join(steps)}. Language rules: {norm_language}; "
        f"lowercase: {bool(norm.get('lowercase', True))}.",
        f"Characters removed (a Python string literal):\n\n```text\n{norm.get('chars_to_ignore', '')!r}\n```",
    ])


def _training(config: Config, step: int, curves_png: str | None, averaged: Sequence[int] = ()) -> str:
    d, m, o, t = config.data, config.model, config.optim, config.train
    specs = "\n".join(f"- `{spec}`" for spec in d.train) or "- (not recorded)"
    hyper = [
        ("learning rate", o.learning_rate), ("schedule", f"{o.schedule} (after linear warmup)"),
        ("warmup steps", o.warmup_steps), ("steps trained", step),
        *([("weights", "mean of the checkpoints of steps " + ", ".join(map(str, averaged)))] if averaged else []),
        ("per-device batch size", t.per_device_batch_size),
        ("gradient accumulation steps", o.gradient_accumulation_steps),
        ("precision", t.precision), ("weight decay", o.weight_decay), ("max grad norm", o.max_grad_norm),
        ("layerdrop", m.layerdrop), ("mask_time_prob", m.mask_time_prob),
        ("mask_feature_prob", m.mask_feature_prob), ("attention_dropout", m.attention_dropout),
        ("hidden_dropout", m.hidden_dropout), ("activation_dropout", m.activation_dropout),
        ("feat_proj_dropout", m.feat_proj_dropout), ("final_dropout", m.final_dropout),
        ("freeze_feature_encoder", m.freeze_feature_encoder), ("seed", t.seed),
    ]
    table = "\n".join(["| Hyper-parameter | Value |", "|---|---|"]
                      + [f"| {name} | {_cell(value)} |" for name, value in hyper])
    parts = [
        "## Training",
        f"Trained with xlsr-jax on (utterances of {d.min_duration_s:g}–{d.max_duration_s:g} s):\n\n{specs}",
        table,
    ]
    if curves_png:
        parts.append(f"![training curves]({curves_png})")
    return "\n\n".join(parts)
