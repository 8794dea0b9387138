"""Shared checks for the variable-k and stateful router tests (top_p, top_any, null_experts,
dense_to_sparse, star): random cases, output invariants, a grad smoke check."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import settings
from hypothesis import strategies as st

from moejax.routers import base

# Property tests stay small so the whole router suite runs in seconds on CPU. Shapes are fixed
# (N, D, E) and configs come from short lists, so each jitted route compiles a handful of times;
# hypothesis varies the data: inputs, their scale, parameters (seed) and the active-slot mask.
FAST = settings(max_examples=25, deadline=None, derandomize=True)
N, D, E = 16, 4, 6


@st.composite
def cases(draw, *, e: int = E):
    """Draws `(seed, scale, active)`: `scale` multiplies the inputs (large = peaked routing),
    `active` is an `[e]` bool array with at least one True (all True half the time)."""
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.sampled_from([0.1, 1.0, 10.0]))
    active = np.ones(e, bool)
    if draw(st.booleans()):
        active = np.array(draw(st.lists(st.booleans(), min_size=e, max_size=e)), bool)
        active[np.random.default_rng(seed).integers(e)] = True
    return seed, scale, active


def make_x(seed: int, n: int = N, d: int = D, *, scale: float = 1.0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, d)) * scale, jnp.float32)


@functools.cache
def jitted(mod):
    """`mod.route` jitted with `cfg` and `train` static (one cache per router module)."""
    return jax.jit(mod.route, static_argnames=("cfg", "train"))


@functools.cache
def _jitted_init(mod):
    return jax.jit(mod.init, static_argnames=("cfg",))


def setup(mod, cfg, seed: int, active=None):
    """`(params, state)` from `mod.init`, with `state["active"]` added when given."""
    params, state = _jitted_init(mod)(jax.random.key(seed), cfg=cfg)
    if active is not None:
        state = {**state, "active": jnp.asarray(active, jnp.bool_)}
    return params, state


def check_output(out: base.RouterOutput, *, n: int, e: int, active=None, min_k: int = 1,
                 probs_sum_to_one: bool = True) -> None:
    """Invariants of every router output: shapes, dtypes, finiteness, weights ≥ 0 and 0 off the
    mask, scalar aux loss and metrics, ≥ `min_k` experts per token, inactive slots unused."""
    w, m, p = (np.asarray(a) for a in (out.weights, out.mask, out.probs))
    assert w.shape == m.shape == p.shape == (n, e)
    assert out.weights.dtype == out.probs.dtype == jnp.float32
    assert out.mask.dtype == jnp.bool_
    assert out.aux_loss.shape == () and out.aux_loss.dtype == jnp.float32
    assert np.isfinite(float(out.aux_loss))
    assert np.all(np.isfinite(w)) and np.all(np.isfinite(p))
    assert np.all(w >= 0), "negative combine weight"
    assert np.all(w[~m] == 0), "weight off the mask"
    assert np.all(p >= 0)
    if probs_sum_to_one:
        np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)
    assert np.all(m.sum(-1) >= min_k), "too few experts selected"
    for name, v in out.metrics.items():
        assert jnp.shape(v) == (), name
        assert np.isfinite(float(v)), name
    if active is not None:
        off = ~np.asarray(active, bool)
        assert not m[:, off].any(), "inactive slot selected"
        assert np.all(w[:, off] == 0) and np.all(p[:, off] == 0)


def grads(mod, cfg, params, state, x, *, train: bool, rng=None, wrt: str = "params"):
    """Jitted grad of `Σ weights·c + aux_loss` (c a fixed random `[N, E]`) wrt `wrt`: "params",
    "state" (float leaves only) or "both" (a `(params, state)` pair); all finite."""
    proj = jax.random.normal(jax.random.key(7), (x.shape[0], cfg.num_experts))

    def loss(p, s):
        out, _ = mod.route(p, s, x, cfg=cfg, train=train, rng=rng)
        return jnp.sum(out.weights * proj) + out.aux_loss

    argnums = {"params": 0, "state": 1, "both": (0, 1)}[wrt]
    g = jax.jit(jax.grad(loss, argnums=argnums))(params, state)
    for leaf in jax.tree.leaves(g):
        assert np.all(np.isfinite(np.asarray(leaf)))
    return g


def nonzero(a) -> bool:
    return float(jnp.max(jnp.abs(a))) > 0
