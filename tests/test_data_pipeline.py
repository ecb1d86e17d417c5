"""data/pipeline.py: the evaluation data path shared by the trainer and `xlsr-jax evaluate`."""

from __future__ import annotations

import functools

import numpy as np

from _models import tiny_config
from xlsr_jax.config import DataConfig
from xlsr_jax.data.pipeline import eval_loader, read_examples
from xlsr_jax.model import feat_extract_output_lengths
from xlsr_jax.text import TextNormalization, Vocab


def test_eval_loader_uses_loader_workers_and_keeps_the_batches(cv_dir, tmp_path):
    loaders = []
    for workers in (1, 2):
        data = DataConfig(eval=(f"cv:{cv_dir}:dev+test",), cache_dir=str(tmp_path), num_workers=1,
                          loader_workers=workers)
        examples = read_examples(data.eval, data, purpose="eval")
        normalization = TextNormalization(language="tr")
        vocab = Vocab.build([normalization(e.text) for e in examples])
        loader, _ = eval_loader(examples, data=data, vocab=vocab, normalization=normalization,
                                frames_fn=functools.partial(feat_extract_output_lengths, tiny_config()),
                                batch_size=2)
        loaders.append(loader)
    assert [loader.workers for loader in loaders] == [1, 2]
    plain, threaded = (list(loader.iter_epoch()) for loader in loaders)
    assert len(plain) == len(threaded) >= 2
    for a, b in zip(plain, threaded):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
