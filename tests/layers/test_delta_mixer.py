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


@pytest.mark.parametrize("mode", ["gated_qdelta", "gated_deltanet"])
def test_authors_pairing_reaches_the_op_and_decodes_after_prefill(mode):
    """The layer's `pairing` is the op's: the mixer's output equals `delta_rule(pairing=...)` on
    its own features, differs from the recurrence only where λ is present, and a prefill with
    the authors' pairing continues with ordinary decode steps (their one-token calls)."""
    from moejax.kernels.delta_rule import delta_rule

    cfg = dm.DeltaMixerConfig(d_model=24, num_heads=2, head_dim=6, mode=mode, pairing="authors")
    params = dm.init(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (1, 70, 24))
    y, cache = dm.apply(params, x, cfg=cfg)
    f, _ = dm._features(params, x, None, cfg)
    o, _ = delta_rule(f["q"], f["k"], f["v"], f["beta"], g=f["g"], lam=f["lam"],
                      pairing="authors")
    assert_close("y", dm._output(params, x, o, cfg), y, ratio=RATIO_F32)
    rec = dm.DeltaMixerConfig(**{**cfg.__dict__, "pairing": "recurrence"})
    y_rec, _ = dm.apply(params, x, cfg=rec)
    diff = float(jnp.max(jnp.abs(y - y_rec)))
    assert diff > 1e-4 if mode == "gated_qdelta" else diff == 0.0
    # Step 64 opens the second chunk: a decode step after a 64-token prefill gives it exactly.
    yt, _ = dm.step(params, x[:, 64], dm.apply(params, x[:, :64], cfg=cfg)[1], cfg=cfg)
    assert_close("step after prefill", y[:, 64], yt, ratio=RATIO_F32)


def test_mode_parameters():
    for mode in dm.MODES:
        cfg, params, _ = _setup(mode)
        assert ("w_lam" in params) == cfg.query_mixing
        assert ("A_log" in params) == cfg.gated
    cfg, params, _ = _setup("gated_qdelta")
    A = np.exp(np.asarray(params["A_log"]))
    assert ((A > 0) & (A <= 16)).all()
    dt = np.asarray(jax.nn.softplus(params["dt_bias"]))
    assert ((dt >= 1e-3 - 1e-7) & (dt <= 1e-1 + 1e-7)).all()


def _init(**kw):
    cfg = dm.DeltaMixerConfig(**{"d_model": 256, "num_heads": 128, "head_dim": 4, **kw})
    return cfg, jax.jit(dm.init, static_argnums=1)(jax.random.key(0), cfg)


def test_init_std_default_is_the_authors_and_fan_in_stays_an_option():
    """Default: every projection and conv N(0, 0.02²) (fla's `initializer_range`);
    `init_std=None`: N(0, 1/fan_in) projections and U(±1/√K) convs, as before."""
    cfg, p = _init(mode="gated_qdelta")
    assert cfg.init_std == 0.02
    for name in ("w_q", "w_k", "w_v", "w_beta", "w_og", "w_out", "w_lam", "w_a"):
        np.testing.assert_allclose(float(jnp.std(p[name])), 0.02, rtol=0.05, err_msg=name)
        assert abs(float(jnp.mean(p[name]))) < 0.002, name
    for name in ("conv_q", "conv_k", "conv_v"):
        np.testing.assert_allclose(float(jnp.std(p[name]["w"])), 0.02, rtol=0.05, err_msg=name)
    np.testing.assert_array_equal(np.asarray(p["o_norm"]["scale"]), 1.0)
    _, q = _init(mode="gated_qdelta", init_std=None)
    np.testing.assert_allclose(float(jnp.std(q["w_q"])), 256**-0.5, rtol=0.05)
    np.testing.assert_allclose(float(jnp.std(q["w_out"])), (128 * 8) ** -0.5, rtol=0.05)
    w = np.asarray(q["conv_v"]["w"])
    assert np.abs(w).max() <= 0.5 and np.abs(w).max() > 0.45  # U(±1/√4)
    _, r = _init(mode="gated_qdelta", init_std=0.1)
    np.testing.assert_allclose(float(jnp.std(r["w_k"])), 0.1, rtol=0.05)


