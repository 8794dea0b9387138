"""Causal softmax attention against a NumPy float64 model (GQA, q/k RMSNorm, partial rotary,
sigmoid gate), causality, GQA = repeated kv heads, rotary properties, and prefill + token-by-token
decode through the KV cache equal to one full pass."""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.layers import attention as attn
from moejax.testing import RATIO_F32, assert_close

B, T, D = 2, 7, 16

CONFIGS = {
    "plain": dict(num_heads=4, head_dim=8),
    "gqa": dict(num_heads=4, head_dim=8, num_kv_heads=2),
    "mqa_gated": dict(num_heads=4, head_dim=8, num_kv_heads=1, gated=True),
    "qk_norm": dict(num_heads=4, head_dim=8, qk_norm=True),
    "qwen3_next": dict(num_heads=4, head_dim=8, num_kv_heads=2, gated=True, qk_norm=True,
                       zero_centered_norm=True, rotary_dim=2, rope_theta=500.0),
    "partial_rotary": dict(num_heads=2, head_dim=8, rotary_dim=4),
    "no_rotary": dict(num_heads=2, head_dim=8, rotary_dim=0),
}


@functools.cache
def _apply(cfg):
    """`attn.apply` jitted for `cfg` (one compile per config and input shape)."""
    return jax.jit(functools.partial(attn.apply, cfg=cfg))


_rotary = jax.jit(attn.rotary, static_argnums=(2, 3))


def _params(cfg, rng):
    """Random params with `attn.init`'s structure (NumPy: faster than compiling the init)."""
    d, hd, kvd = cfg.d_model, cfg.num_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    dense = lambda i, o: jnp.asarray(rng.normal(0.0, i**-0.5, (i, o)), jnp.float32)
    p = {"w_q": dense(d, hd), "w_k": dense(d, kvd), "w_v": dense(d, kvd), "w_out": dense(hd, d)}
    if cfg.gated:
        p["w_gate"] = dense(d, hd)
    if cfg.qk_norm:  # non-trivial norm scales
        for norm in ("q_norm", "k_norm"):
            p[norm] = {"scale": jnp.asarray(rng.normal(0.0, 0.3, cfg.head_dim), jnp.float32)}
    return p


def _setup(name, seed=0):
    cfg = attn.AttentionConfig(d_model=D, **CONFIGS[name])
    rng = np.random.default_rng(seed)
    params = _params(cfg, rng)
    x = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    return cfg, params, x


def _np_rotary(x, positions, theta, rd):
    """Rotate-half rotary on the first `rd` channels of `x` [B, T, H, Dh], float64."""
    if rd == 0:
        return x
    half = rd // 2
    out = x.copy()
    for t, pos in enumerate(positions):
        for i in range(half):
            ang = pos * theta ** (-i / half)
            a, b = x[:, t, :, i], x[:, t, :, half + i]
            out[:, t, :, i] = a * np.cos(ang) - b * np.sin(ang)
            out[:, t, :, half + i] = b * np.cos(ang) + a * np.sin(ang)
    return out


def _np_params(params):
    return {k: (np.asarray(v["scale"], np.float64) if isinstance(v, dict) else
                np.asarray(v, np.float64)) for k, v in params.items()}


def _np_qkv(params, x, cfg):
    """Queries and keys (normed, rotated) and values `[B, T, heads, Dh]`, float64."""
    p, x = _np_params(params), np.asarray(x, np.float64)
    b, t, _ = x.shape
    H, Hkv, Dh = cfg.num_heads, cfg.kv_heads, cfg.head_dim
    q = (x @ p["w_q"]).reshape(b, t, H, Dh)
    k = (x @ p["w_k"]).reshape(b, t, Hkv, Dh)
    v = (x @ p["w_v"]).reshape(b, t, Hkv, Dh)
    if cfg.qk_norm:
        def rms(a, w):
            w = w + 1.0 if cfg.zero_centered_norm else w
            return a / np.sqrt(np.mean(a * a, axis=-1, keepdims=True) + cfg.norm_eps) * w
        q, k = rms(q, p["q_norm"]), rms(k, p["k_norm"])
    pos = np.arange(t)
    return (_np_rotary(q, pos, cfg.rope_theta, cfg.rotary),
            _np_rotary(k, pos, cfg.rope_theta, cfg.rotary), v)


