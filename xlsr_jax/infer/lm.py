"""CTC beam search with a word n-gram language model: a thin wrapper over pyctcdecode + kenlm.

Labels come straight from the :class:`~xlsr_jax.text.Vocab` in id order, as transformers'
``Wav2Vec2ProcessorWithLM`` does with a ``Wav2Vec2CTCTokenizer`` vocabulary; pyctcdecode's alphabet
then maps ``[PAD]`` to its blank ``""``, ``|`` to the space and ``[UNK]`` to ``⁇``, in place, so
column ``i`` of the log-probs stays token ``i``.

An exported folder's LM (``alphabet.json`` + ``language_model/``) is pyctcdecode's own layout: users
load it with ``BeamSearchDecoderCTC.load_from_dir`` (what the model card shows). transformers'
``Wav2Vec2ProcessorWithLM`` reads the same files, but is deprecated (gone in v6) and its
``from_pretrained`` is broken in 5.25.0, so nothing here relies on it.

pyctcdecode 0.5.0 (its last release, 2023) declares ``numpy<2``; jax needs numpy 2, so it is
installed with ``--no-deps`` (it runs fine on numpy 2). See :func:`require_lm`.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from xlsr_jax.errors import UserError
from xlsr_jax.infer.ngram import read_unigrams
from xlsr_jax.rundir import LM_DIR
from xlsr_jax.text import UNK, Vocab

if TYPE_CHECKING:
    from pyctcdecode.alphabet import Alphabet
    from pyctcdecode.language_model import LanguageModel

LM_INSTALL = "pip install 'xlsr-jax[lm]' && pip install --no-deps pyctcdecode==0.5.0"
DEFAULT_ALPHA = 0.5
DEFAULT_BETA = 1.0
DEFAULT_BEAM_WIDTH = 100
PROCESSOR_WITH_LM = "Wav2Vec2ProcessorWithLM"
# pyctcdecode's saved layout: alphabet.json next to language_model/{attrs.json, unigrams.txt, <kenlm>}
ALPHABET_FILE = "alphabet.json"
KENLM_SUFFIXES = (".arpa", ".bin", ".binary")  # the only kenlm names pyctcdecode's loader accepts
PYCTCDECODE_UNK = "⁇"

WordFrames = tuple[str, int, int]


def require_lm() -> None:
    """Raise a UserError with the install lines unless kenlm, pygtrie and pyctcdecode all import."""
    missing = []
    for module in ("kenlm", "pygtrie", "pyctcdecode"):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise UserError(
            f"LM decoding (--lm) needs kenlm, pygtrie and pyctcdecode; missing: {', '.join(missing)}.\n"
            f"Install them with:\n  {LM_INSTALL}\n"
            "pyctcdecode goes in with --no-deps: its last release (0.5.0, 2023) declares numpy<2, "
            "which a resolver would satisfy by downgrading numpy and with it jax; it runs on numpy 2."
        )


def _load_kenlm(path: Path):
    import kenlm

    try:
        return kenlm.Model(str(path))
    except OSError as e:  # kenlm's message names the file, but buries it in C++ detail
        raise UserError(f"{path}: kenlm cannot read this language model ({e})") from None


def _language_model_from_file(path: Path, alpha: float, beta: float) -> "LanguageModel":
    """An ``.arpa`` file or a kenlm binary; a binary's words come from a ``unigrams.txt`` beside it."""
    from pyctcdecode.language_model import LanguageModel

    if path.suffix == ".arpa":
        unigrams = read_unigrams(path)
    elif (path.parent / "unigrams.txt").is_file():
        unigrams = (path.parent / "unigrams.txt").read_text(encoding="utf-8").split()
    else:
        unigrams = None  # kenlm cannot list a binary's vocabulary; pyctcdecode warns and copes
    return LanguageModel(_load_kenlm(path), unigrams, alpha=alpha, beta=beta)


def _language_model_from_dir(folder: Path, alpha: float | None, beta: float | None
                             ) -> "LanguageModel":
    """pyctcdecode's ``language_model/`` folder; its attrs.json weights unless overridden."""
    from pyctcdecode.language_model import LanguageModel

    try:
        files = LanguageModel.parse_directory_contents(str(folder))
    except ValueError as e:
        raise UserError(f"{folder}: not a pyctcdecode language_model/ folder ({e})") from None
    attrs = json.loads(Path(files["json_attrs"]).read_text(encoding="utf-8"))
    if set(attrs) != set(LanguageModel.JSON_ATTRS):
        raise UserError(f"{files['json_attrs']}: expected keys {LanguageModel.JSON_ATTRS}, got {list(attrs)}")
    unigrams = Path(files["unigrams"]).read_text(encoding="utf-8").splitlines()
    attrs["alpha"] = float(attrs["alpha"] if alpha is None else alpha)
    attrs["beta"] = float(attrs["beta"] if beta is None else beta)
    return LanguageModel(_load_kenlm(Path(files["kenlm"])), unigrams, **attrs)