def test_gate_init_follows_the_authors():
    """A ~ U(0, 16) (a_init_min=1 gives the earlier U(1, 16)); dt log-uniform in [1e-3, 1e-1],
    dt_bias = softplus⁻¹(dt)."""
    _, p = _init(mode="gated_deltanet")
    A = np.exp(np.asarray(p["A_log"]))
    assert A.shape == (128,) and np.isfinite(np.asarray(p["A_log"])).all()
    assert A.min() > 0 and A.max() <= 16 and A.min() < 1  # P(min ≥ 1) = (15/16)^128 < 1e-3
    assert 6 < A.mean() < 10  # U(0, 16): mean 8, sd of the mean 0.41
    _, old = _init(mode="gated_deltanet", a_init_min=1.0)
    A_old = np.exp(np.asarray(old["A_log"]))
    assert A_old.min() >= 1 - 1e-6 and A_old.max() <= 16
    log_dt = np.log(np.asarray(jax.nn.softplus(p["dt_bias"])))
    assert log_dt.min() >= np.log(1e-3) - 1e-4 and log_dt.max() <= np.log(1e-1) + 1e-4
    assert abs(log_dt.mean() - 0.5 * (np.log(1e-3) + np.log(1e-1))) < 0.4  # log-uniform


def test_lam_is_sigmoid_of_projection_minus_fixed_0_9():
    """Default: no λ bias parameter, λ = σ(W_λ h − 0.9); `learnable_lam_bias` adds b_λ."""
    cfg, params, x = _setup("gated_qdelta")
    assert "b_lam" not in params
    f, _ = dm._features(params, x, None, cfg)
    want = 1 / (1 + np.exp(-(np.asarray(x, np.float64) @ np.asarray(params["w_lam"], np.float64)
                             - 0.9)))
    np.testing.assert_allclose(np.asarray(f["lam"]), want, rtol=1e-5)
    cfg_b = dm.DeltaMixerConfig(**{**cfg.__dict__, "learnable_lam_bias": True})
    params_b = dm.init(jax.random.key(0), cfg_b)
    np.testing.assert_array_equal(np.asarray(params_b["b_lam"]), 0.0)
    bias = jnp.array([-3.0, 1.5])
    fb, _ = dm._features({**params, "b_lam": bias}, x, None, cfg_b)
    np.testing.assert_allclose(np.asarray(fb["lam"]), 1 / (1 + np.exp(-(np.log(
        want / (1 - want)) + np.asarray(bias)))), rtol=1e-4)
    grads = jax.grad(lambda p: jnp.sum(dm.apply(p, x, cfg=cfg_b)[0] ** 2))(
        {**params, "b_lam": bias})
    assert np.abs(np.asarray(grads["b_lam"])).sum() > 0  # trained
    assert "b_lam" not in dm.init(jax.random.key(0), dm.DeltaMixerConfig(
        **{**cfg.__dict__, "mode": "gated_deltanet", "learnable_lam_bias": True}))


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
        ({"init_std": 0.0}, r"init_std must be in \(0.0, inf\)"),
        ({"init_std": float("nan")}, "init_std must be in"),
        ({"init_std": "0.02"}, "init_std must be a"),
        ({"a_init_min": 16.0}, r"a_init_min must be in \[0.0, 16.0\)"),
        ({"a_init_min": -1.0}, "a_init_min must be in"),
        ({"learnable_lam_bias": 1}, "learnable_lam_bias must be a bool"),
        ({"pairing": "author"}, "pairing must be one of"),
        ({"pairing": "authors", "chunk_size": 32}, "chunk_size must be 64 with pairing='authors'"),
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
