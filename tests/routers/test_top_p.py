"""Tests for moejax.routers.top_p (MASS confidence-mass routing; the shared contract:
test_contract.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moejax.routers import top_p
from tests.routers import helpers_p as H

# 4 tokens × 3 experts; rows sum to 1.
PROBS = np.array(
    [[0.5, 0.3, 0.2],
     [0.1, 0.8, 0.1],
     [0.2, 0.45, 0.35],
     [0.3, 0.3, 0.4]], np.float32)


def test_mass_rule_by_hand():
    # p = 0.5. Row 0 sorted (0.5, 0.3, 0.2): mass before = (0, 0.5, 0.8) -> keep only expert 0.
    # Row 1: (0.8, ...) -> expert 1. Row 2 sorted (0.45, 0.35, 0.2): before (0, 0.45, 0.8) ->
    # experts 1 and 2. Row 3 sorted (0.4, 0.3, 0.3): before (0, 0.4, 0.7) -> experts 2 and 0
    # (the tie 0.3/0.3 goes to the lower index).
    mask = jax.jit(top_p.top_p_mask, static_argnames="max_k")
    got = np.asarray(mask(jnp.asarray(PROBS), 0.5))
    want = np.array([[1, 0, 0], [0, 1, 0], [0, 1, 1], [1, 0, 1]], bool)
    np.testing.assert_array_equal(got, want)
    # p = 1: everything whose preceding mass is < 1, i.e. all three experts in every row.
    assert np.asarray(mask(jnp.asarray(PROBS), 1.0)).all()
    # max_k = 1 caps rows 2 and 3 at their arg-max.
    got = np.asarray(mask(jnp.asarray(PROBS), 0.5, max_k=1))
    np.testing.assert_array_equal(got, np.eye(3, dtype=bool)[[0, 1, 1, 2]])


@jax.jit
def _mask(probs, p):
    return top_p.top_p_mask(probs, p), top_p.top_p_mask(probs, p, max_k=2)


@given(seed=st.integers(0, 2**16), scale=st.sampled_from([0.1, 1.0, 10.0]),
       p=st.floats(0.01, 1.0), n_zero=st.integers(0, 4))
@H.FAST
def test_mass_rule(seed, scale, p, n_zero):
    # Random [N, E] distributions, n_zero experts at probability 0 (as inactive slots are).
    logits = np.random.default_rng(seed).normal(size=(H.N, H.E)) * scale
    logits[:, H.E - n_zero:] = -np.inf
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32)), np.float64)
    mask, mask2 = (np.asarray(m) for m in _mask(jnp.asarray(probs, jnp.float32), p))
    assert np.all(mask2 <= mask) and np.all(mask2.sum(-1) == np.minimum(mask.sum(-1), 2))
    for row_p, row_m in zip(probs, mask, strict=True):
        c = int(row_m.sum())
        srt = np.sort(row_p)[::-1]
        assert c >= 1
        assert row_p[row_m].min() >= srt[c - 1] - 1e-7  # the c most probable experts ...
        assert srt[: c - 1].sum() < p + 1e-5  # ... the mass before the last one is < p ...
        if c < H.E:
            assert srt[:c].sum() >= p - 1e-5  # ... and one more would be one too many.


@given(case=H.cases(), cfg=st.sampled_from([
    top_p.Config(d_model=H.D, num_experts=H.E, top_p=0.5),
    top_p.Config(d_model=H.D, num_experts=H.E, top_p=1.0, max_k=3, load_balance_weight=1e-2),
    top_p.Config(d_model=H.D, num_experts=H.E, top_p=0.5, renormalize=False),
]))
@H.FAST
def test_properties(case, cfg):
    seed, scale, active = case
    params, state = H.setup(top_p, cfg, seed, active)
    x = H.make_x(seed, scale=scale)
    out, _ = H.jitted(top_p)(params, state, x, cfg=cfg, train=True)
    w, m, probs = np.asarray(out.weights), np.asarray(out.mask), np.asarray(out.probs)
    assert np.all(w[~m] == 0)
    if cfg.renormalize:  # the authors' normalize_gate=True: probs / their sum over the selection
        want = np.where(m, probs, 0.0) / np.where(m, probs, 0.0).sum(-1, keepdims=True)
        np.testing.assert_allclose(w, want, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
    else:
        np.testing.assert_array_equal(w[m], probs[m])
    np.testing.assert_array_equal(m, np.asarray(top_p.top_p_mask(out.probs, cfg.top_p,
                                                                 cfg.max_k)) & active)
    assert top_p.max_assignments(cfg) == (cfg.max_k or H.E)


def test_weights_by_hand():
    # Gate = identity on 3 experts, so probs = softmax(x). x = log(0.5, 0.3, 0.2): p = 0.5 keeps
    # expert 0 alone -> weight 1 (renormalised) or 0.5 (raw); x = log(0.2, 0.45, 0.35): experts 1
    # and 2 -> 0.45/0.8, 0.35/0.8 (renormalised) or 0.45, 0.35 (raw).
    x = jnp.log(jnp.asarray([[0.5, 0.3, 0.2], [0.2, 0.45, 0.35]], jnp.float32))
    params = {"w_g": jnp.eye(3, dtype=jnp.float32)}
    want = {True: [[1.0, 0, 0], [0, 0.45 / 0.8, 0.35 / 0.8]],
            False: [[0.5, 0, 0], [0, 0.45, 0.35]]}
    for renorm in (True, False):
        cfg = top_p.Config(d_model=3, num_experts=3, top_p=0.5, renormalize=renorm)
        out, _ = top_p.route(params, {}, x, cfg=cfg, train=True)
        np.testing.assert_allclose(np.asarray(out.weights), want[renorm], rtol=1e-5, atol=1e-7)
    assert top_p.Config(d_model=3, num_experts=3).renormalize  # the authors' default


def test_loss():
    # (Gradients with this config: test_contract.test_grads.)
    cfg = top_p.Config(d_model=H.D, num_experts=H.E, top_p=0.7, max_k=3, load_balance_weight=1e-2)
    params, state = H.setup(top_p, cfg, 0)
    out, _ = H.jitted(top_p)(params, state, H.make_x(1), cfg=cfg, train=True)
    assert float(out.aux_loss) > 0 and float(out.metrics["switch_loss"]) == float(out.aux_loss)


@pytest.mark.parametrize("kwargs, field", [
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_p": -0.1}, "top_p"),
    ({"max_k": 0}, "max_k"), ({"max_k": 5}, "max_k"), ({"load_balance_weight": -1.0},
                                                       "load_balance_weight"),
    ({"renormalize": 1}, "renormalize"), ({"renormalize": "False"}, "renormalize"),
])
def test_bad_config(kwargs, field):
    with pytest.raises(ValueError, match=field):
        top_p.Config(d_model=4, num_experts=4, **kwargs)
