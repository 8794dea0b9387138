"""Tests for moejax.moe.experts: shapes, init, SwiGLU/GELU math, dense/grouped/shared paths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import testing
from moejax.moe import experts


def _np_expert(bank, e, x):
    bank = {k: np.asarray(v, np.float64) for k, v in bank.items()}
    x = np.asarray(x, np.float64)
    up = x @ bank["w_up"][e]
    if "w_gate" in bank:
        g = x @ bank["w_gate"][e]
        h = g / (1.0 + np.exp(-g)) * up
    else:
        h = 0.5 * up * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (up + 0.044715 * up**3)))
    return h @ bank["w_down"][e]


@pytest.mark.parametrize("activation", experts.ACTIVATIONS)
def test_init_shapes_and_fan_in_scaling(activation):
    bank = experts.init_bank(jax.random.key(0), num_experts=3, d_model=64, d_ff=256,
                             activation=activation)
    want = {"w_up": (3, 64, 256), "w_down": (3, 256, 64)}
    if activation == "swiglu":
        want["w_gate"] = (3, 64, 256)
    assert {k: v.shape for k, v in bank.items()} == want
    assert experts.bank_activation(bank) == activation
    # Variance 1/fan_in per expert: fan_in = d for w_up, f for w_down.
    np.testing.assert_allclose(np.var(np.asarray(bank["w_up"])), 1 / 64, rtol=0.1)
    np.testing.assert_allclose(np.var(np.asarray(bank["w_down"])), 1 / 256, rtol=0.1)
    assert not np.allclose(bank["w_up"][0], bank["w_up"][1])  # experts differ


def test_bad_activation():
    with pytest.raises(ValueError, match="activation must be one of"):
        experts.init_bank(jax.random.key(0), num_experts=2, d_model=4, d_ff=4, activation="relu")


@pytest.mark.parametrize("activation", experts.ACTIVATIONS)
def test_paths_match_numpy(activation):
    e, d, f, c = 3, 5, 7, 4
    bank = experts.init_bank(jax.random.key(1), num_experts=e, d_model=d, d_ff=f,
                             activation=activation)
    xe = jax.random.normal(jax.random.key(2), (e, c, d))
    dense = experts.apply_dense(bank, xe)
    for i in range(e):
        ref = _np_expert(bank, i, xe[i])
        testing.assert_close(f"apply_expert {i}", ref, experts.apply_expert(bank, i, xe[i]),
                             ratio=testing.RATIO_F32)
        testing.assert_close(f"apply_dense {i}", ref, dense[i], ratio=testing.RATIO_F32)
    # Grouped: expert 0 gets 2 rows, expert 1 none, expert 2 gets 3 rows, 1 unused tail row.
    sizes = (2, 0, 3)
    xs = jax.random.normal(jax.random.key(3), (6, d))
    out = experts.apply_grouped(bank, xs, jnp.asarray(sizes, jnp.int32), impl="reference")
    ref = np.concatenate([_np_expert(bank, 0, xs[:2]), _np_expert(bank, 2, xs[2:5]),
                          np.zeros((1, d))])
    testing.assert_close("apply_grouped", ref, out, ratio=testing.RATIO_F32)


@pytest.mark.parametrize("gated", [False, True])
def test_shared_experts(gated):
    d = 6
    params = experts.init_shared(jax.random.key(4), num_shared=2, d_model=d, d_ff=5,
                                 gated=gated)
    assert ("gate" in params) == gated
    x = jax.random.normal(jax.random.key(5), (4, d))
    ref = _np_expert(params["bank"], 0, x) + _np_expert(params["bank"], 1, x)
    if gated:
        ref = ref / (1.0 + np.exp(-(np.asarray(x, np.float64) @ np.asarray(params["gate"]))))[
            :, None]
    testing.assert_close("shared", ref, experts.apply_shared(params, x), ratio=testing.RATIO_F32)


def test_bf16_bank_keeps_input_dtype():
    bank = experts.init_bank(jax.random.key(0), num_experts=2, d_model=4, d_ff=8,
                             dtype=jnp.bfloat16)
    assert bank["w_up"].dtype == jnp.bfloat16
    out = experts.apply_grouped(bank, jnp.ones((3, 4), jnp.float32), jnp.array([1, 2], jnp.int32))
    assert out.dtype == jnp.float32
