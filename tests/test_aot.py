"""Ahead-of-time compilation: every shape compiled up front (in threads), batches dispatched to their
shape's executable without compiling anything, an unknown shape refused by name."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _compiles import compile_events
from xlsr_jax import parallel
from xlsr_jax.config import MeshConfig
from xlsr_jax.data import BatchLoader, Example, PreparedDataset
from xlsr_jax.data.batch import MODEL_INPUTS
from xlsr_jax.text import Vocab
from xlsr_jax.aot import StepToCompile, abstract_batch, abstract_like, batch_shape, compile_steps


def _step(scale, batch):
    """A stand-in step: (scale + 1, per-row sums of the inputs and of the labels)."""
    rows = (batch["input_values"] * batch["attention_mask"]).sum(-1) * scale
    return scale + 1, {"rows": rows + batch["labels"].sum(-1) * batch["example_mask"]}


def _batch(shape, mesh, seed=0):
    b, s, length = shape
    rng = np.random.default_rng(seed)
    local = {"input_values": rng.standard_normal((b, s)).astype(np.float32),
             "attention_mask": np.ones((b, s), np.int32), "labels": rng.integers(0, 9, (b, length), np.int32),
             "example_mask": np.ones((b,), np.float32)}
    return local, parallel.global_batch(local, mesh)


@pytest.fixture(scope="module")
def mesh():
    return parallel.make_mesh(MeshConfig())  # 4 devices


def _jitted(mesh):
    replicated = parallel.replicated(mesh)
    return jax.jit(_step, in_shardings=(replicated, parallel.batch_sharding(mesh)),
                   out_shardings=(replicated, replicated), donate_argnums=0)


SHAPES = [(4, 64, 16), (8, 32, 16), (4, 128, 32)]


def test_every_shape_compiled_ahead_then_dispatched_without_compiling(mesh):
    scale = jax.device_put(jnp.float32(2.0), parallel.replicated(mesh))
    step = compile_steps([StepToCompile("toy", _jitted(mesh), abstract_like(scale), SHAPES + SHAPES[:1])],
                         parallel.batch_sharding(mesh))["toy"]
    assert sorted(step.executables) == sorted(SHAPES) and len(step) == 3
    batches = [_batch(shape, mesh, seed) for seed, shape in enumerate(SHAPES * 2)]
    with compile_events() as events:
        outputs = []
        for _, batch in batches:
            scale, out = step(scale, batch)
            outputs.append(out["rows"])
        outputs = jax.device_get(outputs)
    assert events == [], "a precompiled shape must not trace or compile again"
    expected_scale = 2.0
    for (local, _), rows in zip(batches, outputs):
        want = local["input_values"].sum(-1) * expected_scale + local["labels"].sum(-1)
        np.testing.assert_allclose(rows, want, rtol=1e-5)
        expected_scale += 1
    assert float(scale) == expected_scale


def test_an_unknown_shape_is_refused_by_name(mesh):
    scale = jax.device_put(jnp.float32(0.0), parallel.replicated(mesh))
    step = compile_steps([StepToCompile("train", _jitted(mesh), abstract_like(scale), SHAPES[:2])],
                         parallel.batch_sharding(mesh))["train"]
    _, batch = _batch((4, 128, 32), mesh)
    with compile_events() as events, pytest.raises(ValueError) as err:
        step(scale, batch)
    assert "train: no step compiled for batch shape (B, S, L) = (4, 128, 32)" in str(err.value)
    assert "[(4, 64, 16), (8, 32, 16)]" in str(err.value)
    assert events == [], "refused, not compiled"


def test_abstract_batch_matches_what_the_loader_builds(mesh):
    texts = ["bir", "iki üç", "dört beş altı", "yedi"]
    vocab = Vocab.build(texts)
    lengths = np.asarray([800, 1200, 1700, 900])
    dataset = PreparedDataset(texts=texts, labels=[vocab.encode(t) for t in texts], lengths=lengths,
                              audio=[np.ones(n, np.float32) for n in lengths],
                              examples=[Example(f"/clips/{i}.mp3", t) for i, t in enumerate(texts)])
    loader = BatchLoader(dataset, batch_size=4, boundaries=[1000, 2000], shuffle=False)
    for bucket, indices in loader.epoch_batches(0):
        batch = parallel.global_batch({k: v for k, v in loader.load_batch(bucket, indices).items()
                                       if k in MODEL_INPUTS}, mesh)
        abstract = abstract_batch(loader.batch_shapes[bucket], parallel.batch_sharding(mesh))
        assert {k: (v.shape, v.dtype, v.sharding) for k, v in abstract.items()} == \
            {k: (v.shape, v.dtype, v.sharding) for k, v in batch.items()}
        assert batch_shape(batch) == batch_shape(abstract) == loader.batch_shapes[bucket]
