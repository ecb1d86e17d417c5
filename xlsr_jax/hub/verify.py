"""The export's self-check: the PyTorch model transformers loads from the folder and the Flax model
it was written from run on the same clips; their logits and greedy transcripts must agree. With an
n-gram LM in the folder, the LM as a user loads it (pyctcdecode's ``load_from_dir``, what the model card
shows) must decode the PyTorch logits as xlsr-jax's own LM decoder does."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import jax
import numpy as np
from transformers import Wav2Vec2Config

from xlsr_jax.data.audio import SAMPLING_RATE, AudioError, load_audio
from xlsr_jax.data.pipeline import read_examples
from xlsr_jax.model import FlaxWav2Vec2ForCTC
from xlsr_jax.text import Vocab

if TYPE_CHECKING:
    from xlsr_jax.infer.lm import LMDecoder

logger = logging.getLogger(__name__)

# fp32 on both sides: parity measured 2e-7 (tiny) to 3.4e-6 (XLSR-53 shape); anything near this bound
# is a conversion bug, not rounding.
MAX_RELATIVE_DIFF = 1e-3


class ExportCheckError(Exception):
    """The exported PyTorch model disagrees with the Flax model it was written from."""


def reference_clips(config, count: int = 3, seconds: float = 3.0) -> list[np.ndarray]:
    """A few real clips of the run's eval (else train) data; seeded synthetic audio when none can be
    read here (an export made on another machine than the run)."""
    specs = list(config.data.eval or config.data.train) if config is not None else []
    clips: list[np.ndarray] = []
    try:
        examples = read_examples(specs, config.data) if specs else []
    except (OSError, ValueError) as err:
        logger.info("export check: cannot read %s (%s); using synthetic audio", specs, err)
        examples = []
    for example in examples:
        if example.problem is not None:
            continue
        try:
            clips.append(load_audio(example.path))
        except AudioError:
            continue
        if len(clips) == count:
            return clips
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * SAMPLING_RATE)) / SAMPLING_RATE
    while len(clips) < count:  # speech-like enough to give the head something other than blank
        f0 = rng.uniform(100, 300)
        clips.append((np.sin(2 * np.pi * f0 * t) * (1 + np.sin(2 * np.pi * 3 * t)) +
                      0.1 * rng.standard_normal(t.size)).astype(np.float32))
    return clips


def flax_logits(config: Wav2Vec2Config) -> Callable[[Any, np.ndarray], jax.Array]:
    """Jitted (params, input_values float32 [batch, samples]) -> logits float32 [batch, frames, vocab] with
    every matmul and convolution at full float32 precision, as PyTorch computes them on a CPU. By default a
    TPU runs float32 matmuls in bfloat16 passes (a GPU in TF32): logits would move by ~1e-2 and fail the
    check for no fault of the export."""
    model = FlaxWav2Vec2ForCTC(config)

    def apply(params: Any, inputs: np.ndarray) -> jax.Array:
        with jax.default_matmul_precision("highest"):  # the trace's precision, on any backend
            return model.apply({"params": params}, inputs, deterministic=True)
    return jax.jit(apply)


def verify_folder(folder: str | Path, config: Wav2Vec2Config, params: Any, vocab: Vocab,
                  clips: list[np.ndarray], lm: "LMDecoder | None" = None) -> dict[str, Any]:
    """Run both models on `clips` (each `[samples]` at 16 kHz, one at a time, unpadded); with `lm`
    (the decoder whose files the folder holds), check the folder's LM too (:func:`verify_lm`).

    Returns {"clips", "max_abs_diff", "max_abs_logit", "transcripts_identical", "transcripts"}, plus
    "lm_transcripts" with `lm`; raises ExportCheckError when |Δlogits| exceeds MAX_RELATIVE_DIFF of the
    logits' scale or a transcript differs.
    """
    import torch
    from transformers import Wav2Vec2ForCTC, Wav2Vec2Processor

    torch_model = Wav2Vec2ForCTC.from_pretrained(str(folder)).eval()
    processor = Wav2Vec2Processor.from_pretrained(str(folder))
    apply = flax_logits(config)
    diff, scale, pairs, torch_logits = 0.0, 0.0, [], []
    for clip in clips:
        inputs = processor(clip, sampling_rate=SAMPLING_RATE, return_tensors="np")["input_values"]
        with torch.no_grad():
            expected = torch_model(torch.from_numpy(inputs)).logits.numpy()[0]
        got = np.asarray(apply(params, inputs))[0]
        diff = max(diff, float(np.abs(got - expected).max()))
        scale = max(scale, float(np.abs(expected).max()))
        pairs.append((processor.batch_decode(expected.argmax(-1)[None])[0], vocab.decode_ctc(got.argmax(-1))))
        torch_logits.append(expected)
    # Word for word: the tokenizer keeps a double space where two delimiters are split by a blank.
    identical = all(a.split() == b.split() for a, b in pairs)
    report = {"clips": len(clips), "max_abs_diff": diff, "max_abs_logit": scale,
              "transcripts_identical": identical, "transcripts": pairs}
    if diff > MAX_RELATIVE_DIFF * max(1.0, scale) or not identical:
        differs = next((p for p in pairs if p[0].split() != p[1].split()), None)
        raise ExportCheckError(
            f"{folder}: the exported PyTorch model disagrees with the Flax checkpoint: max |Δlogits| "
            f"{diff:.3g} (logits up to {scale:.3g}), greedy transcripts identical: {identical}; "
            f"first pair that differs (PyTorch, Flax): {differs}")
    if lm is not None:
        report["lm_transcripts"] = verify_lm(folder, torch_logits, lm)
    return report


def verify_lm(folder: str | Path, logits: list[np.ndarray], lm: "LMDecoder") -> list[tuple[str, str]]:
    """The folder's ``alphabet.json`` + ``language_model/`` loaded as the model card tells users to
    (pyctcdecode's ``BeamSearchDecoderCTC.load_from_dir``, its saved alpha/beta) against `lm`, on the
    same logits (each ``[frames, vocab]``) and beam width.

    Returns the (pyctcdecode, xlsr-jax) transcript of each; raises ExportCheckError on a difference.
    """
    from pyctcdecode import BeamSearchDecoderCTC

    user = BeamSearchDecoderCTC.load_from_dir(str(folder), unigram_encoding="utf-8")
    pairs = []
    for x in logits:  # pyctcdecode log-softmaxes its input; xlsr-jax's decoder takes log-probs
        log_probs = x - np.logaddexp.reduce(x, axis=-1, keepdims=True)
        pairs.append((lm.tidy(user.decode(x, beam_width=lm.beam_width)), lm.decode_batch([log_probs])[0]))
    differs = next((p for p in pairs if p[0] != p[1]), None)
    if differs is not None:
        raise ExportCheckError(
            f"{folder}: the exported language model, loaded with pyctcdecode, decodes otherwise than "
            f"xlsr-jax's LM decoder: (pyctcdecode, xlsr-jax) = {differs}")
    return pairs
