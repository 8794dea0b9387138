"""Tests for moejax.moe.layer: the whole layer against a per-token Python loop, for every router.

Oracle: for each token n, `y_n = Σ_{e in mask_n} weights[n, e] · expert_e(x_n) + shared(x_n)`,
with the router's own decision and the experts evaluated one token at a time in float64 NumPy.
With a capacity C, the i-th token (in token order) routed to e is dropped when i ≥ C.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from moejax import testing
from moejax.moe import experts
from moejax.moe.layer import MoEConfig, init, moe_apply
from moejax.routers import ROUTER_NAMES, get_router

N_LEAD, D, F, E, K = (3, 4), 8, 16, 4, 2
SUITE = ("cv", "max_vio", "load_entropy", "dead_experts", "avg_k", "active_experts",
         "dropped_fraction", "dropped_token_fraction")


def _require_router(name):
    try:
        get_router(name)
    except ImportError as err:
        pytest.skip(f"router module for {name!r} does not exist yet ({err})")


def _setup(name, **overrides):
    _require_router(name)
    cfg = MoEConfig(d_model=D, d_ff=F, num_experts=E, router=name, top_k=K, **overrides)
    params, state = init(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (*N_LEAD, D))
    return cfg, params, state, x


def _np_expert(bank, e, x):
    bank = {k: np.asarray(v, np.float64) for k, v in bank.items()}
    up = x @ bank["w_up"][e]
    if "w_gate" in bank:
        g = x @ bank["w_gate"][e]
        h = g / (1.0 + np.exp(-g)) * up
    else:
        h = 0.5 * up * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (up + 0.044715 * up**3)))
    return h @ bank["w_down"][e]


def _oracle(params, x, out, *, capacity=None):
    """Per-token loop; returns `(y [N, d], dropped assignments)`."""
    x = np.asarray(x, np.float64).reshape(-1, D)
    weights, mask = np.asarray(out.weights, np.float64), np.asarray(out.mask)
    y, fill, dropped = np.zeros_like(x), np.zeros(E, int), 0
    for n in range(x.shape[0]):
        for e in range(E):
            if not mask[n, e]:
                continue
            fill[e] += 1
            if capacity is not None and fill[e] > capacity:
                dropped += 1
                continue
            y[n] += weights[n, e] * _np_expert(params["experts"], e, x[n])
        if "shared" in params:
            shared = params["shared"]
            num_shared = shared["bank"]["w_up"].shape[0]
            s = sum(_np_expert(shared["bank"], i, x[n]) for i in range(num_shared))
            if "gate" in shared:
                s = s / (1.0 + np.exp(-(x[n] @ np.asarray(shared["gate"], np.float64))))
            y[n] += s
    return y, dropped


def _route(cfg, params, state, x, rng):
    return get_router(cfg.router).route(params["router"], state["router"], x.reshape(-1, D),
                                        cfg=cfg.router_config, train=True, rng=rng)


@pytest.mark.parametrize("name", ROUTER_NAMES)
def test_layer_matches_per_token_loop(name):
    # Both dispatchers; capacity_factor = E makes C = N, so capacity must drop nothing either.
    cfg, params, state, x = _setup(name, capacity_factor=float(E))
    rng = jax.random.key(2)
    out, router_state = _route(cfg, params, state, x, rng)
    ref, _ = _oracle(params, x, out)
    for dispatcher in ("dropless", "capacity"):
        c = dataclasses.replace(cfg, dispatcher=dispatcher)
        y, new_state, aux = moe_apply(params, state, x, cfg=c, train=True, rng=rng)
        assert y.shape == x.shape and y.dtype == x.dtype
        testing.assert_close(f"{name}/{dispatcher}", ref.reshape(x.shape), y,
                             ratio=testing.RATIO_F32)
        assert float(aux["metrics"]["dropped_fraction"]) == 0.0
        assert set(SUITE) <= set(aux["metrics"])
        assert all(k in aux["metrics"] for k in (f"router/{m}" for m in out.metrics))
        assert aux["top1"].shape == (int(np.prod(N_LEAD)),) and aux["top1"].dtype == jnp.int32
        assert aux["load"].shape == (E,)
        np.testing.assert_allclose(aux["aux_loss"], out.aux_loss, rtol=1e-6)
        jax.tree.map(np.testing.assert_array_equal, new_state["router"], router_state)


@pytest.mark.parametrize("gate", [False, True])
def test_shared_experts_and_gelu(gate):
    cfg, params, state, x = _setup("topk", num_shared=2, d_ff_shared=6, shared_gate=gate,
                                   activation="gelu")
    assert params["shared"]["bank"]["w_up"].shape == (2, D, 6) and "w_gate" not in params["experts"]
    y, _, _ = moe_apply(params, state, x, cfg=cfg, train=False)
    ref, _ = _oracle(params, x, _route(cfg, params, state, x, None)[0])
    testing.assert_close("shared", ref.reshape(x.shape), y, ratio=testing.RATIO_F32)


def test_capacity_drops_are_counted_and_zero():
    # C = ceil(0.5 · 12 · 2 / 4) = 3 slots per expert for 24 assignments: some must drop.
    cfg, params, state, x = _setup("topk", dispatcher="capacity", capacity_factor=0.5)
    y, _, aux = moe_apply(params, state, x, cfg=cfg, train=True)
    out, _ = _route(cfg, params, state, x, None)
    ref, dropped = _oracle(params, x, out, capacity=3)
    assert dropped > 0
    testing.assert_close("capacity", ref.reshape(x.shape), y, ratio=testing.RATIO_F32)
    np.testing.assert_allclose(aux["metrics"]["dropped_fraction"], dropped / 24, rtol=1e-6)
    lost = np.all(ref == 0, axis=-1)  # tokens whose every assignment was dropped
    np.testing.assert_array_equal(np.asarray(y).reshape(-1, D)[lost], 0.0)
    np.testing.assert_allclose(aux["metrics"]["dropped_token_fraction"], lost.mean(), rtol=1e-6)
    # The dropless dispatcher never drops.
    _, _, aux = moe_apply(params, state, x, cfg=dataclasses.replace(cfg, dispatcher="dropless"),
                          train=True)
    assert float(aux["metrics"]["dropped_fraction"]) == 0.0


def _dense_moe(params, state, x, cfg, rng):
    """Every expert on every token, combined with the router weights (a differentiable oracle)."""
    out, _ = _route(cfg, params, state, x, rng)
    xe = jnp.broadcast_to(x.reshape(1, -1, D), (E, out.weights.shape[0], D))
    ye = experts.apply_dense(params["experts"], xe)  # [E, N, d]
    return jnp.einsum("NE,ENd->Nd", out.weights, ye).reshape(x.shape), out.aux_loss


@pytest.mark.parametrize("name", ROUTER_NAMES)
def test_grad_matches_dense(name):
    _test_grad_matches_dense(name, jit=False)


def test_jit_grad_matches_dense():
    _test_grad_matches_dense("topk", jit=True)


def _test_grad_matches_dense(name, *, jit):
    cfg, params, state, x = _setup(name)
    rng = jax.random.key(3)
    proj = jax.random.normal(jax.random.key(4), x.shape)

    def loss_layer(params, x):
        y, _, aux = moe_apply(params, state, x, cfg=cfg, train=True, rng=rng)
        return jnp.sum(y * proj) + aux["aux_loss"]

    def loss_dense(params, x):
        y, aux_loss = _dense_moe(params, state, x, cfg, rng)
        return jnp.sum(y * proj) + aux_loss

    both = lambda p, x: (jax.value_and_grad(loss_layer, argnums=(0, 1))(p, x),
                         jax.value_and_grad(loss_dense, argnums=(0, 1))(p, x))
    got, want = (jax.jit(both) if jit else both)(params, x)
    testing.assert_close("loss", want[0], got[0], ratio=testing.RATIO_F32)
    flat_want, _ = jax.tree_util.tree_flatten_with_path(want[1])
    flat_got = jax.tree.leaves(got[1])
    for (path, w), g in zip(flat_want, flat_got, strict=True):
        testing.assert_close(f"{name} grad {jax.tree_util.keystr(path)}", w, g, ratio=1e-4)
    assert float(jnp.max(jnp.abs(got[1][0]["experts"]["w_up"]))) > 0


def test_capacity_equals_dropless_with_grads():
    cfg, params, state, x = _setup("top_p", capacity_factor=float(E))

    @functools.partial(jax.jit, static_argnames="dispatcher")
    def run(params, x, dispatcher):
        c = dataclasses.replace(cfg, dispatcher=dispatcher)
        def loss(params, x):
            y, _, _ = moe_apply(params, state, x, cfg=c, train=True)
            return jnp.sum(y**2), y
        return jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)

    (g_cap, y_cap), (g_drop, y_drop) = run(params, x, "capacity"), run(params, x, "dropless")
    testing.assert_close("y", y_drop, y_cap, ratio=testing.RATIO_F32)
    for a, b in zip(jax.tree.leaves(g_drop), jax.tree.leaves(g_cap), strict=True):
        testing.assert_close("grad", a, b, ratio=1e-4)


def test_contract_and_inactive_slots():
    cfg, params, state, x = _setup("topk", num_shared=1)
    assert params["router"]["w_g"].shape == (E, D)
    assert set(params) == {"router", "experts", "shared"}
    assert set(params["experts"]) == {"w_gate", "w_up", "w_down"}
    assert params["experts"]["w_gate"].shape == (E, D, F)
    assert params["experts"]["w_down"].shape == (E, F, D)
    assert set(state) == {"router"}
    # MASS-style active mask: slots 2 and 3 off -> they receive no tokens and leave the suite.
    state = {"router": {**state["router"], "active": jnp.array([True, True, False, False])}}
    y, new_state, aux = moe_apply(params, state, x, cfg=cfg, train=True)
    np.testing.assert_array_equal(aux["load"][2:], 0.0)
    assert float(aux["metrics"]["active_experts"]) == 2.0
    assert float(aux["metrics"]["dead_experts"]) == 0.0
    assert bool(jnp.all(aux["top1"] < 2))
    np.testing.assert_array_equal(new_state["router"]["active"], state["router"]["active"])
    ref, _ = _oracle(params, x, _route(cfg, params, state, x, None)[0])
    testing.assert_close("inactive", ref.reshape(x.shape), y, ratio=testing.RATIO_F32)


def test_bf16():
    cfg, params, state, x = _setup("topk", dtype=jnp.bfloat16)
    assert params["experts"]["w_up"].dtype == jnp.bfloat16
    y, _, _ = moe_apply(params, state, x.astype(jnp.bfloat16), cfg=cfg, train=False)
    assert y.dtype == jnp.bfloat16
    ref, _ = _oracle(params, x.astype(jnp.bfloat16), _route(cfg, params, state, x, None)[0])
    testing.assert_close("bf16", ref.reshape(x.shape), y, ratio=2e-2)


def test_config_is_hashable_and_normalises_router_kwargs():
    a = MoEConfig(d_model=D, d_ff=F, num_experts=E, router_kwargs={"renormalize": True})
    b = MoEConfig(d_model=D, d_ff=F, num_experts=E, router_kwargs=(("renormalize", True),))
    assert a == b and hash(a) == hash(b)
    assert a.router_config.renormalize is True and a.max_assignments == 2
    # Only declared fields (the router config is derived on demand), so the config nests in a
    # saved JSON config (LMConfig.moe) as exactly its options.
    assert set(vars(a)) == {f.name for f in dataclasses.fields(MoEConfig)}
    assert a.router_config == b.router_config
    assert dataclasses.replace(a, top_k=1).router_config.top_k == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(capacity_factor=0.0), "capacity_factor must be > 0"),
    (dict(capacity_factor=-1.0), "capacity_factor must be > 0"),
    (dict(router="bogus"), "router: unknown router 'bogus'; known routers: topk, noisy_topk"),
    (dict(dispatcher="scatter"), "dispatcher must be one of"),
    (dict(activation="relu"), "activation must be one of"),
    (dict(gmm_impl="triton"), "gmm_impl must be one of"),
    (dict(num_experts=0), "num_experts must be >= 1"),
    (dict(top_k=5), "top_k=5 must be <= num_experts=4"),
    (dict(router_kwargs={"top_k": 1}), "set 'top_k' on MoEConfig itself"),
    (dict(router_kwargs={"renormalize": [1]}), "router_kwargs values must be hashable"),
    (dict(dtype=jnp.int32), "dtype must be a float dtype"),
    (dict(num_shared=-1), "num_shared must be >= 0"),
])
def test_bad_config(kwargs, match):
    base = dict(d_model=D, d_ff=F, num_experts=E)
    with pytest.raises(ValueError, match=match):
        MoEConfig(**{**base, **kwargs})


def test_bad_input():
    cfg, params, state, x = _setup("topk")
    with pytest.raises(ValueError, match="d_model=8"):
        moe_apply(params, state, x[..., :5], cfg=cfg, train=True)
    other = dataclasses.replace(cfg, d_ff=2 * F)
    with pytest.raises(ValueError, match=r"\(num_experts, d_model, d_ff\)"):
        moe_apply(params, state, x, cfg=other, train=True)


def test_nan_router_logits_are_caught_by_checkify():
    from moejax.moe.layer import checked_moe_apply

    cfg = MoEConfig(d_model=8, d_ff=16, num_experts=4, top_k=2)
    params, state = init(jax.random.key(0), cfg)
    checked = jax.jit(lambda p, s, x: checked_moe_apply(p, s, x, cfg=cfg, train=False))
    # A NaN token is reported as such (it is routed nowhere, so the logits stay finite) ...
    err, _ = checked(params, state, jnp.ones((5, 8)).at[2, 3].set(jnp.nan))
    with pytest.raises(checkify.JaxRuntimeError, match="1 of the 5 tokens of x hold NaN"):
        err.throw()
    # ... NaN router params give NaN logits for finite tokens.
    bad = {**params, "router": {"w_g": params["router"]["w_g"].at[1, 0].set(jnp.nan)}}
    err, _ = checked(bad, state, jnp.ones((5, 8)))
    with pytest.raises(checkify.JaxRuntimeError, match="NaN routing logits"):
        err.throw()
    err, _ = checked(params, state, jnp.ones((5, 8)))
    err.throw()  # finite input: no error
