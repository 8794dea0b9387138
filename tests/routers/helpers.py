"""Shared pieces of the router tests: random cases, the output invariants (`check_output`, run for
every router by test_contract.py), jit and grad smoke checks.

Every compile costs ~0.3 s on CPU, so property tests draw shapes from a short menu (`SHAPES`) and
run the jitted router: hypothesis varies the values (seed, scale, active slots), not the shapes.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import settings
from hypothesis import strategies as st

from moejax.routers import base

FAST = settings(max_examples=25, deadline=None, derandomize=True)

# 4 tokens × 3 experts; rows sum to 1 (the Switch / z-loss by hand, test_losses and test_topk).
PROBS = np.array(
    [[0.7, 0.2, 0.1],
     [0.1, 0.8, 0.1],
     [0.6, 0.3, 0.1],
     [0.2, 0.2, 0.6]], np.float32)
# Row i of the logits is log(PROBS[i]) + c_i: softmax gives PROBS back, logsumexp gives c_i.
SHIFT = np.array([0.0, 1.0, 2.0, -1.0], np.float32)

# (n, d, e, k): a single token, a single expert, k = 1 of 6, k = E with N not a multiple of E.
SHAPES = ((1, 3, 4, 2), (5, 2, 1, 1), (12, 4, 6, 1), (7, 5, 3, 3))


class Case(NamedTuple):
    n: int
    d: int
    e: int
    k: int
    seed: int
    scale: float
    active: np.ndarray  # [E] bool with at least k Trues


@st.composite
def router_cases(draw, shapes=SHAPES) -> Case:
    """A shape from `shapes`, a seed, an input scale and an active-slot pattern (≥ k active)."""
    n, d, e, k = draw(st.sampled_from(shapes))
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.sampled_from([0.1, 1.0, 10.0]))
    active = np.array(draw(st.lists(st.booleans(), min_size=e, max_size=e)), bool)
    active[np.random.default_rng(seed).permutation(e)[:k]] = True
    return Case(n, d, e, k, seed, scale, active)


def make_x(seed: int, n: int, d: int, *, scale: float = 1.0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, d)) * scale, jnp.float32)


@functools.cache
def init_shapes(mod, cfg):
    """`(params, state)` of `mod.init` as `jax.ShapeDtypeStruct`s (traced once per config)."""
    return jax.eval_shape(lambda key: mod.init(key, cfg), jax.random.key(0))


def setup(mod, cfg, seed: int, active=None):
    """`(params, state)` shaped like `mod.init`'s, filled from numpy (no compile per shape).

    Params are normal with std `d**-0.5`, state leaves zeros, plus `state["active"]` if given.
    """
    shapes = init_shapes(mod, cfg)
    rng = np.random.default_rng(seed + 1)
    params = jax.tree.map(
        lambda s: jnp.asarray(rng.normal(size=s.shape) * cfg.d_model**-0.5, s.dtype), shapes[0])
    state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[1])
    if active is not None:
        state = {**state, "active": jnp.asarray(active, jnp.bool_)}
    return params, state


@functools.cache
def jitted(mod):
    """`mod.route` jitted with `cfg` and `train` static (one compile per config and shape).

    `rng` is always passed on (None by default): jit keys its cache on the keyword arguments
    given, so `rng=None` and no `rng` would compile twice.
    """
    f = jax.jit(mod.route, static_argnames=("cfg", "train"))

    def route(params, state, x, *, cfg, train, rng=None):
        return f(params, state, x, cfg=cfg, train=train, rng=rng)

    route.cache_size = f._cache_size
    return route


def run_case(mod, cfg, case: Case, *, train: bool, rng=None):
    """Runs the jitted router on `case`; returns `(out, new_state, params, state, x)`."""
    params, state = setup(mod, cfg, case.seed, case.active)
    x = make_x(case.seed, case.n, case.d, scale=case.scale)
    out, new_state = jitted(mod)(params, state, x, cfg=cfg, train=train, rng=rng)
    return out, new_state, params, state, x


def check_output(out: base.RouterOutput, *, n: int, e: int, active=None, min_k: int = 1,
                 probs_sum_to_one: bool = True) -> None:
    """Invariants of every router output: shapes, dtypes, finiteness, weights ≥ 0 and 0 off the
    mask, scalar finite aux loss and metrics, ≥ `min_k` experts per token, inactive slots unused.
    """
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


def check_grad(mod, cfg, params, state, x, *, train: bool, rng=None, nonzero=("w_g",)) -> dict:
    """Grad of a random projection of the weights (+ aux loss) wrt params: finite; `nonzero` ≠ 0."""
    proj = np.random.default_rng(7).normal(size=(x.shape[0], cfg.num_experts)).astype(np.float32)

    def loss(p):
        out, _ = mod.route(p, state, x, cfg=cfg, train=train, rng=rng)
        return jnp.sum(out.weights * proj) + out.aux_loss

    grads = jax.jit(jax.grad(loss))(params)
    for name, g in grads.items():
        assert np.all(np.isfinite(np.asarray(g))), name
    for name in nonzero:
        assert float(jnp.max(jnp.abs(grads[name]))) > 0, f"zero gradient for {name}"
    return grads