def _np_attention(params, x, cfg):
    q, k, v = _np_qkv(params, x, cfg)
    p, x = _np_params(params), np.asarray(x, np.float64)
    b, t, _ = x.shape
    H, Hkv, Dh = cfg.num_heads, cfg.kv_heads, cfg.head_dim
    o = np.zeros((b, t, H, Dh))
    for h in range(H):
        g = h // (H // Hkv)
        s = np.einsum("btd,bsd->bts", q[:, :, h], k[:, :, g]) / np.sqrt(Dh)
        s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        o[:, :, h] = np.einsum("bts,bsd->btd", w / w.sum(-1, keepdims=True), v[:, :, g])
    if cfg.gated:
        o = o / (1.0 + np.exp(-(x @ p["w_gate"]).reshape(b, t, H, Dh)))
    return o.reshape(b, t, H * Dh) @ p["w_out"]


@pytest.mark.parametrize("name", CONFIGS)
def test_matches_numpy_reference(name):
    cfg, params, x = _setup(name)
    y, cache = _apply(cfg)(params, x)
    assert cache is None
    chex.assert_shape(y, (B, T, D))
    assert_close(name, _np_attention(params, x, cfg), y, ratio=RATIO_F32)


def test_init_matches_the_documented_structure():
    cfg, params, _ = _setup("qwen3_next")
    fresh = jax.jit(attn.init, static_argnums=1)(jax.random.key(0), cfg)  # one compile
    chex.assert_trees_all_equal_shapes_and_dtypes(fresh, params)
    chex.assert_shape([fresh["w_q"], fresh["w_k"], fresh["w_v"], fresh["w_gate"],
                       fresh["w_out"], fresh["q_norm"]["scale"]],
                      [(D, 32), (D, 16), (D, 16), (D, 32), (32, D), (8,)])
    chex.assert_trees_all_equal(fresh["k_norm"], {"scale": jnp.zeros((8,), jnp.float32)})
    plain = attn.AttentionConfig(d_model=D, num_heads=2, head_dim=8)
    shapes = jax.eval_shape(lambda key: attn.init(key, plain), jax.random.key(0))
    assert set(shapes) == {"w_q", "w_k", "w_v", "w_out"}


def test_init_std_default_and_fan_in_option():
    """Projections N(0, 0.02²) by default (fla's `initializer_range`), N(0, 1/fan_in) with
    `init_std=None`."""
    cfg = attn.AttentionConfig(d_model=256, num_heads=4, head_dim=64, gated=True)
    assert cfg.init_std == 0.02
    p = attn.init(jax.random.key(0), cfg)
    for name in ("w_q", "w_k", "w_v", "w_gate", "w_out"):
        np.testing.assert_allclose(float(jnp.std(p[name])), 0.02, rtol=0.05, err_msg=name)
    q = attn.init(jax.random.key(0), dataclasses.replace(cfg, init_std=None))
    np.testing.assert_allclose(float(jnp.std(q["w_q"])), 256**-0.5, rtol=0.05)
    with pytest.raises(ValueError, match="init_std must be in"):
        attn.AttentionConfig(d_model=D, num_heads=2, head_dim=8, init_std=0.0)


def test_causal_output_ignores_future_tokens():
    cfg, params, x = _setup("qwen3_next")
    f = lambda p, a: _apply(cfg)(p, a)[0]
    y = f(params, x)
    t0 = 4
    future = np.random.default_rng(9).normal(size=(B, T - t0, D))
    y2 = f(params, x.at[:, t0:].set(jnp.asarray(future, jnp.float32)))
    chex.assert_trees_all_close(y2[:, :t0], y[:, :t0], rtol=1e-6, atol=1e-6)
    assert float(jnp.max(jnp.abs(y2[:, t0] - y[:, t0]))) > 1e-3


def test_gqa_equals_repeated_kv_heads():
    cfg, params, x = _setup("gqa")
    group = cfg.num_heads // cfg.kv_heads

    def repeat(w):  # [d, Hkv·Dh] -> [d, H·Dh]: query head h reads kv head h // group
        return jnp.repeat(w.reshape(D, cfg.kv_heads, cfg.head_dim), group, axis=1).reshape(D, -1)

    full = dataclasses.replace(cfg, num_kv_heads=None)
    params_full = {**params, "w_k": repeat(params["w_k"]), "w_v": repeat(params["w_v"])}
    assert_close("gqa", _apply(full)(params_full, x)[0], _apply(cfg)(params, x)[0],
                 ratio=RATIO_F32)


