"""Small real Hugging Face export folders for the card and push tests."""

from __future__ import annotations

import jax
import numpy as np

from _models import quiet_config
from xlsr_jax.config import Config, DataConfig, ModelConfig
from xlsr_jax.hub.export import write_hf_folder
from xlsr_jax.infer.lm import LMDecoder
from xlsr_jax.model import FlaxWav2Vec2ForCTC
from xlsr_jax.text import TextNormalization, Vocab

TEXTS = ("merhaba dünya", "iyi günler")
# Every frame's logits favour this character by a wide margin, so any decoder must read exactly it.
FORCED = "m"
# The smallest ARPA kenlm reads (it needs bigrams).
ARPA = """\\data\\
ngram 1=5
ngram 2=2

\\1-grams:
-1.0\t<unk>\t0
0\t<s>\t-0.3
-0.5\t</s>\t0
-0.5\tmerhaba\t-0.3
-0.5\tdünya\t-0.3

\\2-grams:
-0.2\t<s> merhaba
-0.2\tmerhaba dünya

\\end\\
"""

TR_TEST = {"type": "common_voice", "name": "Common Voice 23.0 (tr)", "config": "tr", "split": "test"}


def make_export(out_dir):
    """A tiny real export folder (no README) whose model always says FORCED."""
    vocab = Vocab.build(TEXTS)
    config = quiet_config(vocab_size=len(vocab), pad_token_id=vocab.pad_id)
    params = FlaxWav2Vec2ForCTC(config).init_params(jax.random.key(0))
    bias = np.zeros(len(vocab), np.float32)
    bias[vocab.token_to_id(FORCED)] = 30.0
    params = {**params, "lm_head": {"kernel": np.zeros_like(params["lm_head"]["kernel"]), "bias": bias}}
    return write_hf_folder(params, config, vocab, out_dir, normalization=TextNormalization(language="tr"))


def add_lm(folder):
    """Add the n-gram LM in pyctcdecode's layout (alphabet.json, language_model/), as `xlsr-jax export
    --lm` does."""
    arpa = folder.parent / f"{folder.name}.arpa"
    arpa.write_text(ARPA, encoding="utf-8")
    LMDecoder.from_path(arpa, Vocab.load(folder / "vocab.json")).save_for_processor(folder)
    return folder


def run_config(**model) -> Config:
    return Config(
        model=ModelConfig(**model),
        data=DataConfig(train=("cv:/data/cv-corpus-23.0-2025-09-05/tr:train+dev", "manifest:/data/extra.tsv"),
                        eval=("cv:/data/cv-corpus-23.0-2025-09-05/tr:test",), language="tr"),
    )


def transformers_lm_problem(*, pipeline: bool = False) -> str | None:
    """Why the installed transformers cannot load an exported LM folder, or None where it can.

    `Wav2Vec2ProcessorWithLM` is deprecated (removed in transformers v6) and its `from_pretrained` calls
    `ProcessorMixin._get_arguments_from_pretrained`, which 5.25.0 removed; the ASR pipeline's
    `ctc_with_lm` loads the LM with pyctcdecode itself (`pipeline=True`), so it needs only the class."""
    import transformers

    version = f"transformers {transformers.__version__}"
    try:
        from transformers import ProcessorMixin, Wav2Vec2ProcessorWithLM  # noqa: F401
    except ImportError:
        return f"{version} has no Wav2Vec2ProcessorWithLM (removed in v6): LM folders load with pyctcdecode only"
    if not pipeline and not hasattr(ProcessorMixin, "_get_arguments_from_pretrained"):
        return (f"{version}: Wav2Vec2ProcessorWithLM.from_pretrained calls "
                "ProcessorMixin._get_arguments_from_pretrained, which this release removed (AttributeError)")
    return None
