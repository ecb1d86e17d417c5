"""A run whose checkpoints spell known transcripts, whatever the audio: the tests of `evaluate --best`,
LM decoding and the model card need WERs they can predict (a tiny trained run scores 1.0 everywhere,
so a wrong step or split would pass).

How the weights force it: the feature projection outputs the same vector for every frame (kernel 0,
bias 1), the encoder layers add nothing (their output projections are zero), and the positional conv
turns the zero padding around an utterance into 15 indicators, "at least d frames after the start"
(d = 1..8) and "at least d frames before the end" (d = 1..7). A frame's hidden state then depends only
on where it sits: one of the first 8 frames, one of the last 7, or in between (one state for all of
those). `lm_head` is solved by least squares, exactly for those 16 states, to give each position the
logits asked: a word spelled over the first frames, another over the last ones, the word delimiter (or
blank) in between. Every clip of the tiny Common Voice folder (>= 119 frames) gets the same transcript.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import jax
import jiwer
import numpy as np

START, END = 8, 7  # frames told apart after an utterance's start and before its end
MARGIN = 8.0  # logit of the chosen token; every other token gets 0 (p(chosen) ~ 0.99)
TIE = 0.5  # a runner-up's logit below the chosen one (p ~ 0.62 / 0.38): greedy keeps the chosen one

# The tiny Common Voice folder's references (conftest.CV_ROWS) as the run normalises them.
REFERENCES = {"dev": ["merhaba dünya", "nasılsın"], "test": ["görüşürüz"]}


@dataclasses.dataclass(frozen=True)
class Spelling:
    """`first` over an utterance's first frames (<= START characters), `last` over its last ones (<= END);
    `tie`: (index in `first`, character) a close runner-up at that frame, which an LM may prefer."""

    first: str
    last: str = ""
    tie: tuple[int, str] | None = None

    def greedy(self) -> str:
        return " ".join(w for w in (self.first, self.last) if w)


# Step 3 is the best checkpoint by its dev+test WER, step 6 the newest; an LM built from train+dev text
# turns step 6's "nasılsan" (not a word) into "nasılsın".
SPELLINGS = {3: Spelling("nasılsın"), 6: Spelling("nasılsan", "merhaba", tie=(6, "ı"))}


def wer(transcript: str, splits: str) -> float:
    """jiwer's WER of `transcript` for every utterance of `splits` ("dev", "test", "dev+test")."""
    refs = [r for split in splits.split("+") for r in REFERENCES[split]]
    return jiwer.wer(refs, [transcript] * len(refs))


def _targets(spelling: Spelling, vocab) -> np.ndarray:
    """Logits [START + 1 + END, vocab] for the first START frames, any middle frame, the last END frames."""
    blank, space = vocab.pad_id, vocab.word_delimiter_id
    first = [vocab.token_to_id(c) for c in spelling.first] + [blank] * (START - len(spelling.first))
    last = [blank] * (END - len(spelling.last)) + [vocab.token_to_id(c) for c in spelling.last]
    ids = first + [space if spelling.last else blank] + last
    assert len(ids) == START + 1 + END and vocab.unk_id not in ids, spelling
    logits = np.zeros((len(ids), len(vocab)), np.float32)
    logits[np.arange(len(ids)), ids] = MARGIN
    if spelling.tie is not None:
        i, char = spelling.tie
        logits[i, vocab.token_to_id(char)] = MARGIN - TIE
    return logits