def test_qk_norm_makes_the_output_invariant_to_q_k_scale():
    for name, invariant in (("qk_norm", True), ("plain", False)):
        cfg, params, x = _setup(name)
        y = _apply(cfg)(params, x)[0]
        scaled = {**params, "w_q": 4.0 * params["w_q"], "w_k": 0.25 * params["w_k"] * 3.0}
        y2 = _apply(cfg)(scaled, x)[0]
        assert bool(jnp.allclose(y, y2, rtol=1e-4, atol=1e-5)) == invariant, name


def test_rotary_partial_fraction():
    x = jnp.asarray(np.random.default_rng(3).normal(size=(1, 5, 2, 8)), jnp.float32)
    pos = jnp.arange(5) + 3
    for rd in (0, 2, 4, 8):
        got = _rotary(x, pos, 100.0, rd)
        np.testing.assert_array_equal(np.asarray(got[..., rd:]), np.asarray(x[..., rd:]))
        np.testing.assert_allclose(np.asarray(got),
                                   _np_rotary(np.asarray(x, np.float64), np.asarray(pos), 100.0,
                                              rd), rtol=1e-5, atol=1e-5)
        # A rotation: the norm of every rotated pair (i, i + rd/2) is kept.
        h = rd // 2
        pair = lambda a, h=h, rd=rd: np.asarray(a[..., :h]) ** 2 + np.asarray(a[..., h:rd]) ** 2
        np.testing.assert_allclose(pair(got), pair(x), rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_equal(_rotary(x, pos, 100.0, None), _rotary(x, pos, 100.0, 8))


def test_rotary_scores_depend_on_relative_position_only():
    q, k = jnp.asarray(np.random.default_rng(4).normal(size=(2, 1, 1, 1, 8)), jnp.float32)

    def score(pq, pk):
        rq = _rotary(q, jnp.array([pq]), 10000.0)
        rk = _rotary(k, jnp.array([pk]), 10000.0)
        return float(jnp.sum(rq * rk))

    np.testing.assert_allclose(score(5, 2), score(105, 102), rtol=1e-4)
    np.testing.assert_allclose(score(0, 0), float(jnp.sum(q * k)), rtol=1e-5)
    assert abs(score(5, 2) - score(5, 4)) > 1e-4


def test_prefill_and_decode_through_the_cache_equal_full():
    name = "qwen3_next"  # GQA, q/k norm, partial rotary and the gate, all through the cache
    cfg, params, x = _setup(name)
    f = _apply(cfg)  # compiles for the full, the prefill and the T = 1 shapes
    y, _ = f(params, x)
    xs = np.asarray(x)  # NumPy slices: no eager slice op to compile per position
    cache = attn.init_cache(cfg, B, max_len=T + 3)
    chex.assert_shape([cache["k"], cache["v"]], (B, T + 3, cfg.kv_heads, cfg.head_dim))
    y_pre, cache = f(params, xs[:, :3], cache=cache)
    assert int(cache["pos"]) == 3
    ys = [y_pre]
    for t in range(3, T):
        yt, cache = f(params, xs[:, t : t + 1], cache=cache)
        ys.append(yt)
    assert int(cache["pos"]) == T
    assert_close(f"{name} decode", y, np.concatenate(ys, axis=1), ratio=RATIO_F32)
    # The cache holds the (normed, rotated) keys and the values of the T positions, then zeros.
    _, k, v = _np_qkv(params, x, cfg)
    ck, cv = np.asarray(cache["k"]), np.asarray(cache["v"])
    assert_close("cache k", k, ck[:, :T], ratio=RATIO_F32)
    assert_close("cache v", v, cv[:, :T], ratio=RATIO_F32)
    np.testing.assert_array_equal(ck[:, T:], 0.0)
    np.testing.assert_array_equal(cv[:, T:], 0.0)


def test_bad_config_and_input():
    with pytest.raises(ValueError, match="num_kv_heads"):
        attn.AttentionConfig(d_model=D, num_heads=4, head_dim=8, num_kv_heads=3)
    with pytest.raises(ValueError, match="rotary_dim"):
        attn.AttentionConfig(d_model=D, num_heads=4, head_dim=8, rotary_dim=3)
    cfg, params, x = _setup("plain")
    with pytest.raises(ValueError, match="d_model"):
        attn.apply(params, x[..., :8], cfg=cfg)
