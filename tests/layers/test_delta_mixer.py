"""The delta mixer layer: prefill/continue and token-by-token decode equal one full apply."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.layers import delta_mixer as dm
from moejax.testing import RATIO_F32, assert_close


def _setup(mode, **kw):
    cfg = dm.DeltaMixerConfig(d_model=24, num_heads=2, head_dim=6, mode=mode, chunk_size=16, **kw)
    params = dm.init(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (2, 29, 24))
    return cfg, params, x


@pytest.mark.parametrize("mode", dm.MODES)
def test_prefill_and_decode_equal_full_apply(mode):
    cfg, params, x = _setup(mode)
    y, cache = dm.apply(params, x, cfg=cfg)
    assert y.shape == x.shape
    y1, c1 = dm.apply(params, x[:, :13], cfg=cfg)
    y2, c2 = dm.apply(params, x[:, 13:], cfg=cfg, cache=c1)
    assert_close("prefill+continue", y, jnp.concatenate([y1, y2], axis=1), ratio=RATIO_F32)
    step = jax.jit(lambda p, xt, c: dm.step(p, xt, c, cfg=cfg))
    c, ys = c1, []
    for t in range(13, 29):
        yt, c = step(params, x[:, t], c)
        ys.append(yt)
    assert_close("decode", y[:, 13:], jnp.stack(ys, axis=1), ratio=RATIO_F32)
    for name in cache:
        assert_close(f"cache[{name}]", cache[name], c[name], ratio=RATIO_F32)


def test_mode_parameters():
    for mode in dm.MODES:
        cfg, params, _ = _setup(mode)
        assert ("w_lam" in params) == cfg.query_mixing
        assert ("A_log" in params) == cfg.gated
    cfg, params, _ = _setup("gated_qdelta")
    A = np.exp(np.asarray(params["A_log"]))
    assert ((A >= 1) & (A <= 16)).all()
    dt = np.asarray(jax.nn.softplus(params["dt_bias"]))
    assert ((dt >= 1e-3 - 1e-7) & (dt <= 1e-1 + 1e-7)).all()


def test_allow_neg_eigval_doubles_beta_and_lam():
    cfg, params, x = _setup("qdelta")
    f1, _ = dm._features(params, x, None, cfg)
    f2, _ = dm._features(params, x, None, dm.DeltaMixerConfig(
        **{**cfg.__dict__, "allow_neg_eigval": True}))
    np.testing.assert_allclose(2 * np.asarray(f1["beta"]), np.asarray(f2["beta"]), rtol=1e-6)
    np.testing.assert_allclose(2 * np.asarray(f1["lam"]), np.asarray(f2["lam"]), rtol=1e-6)
    assert (np.asarray(f2["beta"]) < 2).all() and (np.asarray(f2["beta"]) > 0).all()


def test_grad_and_bf16():
    cfg, params, x = _setup("gated_qdelta")
    loss = lambda p: jnp.mean(dm.apply(p, x, cfg=cfg)[0] ** 2)
    grads = jax.grad(loss)(params)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.isfinite(np.asarray(g)).all(), path
        assert np.abs(np.asarray(g)).sum() > 0, path
    y32, _ = dm.apply(params, x, cfg=cfg)
    y16, _ = dm.apply(params, x.astype(jnp.bfloat16), cfg=cfg)
    assert y16.dtype == jnp.bfloat16
    assert_close("bf16 layer", y32, y16.astype(jnp.float32), ratio=3e-2)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"mode": "mamba"}, "mode must be one of"),
        ({"num_heads": 0}, "num_heads must be >= 1"),
        ({"expand_v": 0.3}, "expand_v must be > 0"),
        ({"chunk_size": 2.5}, "chunk_size must be an int"),
    ],
)
def test_config_rejects(kw, match):
    base = {"d_model": 24, "num_heads": 2, "head_dim": 6}
    with pytest.raises(ValueError, match=match):
        dm.DeltaMixerConfig(**{**base, **kw})


def test_apply_rejects_wrong_width():
    cfg, params, _ = _setup("qdelta")
    with pytest.raises(ValueError, match="d_model=24"):
        dm.apply(params, jnp.ones((2, 5, 23)), cfg=cfg)
    with pytest.raises(ValueError, match=r"\[B, d_model\]"):
        dm.step(params, jnp.ones((2, 1, 24)), dm.init_cache(cfg, 2), cfg=cfg)
