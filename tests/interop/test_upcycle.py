"""Upcycling: GDN → gated Q-Delta and top-k → STAR start where the original model was; the GHA
warm-up moves V onto the layer inputs' principal subspace."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.interop import upcycle
from moejax.models import lm
from moejax.testing import init_lm

CFG = lm.get_preset("tiny", layer_mixers=("gated_deltanet", "gated_softmax"),
                    moe=dict(num_experts=4, router_kwargs={"renormalize": True,
                                                           "load_balance_weight": 0.01}))


def _setup():
    params, state = init_lm(jax.random.key(0), CFG)
    toks = jax.random.randint(jax.random.key(1), (2, 24), 0, 256, dtype=jnp.int32)
    return params, state, toks


@pytest.mark.parametrize("lam_init", [1e-6, 1e-4])
def test_qdelta_starts_where_gdn_was(lam_init):
    params, state, toks = _setup()
    cfg, new = upcycle.to_qdelta(params, CFG, lam_init=lam_init)
    assert cfg.mixers == ("gated_qdelta", "gated_softmax")
    assert cfg.learnable_lam_bias and not CFG.learnable_lam_bias  # λ needs its bias here
    lam = jax.nn.sigmoid(new["blocks"][0]["mixer"]["b_lam"] - 0.9)
    np.testing.assert_allclose(np.asarray(lam), lam_init, rtol=1e-4)
    diff = upcycle.logit_difference(params, state, CFG, new, state, cfg, toks)
    assert diff["max_rel"] < 10 * lam_init + 1e-6, diff
    # Larger λ moves the model measurably: the override is not a no-op.
    cfg_big, big = upcycle.to_qdelta(params, CFG, lam_init=0.5)
    assert upcycle.logit_difference(params, state, CFG, big, state, cfg_big, toks)["max_rel"] > 1e-3
    assert "w_lam" not in params["blocks"][0]["mixer"]  # inputs untouched


def test_star_starts_near_topk_and_warmup_tracks_the_subspace():
    params, state, toks = _setup()
    cfg, new, new_state = upcycle.to_star(params, state, CFG, mix_init=0.9999)
    assert cfg.moe.router == "star" and dict(cfg.moe.router_kwargs)["renormalize"] is True
    diff = upcycle.logit_difference(params, state, CFG, new, new_state, cfg, toks)
    assert diff["mean_abs"] < 1e-3, diff
    # Warm-up on one repeated batch: V's rows converge to the top principal directions of the
    # first MoE layer's inputs (uncentred second moment, as GHA uses).
    x = lm.norm(params["blocks"][0]["norm2"], _block_input(params, state, toks), CFG)
    x = np.asarray(x.reshape(-1, CFG.d_model), np.float64)
    eigval, eigvec = np.linalg.eigh(x.T @ x / len(x))
    top = eigvec[:, ::-1][:, :CFG.moe.num_experts]
    align = lambda v: np.linalg.norm(top.T @ np.asarray(v, np.float64).T) ** 2 / len(v)
    v0 = new_state["blocks"][0]["router"]["v"]
    warm = upcycle.gha_warmup(new, new_state, cfg, [toks] * 400, eta=0.05)
    v1 = warm["blocks"][0]["router"]["v"]
    assert align(v1) > 0.9 > align(v0) + 0.3, (align(v0), align(v1))


def _block_input(params, state, toks):
    """Residual stream entering block 0's FFN."""
    h = params["embed"][toks]
    y, _ = lm.mixer_apply(params["blocks"][0]["mixer"], lm.norm(params["blocks"][0]["norm1"], h,
                                                                 CFG), CFG, 0)
    return h + y


def test_bad_overrides_are_named():
    params, state, _ = _setup()
    with pytest.raises(ValueError, match=r"lam_init must be in \(0(\.0)?, 1(\.0)?\)"):
        upcycle.to_qdelta(params, CFG, lam_init=1.0)
    soft = lm.get_preset("tiny", mixer="softmax")
    with pytest.raises(ValueError, match="no deltanet / gated_deltanet / kda layer"):
        upcycle.to_qdelta(init_lm(jax.random.key(0), soft)[0], soft)
    with pytest.raises(ValueError, match=r"mix_init must be in \(0(\.0)?, 1(\.0)?\)"):
        upcycle.to_star(params, state, CFG, mix_init=1.0)
    dense = lm.get_preset("tiny", ffn="dense")
    with pytest.raises(ValueError, match="needs MoE layers"):
        upcycle.to_star(*init_lm(jax.random.key(0), dense), dense)
    ec = lm.get_preset("tiny", moe=dict(router="expert_choice"))
    with pytest.raises(ValueError, match="upcycles a 'topk' router, got 'expert_choice'"):
        upcycle.to_star(*init_lm(jax.random.key(0), ec), ec)


def test_kda_upcycles_to_qdelta_with_its_per_channel_gate():
    """Kimi Linear's KDA layers become kda_qdelta (gated Q-Delta with KDA's gate), starting at
    λ ≈ 0 where the KDA model was."""
    cfg = lm.get_preset("tiny", layer_mixers=("kda", "mla"), mla_kv_lora_rank=16)
    params, state = init_lm(jax.random.key(0), cfg)
    toks = jax.random.randint(jax.random.key(1), (2, 24), 0, 256, dtype=jnp.int32)
    new_cfg, new = upcycle.to_qdelta(params, cfg, lam_init=1e-4)
    assert new_cfg.mixers == ("kda_qdelta", "mla")
    diff = upcycle.logit_difference(params, state, cfg, new, state, new_cfg, toks)
    assert diff["max_rel"] < 1e-3 + 1e-6, diff
