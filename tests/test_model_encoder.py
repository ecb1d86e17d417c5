"""The encoder's execution options: scanned vs unrolled layers, fused vs plain attention, remat policies.

Hugging Face's initialisation (range 0.02) leaves attention nearly uniform, so a wrong attention barely
moves a tiny model's logits; these tests perturb every weight by ~0.3 (`perturbed`), where making the
attention uniform changes the logits by most of their size, and compare relative to the largest logit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from _models import forward, padded_batch, perturbed, quiet_config
from xlsr_jax.model import FlaxWav2Vec2ForCTC
from xlsr_jax.model.kernels import keep_mask
from xlsr_jax.model.encoder import Attention, dropout_attend, fused_attention, softmax_as


def _logits(model, params, x, mask, deterministic=True, seed=0):
    return np.asarray(forward(model, params, x, mask, deterministic=deterministic, seed=seed))


def _grads(model, params, x, mask, seed=3):
    def loss(p):
        logits = model.apply({"params": p}, x, attention_mask=mask, deterministic=False,
                             rngs={"dropout": jax.random.key(seed)})
        return jnp.sum(jax.nn.log_softmax(logits)[..., 0])
    return jax.jit(jax.grad(loss))(params)


def _relative_error(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def _assert_grads_close(a, b, rtol):
    """Each gradient leaf within `rtol` of its own largest entry. Leaves whose gradient is zero in exact
    arithmetic (k_proj's bias: softmax ignores a constant added to every score) hold only rounding
    noise, so the scale never drops below 1e-3 of the largest gradient anywhere."""
    flat_a, flat_b = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    floor = 1e-3 * max(float(np.abs(np.asarray(y)).max()) for y in flat_b.values())
    for path, y in flat_b.items():
        scale = max(float(np.abs(np.asarray(y)).max()), floor)
        assert float(np.abs(np.asarray(flat_a[path]) - np.asarray(y)).max()) <= rtol * scale, "/".join(path)


@pytest.fixture(scope="module")
def batch():
    return padded_batch([4000, 3000, 1500], 4000)


@pytest.mark.slow  # initialises the whole model, unrolled and scanned
def test_scanned_layers_stack_and_convert_to_hugging_face_names():
    config = quiet_config(num_hidden_layers=3)
    unrolled, scanned = FlaxWav2Vec2ForCTC(config), FlaxWav2Vec2ForCTC(config, scan_layers=True)
    shapes = lambda tree: jax.tree.map(lambda x: x.shape, tree)  # noqa: E731
    stacked = scanned.abstract_params()
    assert stacked["wav2vec2"]["encoder"]["layers"]["layer"]["attention"]["q_proj"]["kernel"].shape == (3, 32, 32)
    assert shapes(scanned.to_hf_layout(stacked)) == shapes(unrolled.abstract_params())
    params = unrolled.init_params(jax.random.key(0))
    jax.tree.map(np.testing.assert_array_equal, scanned.to_hf_layout(scanned.from_hf_layout(params)), params)
    assert scanned.from_hf_layout(params)["wav2vec2"]["encoder"]["layers"].keys() == {"layer"}


@pytest.mark.slow  # compiles the whole model's gradients
def test_scan_equals_unrolled_logits_and_gradients(batch, report):
    config = quiet_config(num_hidden_layers=3)
    unrolled, scanned = FlaxWav2Vec2ForCTC(config), FlaxWav2Vec2ForCTC(config, scan_layers=True)
    params = perturbed(unrolled.init_params(jax.random.key(0)))
    stacked = scanned.from_hf_layout(params)
    x, mask = batch
    error = _relative_error(_logits(scanned, stacked, x, mask), _logits(unrolled, params, x, mask))
    report("scan vs unrolled logits, max error / max |logit|", error)
    assert error <= 1e-5
    _assert_grads_close(scanned.to_hf_layout(_grads(scanned, stacked, x, mask)), _grads(unrolled, params, x, mask),
                        rtol=1e-4)


@pytest.mark.slow  # compiles the whole model in training mode
def test_layerdrop_under_scan(batch):
    x, mask = batch
    everything = FlaxWav2Vec2ForCTC(quiet_config(num_hidden_layers=3, layerdrop=1.0), scan_layers=True)
    params = perturbed(everything.init_params(jax.random.key(0)))
    no_layers = FlaxWav2Vec2ForCTC(quiet_config(num_hidden_layers=0))
    without = {**params, "wav2vec2": {**params["wav2vec2"], "encoder": {
        k: v for k, v in params["wav2vec2"]["encoder"].items() if k != "layers"}}}
    np.testing.assert_allclose(_logits(everything, params, x, mask, deterministic=False),
                               _logits(no_layers, without, x, mask), atol=1e-5)
    half = FlaxWav2Vec2ForCTC(quiet_config(num_hidden_layers=3, layerdrop=0.5), scan_layers=True)
    outputs = {_logits(half, params, x, mask, deterministic=False, seed=s).tobytes() for s in range(8)}
    # 3 layers each kept or dropped: 8 seeds give several distinct subsets (one subset: the rng is ignored,
    # or every layer draws the same coin).
    assert len(outputs) >= 4


@pytest.mark.slow  # compiles the whole model's gradients
@pytest.mark.parametrize("scan", [False, True])
def test_fused_attention_equals_plain(scan, batch, report):
    config = quiet_config()
    plain = FlaxWav2Vec2ForCTC(config, attention="plain", scan_layers=scan)
    fused = FlaxWav2Vec2ForCTC(config, attention="xla", scan_layers=scan)
    params = perturbed(plain.init_params(jax.random.key(0)))
    x, mask = padded_batch([4000, 2500, 0], 4000)  # a filler row with no real frame at all
    expected, got = _logits(plain, params, x, mask), _logits(fused, params, x, mask)
    assert np.isfinite(got).all()
    error = _relative_error(got[:2], expected[:2])
    report(f"fused vs plain attention (scan={scan}), max error / max |logit|", error)
    assert error <= 1e-5
    _assert_grads_close(_grads(fused, params, x[:2], mask[:2]), _grads(plain, params, x[:2], mask[:2]), rtol=1e-4)


def test_plain_attention_runs_heads_first_on_cpu(monkeypatch):
    """The plain path's layout change for XLA:CPU's matmul: the same values and gradients as the
    frames-first einsums (the path other backends take), and on the CPU the heads-first q, k, v
    written out behind a barrier."""
    config = quiet_config()
    layer = Attention(config, impl="plain")
    x = jax.random.normal(jax.random.key(5), (3, 11, config.hidden_size))
    lengths = jnp.array([11, 8, 0], jnp.int32)
    params = perturbed(layer.init(jax.random.key(6), x, lengths, True)["params"])

    def run(backend):
        monkeypatch.setattr("xlsr_jax.model.encoder.jax.default_backend", lambda: backend)
        fn = lambda p, x: layer.apply({"params": p}, x, lengths, True)  # noqa: E731
        out, vjp = jax.vjp(fn, params, x)
        jaxpr = jax.make_jaxpr(fn)(params, x)
        monkeypatch.undo()
        return out[:2], vjp(jnp.ones_like(out).at[2].set(0.0)), str(jaxpr)

    out, grads, jaxpr = run("cpu")
    ref_out, ref_grads, ref_jaxpr = run("tpu")
    assert _relative_error(out, ref_out) <= 1e-6
    _assert_grads_close(grads[0], ref_grads[0], rtol=1e-4)  # as the other gradient checks here
    assert _relative_error(grads[1], ref_grads[1]) <= 1e-5
    heads = config.num_attention_heads
    head_first = f"f32[3,{heads},11,{config.hidden_size // heads}]"
    barriers = [line for line in jaxpr.splitlines() if "optimization_barrier" in line]
    assert len(barriers) == 1 and barriers[0].count(head_first) == 3  # q, k, v
    assert "optimization_barrier" not in ref_jaxpr


def _attention_inputs(frames: int, dtype=jnp.float32):
    """q, k, v [3, frames, 2 heads, 8] with weights of ~1 (so attention is far from uniform), and lengths
    [frames, frames - 3, 0] (a filler row)."""
    q, k, v = (jax.random.normal(key, (3, frames, 2, 8), dtype) for key in jax.random.split(jax.random.key(1), 3))
    return q, k, v, jnp.array([frames, frames - 3, 0], jnp.int32)


def _attention_value_and_grads(impl, even_frames, q, k, v, lengths):
    def loss(q, k, v):
        out = fused_attention(q, k, v, lengths, impl, even_frames)
        return jnp.sum(out[:2].astype(jnp.float32) ** 2), out  # the filler row is never used
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def test_even_frames_padding_leaves_attention_and_gradients_unchanged(report):
    """cuDNN's path pads an odd frame count by one hidden frame; run here through XLA's kernel."""
    q, k, v, lengths = _attention_inputs(13)
    out, grads = _attention_value_and_grads("xla", False, q, k, v, lengths)
    padded_out, padded_grads = _attention_value_and_grads("xla", True, q, k, v, lengths)
    assert padded_out.shape == out.shape == q.shape
    error = _relative_error(padded_out[:2], out[:2])
    report("attention padded to even frames vs unpadded, max error / max |out|", error)
    assert error <= 1e-6
    for name, got, expected in zip("qkv", padded_grads, grads):
        assert _relative_error(got, expected) <= 1e-6, name


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's fused attention needs an NVIDIA GPU")
def test_cudnn_attention_trains_at_odd_frame_counts_like_plain(report):
    """The kernel a GPU run picks ("auto" in bfloat16) at 499 frames (10 s of audio): it raised
    NotImplementedError at the first training step before the frames were padded to an even count."""
    q, k, v, lengths = _attention_inputs(499, jnp.bfloat16)
    out, grads = _attention_value_and_grads("cudnn", True, q, k, v, lengths)
    expected, expected_grads = _attention_value_and_grads("xla", False, q, k, v, lengths)
    error = _relative_error(out[:2].astype(jnp.float32), expected[:2].astype(jnp.float32))
    report("cuDNN vs XLA attention at 499 frames, bf16, max error / max |out|", error)
    assert error <= 2e-2  # bf16: 8 bits of mantissa, two kernels' own summation orders
    for name, got, want in zip("qkv", grads, expected_grads):
        assert _relative_error(got.astype(jnp.float32), want.astype(jnp.float32)) <= 2e-2, name


def _remat_count(model, params, x, mask) -> int:
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: _logits_sum(model, p, x, mask)))(params)
    return str(jaxpr).count("remat")


def _logits_sum(model, params, x, mask):
    return model.apply({"params": params}, x, attention_mask=mask, deterministic=False,
                       rngs={"dropout": jax.random.key(0)}).sum()


@pytest.mark.slow  # compiles the whole model's gradients
@pytest.mark.parametrize("policy", ["full", "dots_saveable", "dots_with_no_batch_dims_saveable"])
@pytest.mark.parametrize("scan", [False, True])
def test_remat_policy_recomputes_and_keeps_gradients(policy, scan, batch):
    config = quiet_config(num_hidden_layers=2)
    plain = FlaxWav2Vec2ForCTC(config, scan_layers=scan)
    remat = FlaxWav2Vec2ForCTC(config, scan_layers=scan, remat_policy=policy)
    params = perturbed(plain.init_params(jax.random.key(0)))
    x, mask = batch
    layer_bodies = 1 if scan else config.num_hidden_layers
    convs = len(config.conv_dim)
    assert _remat_count(plain, params, x, mask) == 0
    assert _remat_count(remat, params, x, mask) == layer_bodies + convs
    frozen = FlaxWav2Vec2ForCTC(config, scan_layers=scan, remat_policy=policy, freeze_feature_encoder=True)
    assert _remat_count(frozen, params, x, mask) == layer_bodies, "a frozen conv stack has no backward to remat"
    _assert_grads_close(_grads(remat, params, x, mask), _grads(plain, params, x, mask), rtol=1e-4)


def test_unknown_option_is_named():
    with pytest.raises(ValueError, match="remat_policy='some'"):
        FlaxWav2Vec2ForCTC(quiet_config(), remat_policy="some").abstract_params()


@pytest.mark.parametrize("dtype, rtol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_softmax_as_keeps_only_its_output_for_the_backward_pass(dtype, rtol):
    scores = 3.0 * jax.random.normal(jax.random.key(0), (2, 3, 5, 7))
    probe = jax.random.normal(jax.random.key(1), scores.shape)

    def autodiff(x):  # what the plain attention did before: softmax in float32, then the cast
        return jax.nn.softmax(x, axis=-1).astype(dtype)

    np.testing.assert_array_equal(softmax_as(scores, dtype), autodiff(scores))
    grads = [jax.grad(lambda x, f=f: jnp.sum(f(x).astype(jnp.float32) * probe))(scores)
             for f in (lambda x: softmax_as(x, dtype), autodiff)]
    assert grads[0].dtype == jnp.float32 and _relative_error(*grads) < rtol
    # What each keeps for the backward pass (jax.vjp's function holds it as its leaves): autodiff a
    # float32 array of the scores' shape, softmax_as only its output in `dtype`.
    kept = [jax.tree.leaves(jax.vjp(f, scores)[1]) for f in (lambda x: softmax_as(x, dtype), autodiff)]
    assert [(a.dtype, a.shape) for a in kept[0]] == [(jnp.dtype(dtype), scores.shape)]
    assert any(a.dtype == jnp.float32 and a.shape == scores.shape for a in kept[1])


@pytest.mark.parametrize("spec, v_shape", [("bhqk,bhkd->bhqd", (2, 3, 6, 4)), ("bhqk,bkhd->bqhd", (2, 6, 3, 4))])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dropout_attend_equals_softmax_dropout_einsum_and_keeps_no_mask(spec, v_shape, dtype):
    """The plain attention's training core in one custom VJP: the same values and gradients as softmax
    (`softmax_as`), inverted dropout with the key's `keep_mask` and the einsum, autodiffed; for the
    backward pass it keeps the probabilities, the mask and v, not the dropped probabilities."""
    scores = 3.0 * jax.random.normal(jax.random.key(0), (2, 3, 6, 6))
    v = jax.random.normal(jax.random.key(1), v_shape).astype(dtype)
    key, keep_prob = jax.random.key(2), 0.6

    def three_steps(scores, v):
        probs = softmax_as(scores, dtype)
        keep = keep_mask(key, keep_prob, probs.shape)
        return jnp.einsum(spec, jnp.where(keep, probs / keep_prob, 0).astype(dtype), v)

    def fused(scores, v):
        return dropout_attend(scores, v, key, keep_prob, dtype, spec)

    expected, got = three_steps(scores, v), fused(scores, v)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(expected, np.float32))
    assert 0 < int(jnp.sum(keep_mask(key, keep_prob, scores.shape))) < scores.size  # dropout did drop
    probe = jax.random.normal(jax.random.key(3), expected.shape).astype(dtype)
    for got_grad, expected_grad in zip(jax.vjp(fused, scores, v)[1](probe), jax.vjp(three_steps, scores, v)[1](probe)):
        assert got_grad.dtype == expected_grad.dtype
        assert _relative_error(got_grad, expected_grad) <= (1e-6 if dtype == jnp.float32 else 1e-2)
    kept = sorted((str(a.dtype), a.shape) for a in jax.tree.leaves(jax.vjp(fused, scores, v)[1]))
    assert kept == sorted([(str(jnp.dtype(dtype)), scores.shape), ("bool", scores.shape),
                           (str(jnp.dtype(dtype)), v_shape)])
