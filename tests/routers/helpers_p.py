"""Shared checks for the variable-k and stateful router tests (top_p, top_any, null_experts,
dense_to_sparse, star): random cases and a grad smoke check; the output invariants are
`helpers.check_output`, re-exported here, and `jitted` is `helpers.jitted` (one compile cache
per router module, shared with `test_contract.py`)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import settings
from hypothesis import strategies as st

from tests.routers.helpers import check_output as check_output  # noqa: F401
from tests.routers.helpers import jitted as jitted  # noqa: F401

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
def _jitted_init(mod):
    return jax.jit(mod.init, static_argnames=("cfg",))


def setup(mod, cfg, seed: int, active=None):
    """`(params, state)` from `mod.init`, with `state["active"]` added when given."""
    params, state = _jitted_init(mod)(jax.random.key(seed), cfg=cfg)
    if active is not None:
        state = {**state, "active": jnp.asarray(active, jnp.bool_)}
    return params, state


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