def _check_alphabet(folder: Path, alphabet: "Alphabet") -> None:
    """An exported alphabet.json must match the vocab the logits come from, label for label."""
    path = folder / ALPHABET_FILE
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))["labels"]
        if saved != alphabet.labels:
            raise UserError(f"{path}: labels {saved} do not match the model vocab {alphabet.labels}")


class LMDecoder:
    """pyctcdecode beam search over one model's vocab, fused with a kenlm word n-gram."""

    def __init__(self, alphabet: "Alphabet", language_model: "LanguageModel", vocab: Vocab,
                 *, beam_width: int = DEFAULT_BEAM_WIDTH):
        from pyctcdecode.decoder import BeamSearchDecoderCTC

        if len(alphabet.labels) != len(vocab) or alphabet.labels.count("") != 1:
            raise ValueError(f"alphabet {alphabet.labels} does not map 1:1 onto vocab {vocab.tokens}")
        self.vocab = vocab
        self.beam_width = beam_width
        self.alphabet = alphabet
        self.language_model = language_model
        self.decoder: BeamSearchDecoderCTC = BeamSearchDecoderCTC(alphabet, language_model)
        # Greedy decoding (Vocab.decode_ctc) writes "[UNK]"; say it the same way unless ⁇ is a letter.
        self._unk = UNK if PYCTCDECODE_UNK not in vocab.tokens else PYCTCDECODE_UNK

    @classmethod
    def from_path(cls, lm_path: str | os.PathLike, vocab: Vocab, *, alpha: float | None = None,
                  beta: float | None = None, beam_width: int = DEFAULT_BEAM_WIDTH) -> "LMDecoder":
        """Load an ``.arpa`` file, a kenlm binary, or a folder holding pyctcdecode's ``language_model/``.

        alpha (LM weight) and beta (word insertion bonus) default to the folder's saved attrs.json
        values, else 0.5 and 1.0.
        """
        require_lm()
        from pyctcdecode.alphabet import Alphabet

        path = Path(lm_path)
        alphabet = Alphabet.build_alphabet(list(vocab.tokens))
        if path.is_dir():
            folder = path / LM_DIR if (path / LM_DIR).is_dir() else path
            if folder.name == LM_DIR:  # alphabet.json sits beside language_model/
                _check_alphabet(folder.parent, alphabet)
            lm = _language_model_from_dir(folder, alpha, beta)
        elif path.is_file():
            lm = _language_model_from_file(path, float(DEFAULT_ALPHA if alpha is None else alpha),
                                           float(DEFAULT_BETA if beta is None else beta))
        else:
            raise UserError(f"{path}: no such language model (an .arpa, a kenlm binary, or a folder)")
        return cls(alphabet, lm, vocab, beam_width=beam_width)

    @property
    def alpha(self) -> float:
        return self.language_model.alpha

    @property
    def beta(self) -> float:
        return self.language_model.beta

    def _best_beam(self, log_probs: np.ndarray) -> tuple[str, list[WordFrames], float]:
        """Top beam of one utterance ``[frames, vocab]``: (text, [(word, start, end)], its score: the
        acoustic log-prob plus alpha x the LM's and beta per word, as pyctcdecode ranks beams)."""
        log_probs = np.asarray(log_probs, dtype=np.float32)
        if log_probs.ndim != 2 or log_probs.shape[1] != len(self.vocab):
            raise ValueError(f"log_probs must be [frames, {len(self.vocab)}], got {log_probs.shape}")
        if log_probs.shape[0] == 0:
            return "", [], 0.0  # pyctcdecode's softmax fails on an empty matrix
        # decode_beams (prune_history off) is what pyctcdecode's decode, Wav2Vec2ProcessorWithLM.decode
        # and the ASR pipeline call, so the same logits give the same text through an exported folder.
        text, _, word_frames, _, score = self.decoder.decode_beams(log_probs, beam_width=self.beam_width)[0]
        words = [(self.tidy(w), int(start), int(end)) for w, (start, end) in word_frames]
        return self.tidy(text), words, float(score)

    def tidy(self, text: str) -> str:
        """pyctcdecode's text as greedy decoding writes it: single spaces, stripped, ``[UNK]`` for ⁇."""
        return " ".join(text.split()).replace(PYCTCDECODE_UNK, self._unk)

    def decode_batch(self, log_probs: Sequence[np.ndarray]) -> list[str]:
        """Transcripts of utterances, each log-softmax ``[frames_i, vocab]`` (padding cut off).

        Text is normalised like ``Vocab.decode_ctc``: single spaces, stripped, ``[UNK]`` for unknown.
        """
        return [self._best_beam(lp)[0] for lp in log_probs]

    def decode_scored(self, log_probs: Sequence[np.ndarray]) -> list[tuple[str, float]]:
        """As `decode_batch`, each transcript with its beam's score (`_best_beam`)."""
        return [(text, score) for text, _, score in map(self._best_beam, log_probs)]

    def decode_words(self, log_probs: np.ndarray) -> tuple[str, list[WordFrames]]:
        """Transcript of one utterance ``[frames, vocab]`` and its words as (word, start, end).

        Frames are half-open, ``0 <= start < end <= frames`` (pyctcdecode's and HF's word_offsets
        convention); seconds = frame * model.config.inputs_to_logits_ratio / sampling_rate.
        """
        return self._best_beam(log_probs)[:2]

    def save_for_processor(self, out_dir: str | os.PathLike) -> None:
        """Add the LM to a Hugging Face model folder, for pyctcdecode's ``load_from_dir``.

        ``out_dir`` already holds the ``Wav2Vec2Processor`` files. Writes ``alphabet.json`` and
        ``language_model/`` (pyctcdecode's layout, with this decoder's alpha/beta) and declares
        ``processor_class: Wav2Vec2ProcessorWithLM``, so transformers versions that still read LM
        folders (``Wav2Vec2ProcessorWithLM``, the ASR pipeline's ``ctc_with_lm``; removed in v6) load it too.
        """
        out = Path(out_dir)
        vocab_file = out / "vocab.json"
        if not vocab_file.is_file():
            raise UserError(f"{out}: no vocab.json; save the processor before adding the LM")
        if Vocab.load(vocab_file).tokens != self.vocab.tokens:
            raise UserError(f"{vocab_file}: vocab differs from the one this LM decoder was built for")
        # Stage beside the target, then swap in: lm_path may itself be out_dir/language_model.
        with tempfile.TemporaryDirectory(dir=out, prefix=".lm-") as tmp:
            staged = Path(tmp) / LM_DIR
            staged.mkdir()
            # pyctcdecode writes unigrams.txt in the locale's encoding unless told; HF reads utf-8.
            self.language_model.save_to_dir(str(staged), unigram_encoding="utf-8")
            _give_kenlm_file_a_loadable_name(staged)
            (Path(tmp) / ALPHABET_FILE).write_text(self.alphabet.dumps(), encoding="utf-8")
            if (out / LM_DIR).exists():
                shutil.rmtree(out / LM_DIR)
            os.replace(staged, out / LM_DIR)
            os.replace(Path(tmp) / ALPHABET_FILE, out / ALPHABET_FILE)
        mark_processor_class(out, PROCESSOR_WITH_LM)


def _give_kenlm_file_a_loadable_name(folder: Path) -> None:
    """pyctcdecode only loads kenlm files named .arpa/.bin/.binary; a '.klm' binary becomes '.bin'."""
    for path in folder.iterdir():
        if path.name not in ("attrs.json", "unigrams.txt") and path.suffix not in KENLM_SUFFIXES:
            path.rename(path.with_suffix(".bin"))


def mark_processor_class(folder: Path, processor_class: str) -> None:
    """Set ``processor_class`` wherever transformers looks for it.

    transformers 5 nests the feature extractor inside processor_config.json, and the ASR pipeline
    reads ``processor_class`` from that nested dict (not the top level) to decide whether to load
    the LM; older versions read preprocessor_config.json. The tokenizer config records it too.
    """
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        path = folder / name
        if not path.is_file():
            continue
        config = json.loads(path.read_text(encoding="utf-8"))
        config["processor_class"] = processor_class
        if name == "processor_config.json" and isinstance(config.get("feature_extractor"), dict):
            config["feature_extractor"]["processor_class"] = processor_class
        path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                        encoding="utf-8")
