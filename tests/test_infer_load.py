"""What evaluate, transcribe and export read: a run's checkpoint, or the mean of several."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlsr_jax.errors import UserError
from xlsr_jax.infer.load import average_params, load_run


def test_average_params_is_the_mean_of_the_trees():
    rng = np.random.default_rng(0)
    trees = [{"a": {"kernel": rng.standard_normal((3, 5)).astype(np.float32)}, "b": rng.standard_normal(4).astype(np.float32)}
             for _ in range(3)]
    mean = average_params(jax.tree.map(jnp.asarray, t) for t in trees)
    expected = jax.tree.map(lambda *xs: ((xs[0] + xs[1]) + xs[2]) / np.float32(3), *trees)
    # x / 3 may compile to x * (1 / 3): one float32 rounding apart
    jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=2.5e-7, atol=0), jax.device_get(mean),
                 expected)
    one = {"x": jnp.arange(3.0)}
    assert average_params([one]) is one


def test_averaging_the_newest_checkpoints_of_a_run(trained_run):
    """--average 2 of a run with checkpoints at steps 3 and 6: their mean, named as such."""
    _, run = trained_run
    averaged = load_run(run, average=2)
    assert (averaged.averaged, averaged.step) == ((3, 6), 6)
    first, last = load_run(run, step=3).params, load_run(run, step=6).params
    expected = jax.tree.map(lambda a, b: (a + b) / 2, first, last)
    jax.tree.map(np.testing.assert_array_equal, averaged.params, expected)
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(last)))  # trained
    assert load_run(run).averaged == ()
    with pytest.raises(UserError, match="--average takes the newest"):
        load_run(run, step=3, average=2)
    with pytest.raises(UserError, match="averaging 3 checkpoints needs 3 kept, it has 2"):
        load_run(run, average=3)