def _positions(frames: int) -> np.ndarray:
    """Frame indices of the rows of `_targets` in an utterance of `frames` frames."""
    return np.concatenate([np.arange(START), [frames // 2], np.arange(frames - END, frames)])


def _set(params, name: str, fn):
    """`params` with every leaf whose path contains `name` replaced by `fn(leaf)` (numpy)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: np.asarray(fn(np.asarray(x))) if name in jax.tree_util.keystr(path) else x, params)


def _positional(params) -> dict:
    """Constant frames, positional-conv indicators, encoder layers that add nothing, a plain final norm."""
    width = 16  # num_conv_pos_embeddings of _runs.TINY_ARCH: tap k looks k - 8 frames ahead
    v = np.zeros((32, 8, width), np.float32)
    g = np.ones((1, 1, width), np.float32)
    for channel, tap in enumerate([*range(7, -1, -1), *range(9, width)]):  # 8 before, 7 after
        v[channel, 0, tap] = 1.0
    v[31, 0, 8], g[0, 0, 8] = 1.0, 0.0  # tap 8 (this frame) unused: a norm > 0, a weight of 0
    replace = {
        "['feature_projection']['projection']['kernel']": np.zeros_like,
        "['feature_projection']['projection']['bias']": np.ones_like,
        "['pos_conv_embed']['conv']['weight_v']": lambda _: v,
        "['pos_conv_embed']['conv']['weight_g']": lambda _: g,
        "['pos_conv_embed']['conv']['bias']": np.zeros_like,
        "['out_proj']": np.zeros_like,
        "['output_dense']": np.zeros_like,
        "['encoder']['layer_norm']['scale']": np.ones_like,
        "['encoder']['layer_norm']['bias']": np.zeros_like,
    }
    for name, fn in replace.items():
        params = _set(params, name, fn)
    return params


def _padded(lengths):
    """Noise clips of `lengths` samples, right padded: (waveforms [batch, samples], attention mask)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((len(lengths), max(lengths))).astype(np.float32)
    mask = (np.arange(max(lengths)) < np.asarray(lengths)[:, None]).astype(np.int32)
    return x * mask, mask


def _hidden(model, params, lengths) -> np.ndarray:
    """Final hidden states [batch, frames, hidden] of noise clips of `lengths` samples (right padded)."""
    return np.asarray(model.apply({"params": params}, *_padded(lengths),
                                  method=lambda m, x, a: m.wav2vec2(x, a, True, None)[0]))


def forced_params(model, params, spelling: Spelling, vocab) -> dict:
    """`params` (host arrays) changed so that every utterance of >= START + 1 + END frames decodes
    greedily to `spelling.greedy()`; checked on two padded noise clips."""
    params = _positional(params)
    frames = int(model.output_lengths(np.asarray([4800]))[0])  # 59 frames
    z = _hidden(model, params, [4800])[0, _positions(frames)]
    design = np.concatenate([z, np.ones((len(z), 1), np.float32)], axis=1)  # [16, hidden + 1]: kernel, bias
    solution, _, rank, _ = np.linalg.lstsq(design, _targets(spelling, vocab), rcond=None)
    assert rank == len(z), f"the {len(z)} position states are not independent (rank {rank})"
    params = _set(params, "['lm_head']['kernel']", lambda _: solution[:-1])
    params = _set(params, "['lm_head']['bias']", lambda _: solution[-1])
    lengths = [4800, 8000]
    logits = model.apply({"params": params}, *_padded(lengths))
    frames = model.output_lengths(np.asarray(lengths))
    np.testing.assert_allclose(np.asarray(logits)[1, _positions(int(frames[1]))], _targets(spelling, vocab),
                               atol=1e-3)
    got = vocab.decode_ctc_batch(np.asarray(logits).argmax(-1), frames)
    assert got == [spelling.greedy()] * 2, got
    return params


def make_forced_run(source: Path, out: Path) -> Path:
    """A copy of the finished run `source` whose checkpoints are replaced by one per `SPELLINGS` step
    (parameters only), each saved with its dev+test WER as eval/wer (the run's checkpoint.best_metric).
    Its hf_model/ and eval_results.json are dropped (they were the trained weights'); metrics.jsonl and
    the rest stay as trained."""
    from xlsr_jax.checkpoint import Checkpointer
    from xlsr_jax.infer.load import load_run

    shutil.copytree(source, out)
    loaded = load_run(out)
    assert loaded.config.checkpoint.best_metric == "eval/wer" and loaded.config.checkpoint.best_mode == "min"
    for name in ("checkpoints", "hf_model"):
        shutil.rmtree(out / name)
    (out / "eval_results.json").unlink(missing_ok=True)
    host = jax.device_get(loaded.params)
    checkpoints = Checkpointer(out / "checkpoints", max_to_keep=len(SPELLINGS), best_metric="eval/wer")
    for step, spelling in SPELLINGS.items():
        params = forced_params(loaded.model, host, spelling, loaded.vocab)
        checkpoints.save(step, {"params": params}, {"eval/wer": wer(spelling.greedy(), "dev+test")})
    checkpoints.close()
    return out
