"""The router contract of `moejax.routers.base`, checked for every router in `ROUTER_NAMES`.

Shared rules: output shapes and dtypes (whatever the input float dtype), finite outputs, weights
≥ 0, 0 off the mask and summing to ≤ 1, inactive slots unused, `max_assignments` bounds the
mask, the config and input checks, `init`'s structure, the state round trip under `jit`, finite
gradients (none into inactive slots) and non-finite tokens routed nowhere. What each router
promises beyond that is in the tables below; what is specific to one router (its selection rule,
losses by hand, state dynamics) stays in its own file.

The property test draws each router's cases the way its own file does (same shapes, same configs),
so the two share compiled functions (`helpers.jitted`); the fixed-case tests share one case per
router (`_case`). The layer-level oracle for non-finite tokens (same outputs, losses, metrics and
state as with the bad rows removed) is `tests/reliability/test_nan_moe.py`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moejax.routers import ROUTER_NAMES, get_router
from moejax.validation import ArgumentTypeError
from tests.routers import helpers
from tests.routers import helpers_p as H

# ------------------------------------------------------------------------------ promises

STOCHASTIC = ("noisy_topk", "dense_to_sparse")  # draw noise at train: rng required
# A token may get no expert: expert choice leaves tokens out, null experts may take all k slots.
MIN_K = {"expert_choice": 0, "null_experts": 0}
PROBS_SUM_TO_ONE = {"null_experts": False}  # probs restricted to the real experts: ≤ 1
# Batch-coupled routing: a token's experts depend on the other tokens of the batch (expert choice,
# Sinkhorn balancing, STAR's GHA step before routing), so zeroing a bad row is not neutral.
BATCH_COUPLED = ("expert_choice", "sinkhorn", "star")
PARAMS = {"noisy_topk": {"w_g", "w_noise"}, "top_any": {"w_g", "thresholds"},
          "null_experts": {"w_g", "w_null"}, "star": {"w_g", "r", "a"}}  # default {"w_g"}
STATE = {"aux_free": {"bias"}, "dense_to_sparse": {"step"}, "star": {"v"}}  # default {}
NONZERO_GRADS = {"noisy_topk": ("w_g", "w_noise"), "top_any": ("w_g", "thresholds"),
                 "null_experts": ("w_g", "w_null"), "star": ("w_g", "r", "a")}  # default w_g


def _mod(name):
    return get_router(name)


def _rng(name, train: bool, seed: int = 0):
    return jax.random.key(seed) if train and name in STOCHASTIC else None


# ------------------------------------------------------------------------- property test

# Routers whose own property tests draw shapes from `helpers.SHAPES` (config built from the case)
# and the extra config fields they vary; the others use `helpers_p`'s fixed (N, D, E) and a list
# of (config, train) variants.
SHAPED = {"topk": [{}], "noisy_topk": [{}], "sinkhorn": [{}], "aux_free": [{}],
          "expert_choice": [{"capacity_factor": 0.5}, {"capacity_factor": 2.0}]}


@functools.cache
def _variants(name):
    c = _mod(name).Config
    dims = dict(d_model=H.D, num_experts=H.E)
    if name == "top_p":
        return [(c(**dims, top_p=0.5), True),
                (c(**dims, top_p=1.0, max_k=3, load_balance_weight=1e-2), True)]
    if name == "top_any":
        return [(c(**dims), True), (c(**dims, tau=0.1, load_balance_weight=1e-2), True)]
    if name == "null_experts":
        return [(c(**dims, top_k=2, num_null=3), True), (c(**dims, top_k=4, num_null=1), True),
                (c(**dims, top_k=2, num_null=0), True)]
    if name == "dense_to_sparse":
        cfg = c(**dims, anneal_steps=100)
        return [(cfg, True), (cfg, False), (c(**dims, anneal_steps=100, threshold=0.0,
                                              renormalize=True, load_balance_weight=1e-2), True)]
    assert name == "star", name
    # The default R is free (the authors'); the expm(P − P^T) variant is slow to compile on CPU
    # and has its own tests in test_star.py.
    alt = c(**dims, top_k=1, gha_only=True, load_balance_weight=1e-2, eta=1e-2)
    return [(c(**dims, top_k=2), True), (alt, True), (alt, False)]


def _perturb(name, data, seed, params, state):
    """Moves each router off its init the way its own property test does."""
    if name == "aux_free":  # a random bias steers selection
        bias = np.random.default_rng(seed).normal(size=state["bias"].shape) * 0.1
        state = {**state, "bias": jnp.asarray(bias, jnp.float32)}
    elif name == "top_any":  # thresholds shifted: from all experts to the arg-max fallback
        shift = data.draw(st.floats(-2.0, 2.0))
        params = {**params, "thresholds": params["thresholds"] + shift}
    elif name == "dense_to_sparse":  # from dense (τ = 2) to sparse (τ = 0.3)
        state = {**state, "step": jnp.int32(data.draw(st.sampled_from([0, 50, 1000])))}
    return params, state


@pytest.mark.parametrize("name", ROUTER_NAMES)
@given(data=st.data())
@helpers.FAST
def test_properties(name, data):
    mod = _mod(name)
    if name in SHAPED:
        case = data.draw(helpers.router_cases())
        kwargs = data.draw(st.sampled_from(SHAPED[name]))
        cfg = mod.Config(d_model=case.d, num_experts=case.e, top_k=case.k, **kwargs)
        train, seed, active, n, e = True, case.seed, case.active, case.n, case.e
        params, state = helpers.setup(mod, cfg, seed, active)
        x = helpers.make_x(seed, n, case.d, scale=case.scale)
    else:
        seed, scale, active = data.draw(H.cases())
        cfg, train = data.draw(st.sampled_from(_variants(name)))
        n, e = H.N, H.E
        params, state = H.setup(mod, cfg, seed, active)
        x = H.make_x(seed, scale=scale)
    params, state = _perturb(name, data, seed, params, state)
    out, new_state = helpers.jitted(mod)(params, state, x, cfg=cfg, train=train,
                                         rng=_rng(name, train, seed))
    helpers.check_output(out, n=n, e=e, active=active, min_k=MIN_K.get(name, 1),
                         probs_sum_to_one=PROBS_SUM_TO_ONE.get(name, True))
    m, w = np.asarray(out.mask), np.asarray(out.weights)
    bound = mod.max_assignments(cfg)
    assert isinstance(bound, int) and 1 <= bound <= cfg.num_experts
    assert np.all(m.sum(-1) <= bound)
    assert np.all(w.sum(-1) <= 1 + 1e-5)
    _check_same_structure(new_state, state)
    np.testing.assert_array_equal(new_state["active"], active)


def _check_same_structure(new_state, state):
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype


# ---------------------------------------------------------------------- fixed-case tests

ACTIVE = np.array([True, True, False, True, True, True])  # E = 6, slot 2 inactive
BAD = np.array([2, 5])  # row 2 holds a NaN, row 5 a +Inf and a -Inf
STATEFUL = tuple(STATE)


@functools.cache
def _case(name):
    """`(cfg, params, state, x)`, slot 2 inactive: a shape and config the router's property test
    also draws (`SHAPES[2]` = (12, 4, 6, k=1), or `helpers_p`'s (16, 4, 6) with top_k = 2), so
    no test here compiles a route of its own."""
    mod = _mod(name)
    if name in SHAPED:
        n, d, e, k = helpers.SHAPES[2]
        cfg = mod.Config(d_model=d, num_experts=e, top_k=k, **SHAPED[name][0])
        params, state = helpers.setup(mod, cfg, 0, ACTIVE)
        return cfg, params, state, helpers.make_x(1, n, d)
    cfg = _variants(name)[0][0]
    params, state = H.setup(mod, cfg, 0, ACTIVE)
    return cfg, params, state, H.make_x(1)


def _bad_x(x):
    return x.at[BAD[0], 1].set(jnp.nan).at[BAD[1], 0].set(jnp.inf).at[BAD[1], 3].set(-jnp.inf)


@pytest.mark.parametrize("name", ROUTER_NAMES)
def test_init_structure(name):
    mod = _mod(name)
    cfg = mod.Config(d_model=H.D, num_experts=H.E)
    params, state = jax.eval_shape(lambda key: mod.init(key, cfg), jax.random.key(0))
    assert isinstance(params, dict) and isinstance(state, dict)
    assert set(params) == PARAMS.get(name, {"w_g"})
    assert set(state) == STATE.get(name, set())
    for key in {"w_g", "w_noise"} & set(params):  # the [E, d] gate matrices
        assert params[key].shape == (H.E, H.D), key
    for leaf in jax.tree.leaves(params):
        assert leaf.dtype == jnp.float32


@pytest.mark.parametrize("name", ROUTER_NAMES)
def test_shared_config_checks(name):
    config = _mod(name).Config
    cfg = config(d_model=np.int64(4), num_experts=np.int64(4), top_k=np.int64(2))
    assert cfg.top_k == 2
    with pytest.raises(ValueError, match="top_k=5 must be <= num_experts=4"):
        config(d_model=4, num_experts=4, top_k=5)
    for field in ("d_model", "num_experts", "top_k"):
        with pytest.raises(ValueError, match=field):
            config(**{"d_model": 4, "num_experts": 4, "top_k": 1, field: 0})
        with pytest.raises(ArgumentTypeError, match=field):
            config(**{"d_model": 4, "num_experts": 4, "top_k": 1, field: True})
    with pytest.raises(TypeError):
        config(4, 4)  # keyword-only


@pytest.mark.parametrize("name", ROUTER_NAMES)
def test_bad_input(name):
    mod = _mod(name)
    cfg = mod.Config(d_model=H.D, num_experts=H.E)
    shapes = jax.eval_shape(lambda key: mod.init(key, cfg), jax.random.key(0))
    params, state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)

    def route(x):
        mod.route(params, state, x, cfg=cfg, train=False)

    with pytest.raises(ValueError, match="d_model"):
        route(jnp.ones((2, H.D + 1)))
    with pytest.raises(ValueError, match=r"\[N, d_model\]"):
        route(jnp.ones((2, 3, H.D)))
    with pytest.raises(ArgumentTypeError, match="float"):
        route(jnp.ones((2, H.D), jnp.int32))
    with pytest.raises(ArgumentTypeError, match="x must be an array"):
        route([[1.0] * H.D] * 2)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_rng_required_at_train(name):
    mod = _mod(name)
    cfg, params, state, x = _case(name)
    with pytest.raises(ValueError, match="rng"):
        mod.route(params, state, x, cfg=cfg, train=True)


@pytest.mark.parametrize("name", ROUTER_NAMES)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_any_float_input_dtype(name, dtype):
    # Traced only (no compile): routing runs in float32 whatever the input dtype.
    mod = _mod(name)
    cfg, params, state, x = _case(name)
    out, new_state = jax.eval_shape(
        functools.partial(mod.route, cfg=cfg, train=True, rng=_rng(name, True)),
        params, state, x.astype(dtype))
    assert out.weights.dtype == out.probs.dtype == out.aux_loss.dtype == jnp.float32
    assert out.mask.dtype == jnp.bool_ and out.weights.shape == (x.shape[0], cfg.num_experts)
    assert all(v.shape == () and v.dtype == jnp.float32 for v in out.metrics.values())
    _check_same_structure(new_state, state)


@pytest.mark.parametrize("name", ROUTER_NAMES)
def test_state_round_trip(name):
    # The new state feeds the next call without a retrace; a stateless router returns the state
    # it got (`active` included). Eval leaving a stateful router's state alone is in its own file.
    mod = _mod(name)
    cfg, params, state, x = _case(name)
    f = helpers.jitted(mod)
    _, s1 = f(params, state, x, cfg=cfg, train=True, rng=_rng(name, True))
    size = f.cache_size()
    _, s2 = f(params, s1, x, cfg=cfg, train=True, rng=_rng(name, True, 1))
    assert f.cache_size() == size, "the returned state changed the jit signature"
    _check_same_structure(s2, state)
    np.testing.assert_array_equal(s2["active"], ACTIVE)
    if name not in STATEFUL:
        for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(state), strict=True):
            np.testing.assert_array_equal(a, b)


# The configs the routers' own gradient checks used (helpers_p's (16, 4, 6), top_k = 2).
GRAD_KWARGS = {"topk": {"renormalize": True}, "sinkhorn": {"renormalize": True},
               "top_p": {"top_p": 0.7, "max_k": 3, "load_balance_weight": 1e-2},
               "null_experts": {"num_null": 3}, "dense_to_sparse": {"anneal_steps": 100}}


@functools.cache
def _grad_case(name):
    """`(grad_fn, params, x)`: jitted grad wrt params of `Σ weights·c + aux_loss` (c fixed)."""
    mod = _mod(name)
    cfg = mod.Config(d_model=H.D, num_experts=H.E, top_k=2, **GRAD_KWARGS.get(name, {}))
    setup = helpers.setup if name in SHAPED else H.setup  # real init: STAR's V, R = I
    params, state = setup(mod, cfg, 0, ACTIVE)
    proj = np.random.default_rng(7).normal(size=(H.N, H.E)).astype(np.float32)

    def loss(p, x):
        out, _ = mod.route(p, state, x, cfg=cfg, train=True, rng=_rng(name, True))
        return jnp.sum(out.weights * proj) + out.aux_loss

    return jax.jit(jax.grad(loss)), params, H.make_x(0)


@pytest.mark.parametrize("name", ROUTER_NAMES)
def test_grads(name):
    # Finite, non-zero on the named params, none into the inactive slot's gate row; the same
    # with non-finite tokens in the batch.
    grad_fn, params, x = _grad_case(name)
    for xs in (x, _bad_x(x)):
        grads = grad_fn(params, xs)
        for key, g in grads.items():
            assert np.all(np.isfinite(np.asarray(g))), key
        for key in NONZERO_GRADS.get(name, ("w_g",)):
            assert H.nonzero(grads[key]), f"zero gradient for {key}"
        np.testing.assert_array_equal(grads["w_g"][~ACTIVE], 0.0)


@pytest.mark.parametrize("name", ROUTER_NAMES)
def test_nonfinite_tokens_routed_nowhere(name):
    mod = _mod(name)
    cfg, params, state, x = _case(name)
    f = helpers.jitted(mod)
    out, new_state = f(params, state, _bad_x(x), cfg=cfg, train=True, rng=_rng(name, True))
    n = x.shape[0]
    helpers.check_output(out, n=n, e=cfg.num_experts, active=ACTIVE, min_k=0,
                         probs_sum_to_one=PROBS_SUM_TO_ONE.get(name, True))
    m, w = np.asarray(out.mask), np.asarray(out.weights)
    good = np.setdiff1d(np.arange(n), BAD)
    assert not m[BAD].any() and np.all(w[BAD] == 0)
    assert np.all(m[good].sum(-1) >= MIN_K.get(name, 1))
    for leaf in jax.tree.leaves(new_state):
        assert np.all(np.isfinite(np.asarray(leaf)))
    if name not in BATCH_COUPLED:  # the other tokens are routed as if the bad rows were zeros
        zeroed = x.at[BAD].set(0.0)
        ref, _ = f(params, state, zeroed, cfg=cfg, train=True, rng=_rng(name, True))
        np.testing.assert_array_equal(m[good], np.asarray(ref.mask)[good])
        np.testing.assert_allclose(w[good], np.asarray(ref.weights)[good], rtol=1e-6)
