"""Upcycling: GDN → gated Q-Delta and top-k / aux-free (DeepSeek-V3, Kimi Linear) → STAR start
where the original model was; the GHA warm-up moves V onto the layer inputs' principal
subspace; the upcycled models train."""

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
    with pytest.raises(ValueError, match="upcycles a 'topk' or 'aux_free' router, got "
                                         "'expert_choice'"):
        upcycle.to_star(*init_lm(jax.random.key(0), ec), ec)
    with pytest.raises(ValueError, match="r_init must be one of"):
        upcycle.to_star(params, state, CFG, r_init="orthogonal")
    aux_params, aux_state = init_lm(jax.random.key(0), AUX_CFG)
    no_bias = {**aux_state, "blocks": [{**b, "router": {}} for b in aux_state["blocks"]]}
    with pytest.raises(ValueError, match="layer 0: the aux_free router state holds no 'bias'"):
        upcycle.to_star(aux_params, no_bias, AUX_CFG)
    with pytest.raises(ValueError, match="gha_warmup needs STAR routers, got 'aux_free'"):
        upcycle.gha_warmup(aux_params, aux_state, AUX_CFG, [])


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


# ------------------------------------------------ aux-free routers (DeepSeek-V3, Kimi Linear)

AUX_CFG = lm.get_preset("tiny", layer_mixers=("mla", "mla"), mla_kv_lora_rank=16,
                        moe=dict(num_experts=8, top_k=2, router="aux_free", num_shared=1,
                                 router_kwargs={"n_group": 4, "topk_group": 2,
                                                "routed_scaling_factor": 2.5}))


def _with_random_bias(state, seed=3):
    """Router biases drawn (zeros at init), as a trained checkpoint's are."""
    blocks = [{**b, "router": {**b["router"], "bias": 0.1 * jax.random.normal(
        jax.random.key(seed + i), b["router"]["bias"].shape)}} if "bias" in b["router"] else b
        for i, b in enumerate(state["blocks"])]
    return {**state, "blocks": blocks}


def test_aux_free_to_star_keeps_its_selection():
    """Without transformers: STAR takes over the aux-free options and bias, and at σ(a) = 1 in
    float32 the logits are the original's exactly."""
    params, state = init_lm(jax.random.key(0), AUX_CFG)
    state = _with_random_bias(state)
    toks = jax.random.randint(jax.random.key(1), (2, 24), 0, 256, dtype=jnp.int32)
    cfg, new, new_state = upcycle.to_star(params, state, AUX_CFG, mix_init=0.999)
    rk = dict(cfg.moe.router_kwargs)
    assert cfg.moe.router == "star" and rk == {
        "score_fn": "sigmoid", "selection_bias": True, "bias_update_rate": 1e-3, "n_group": 4,
        "topk_group": 2, "renormalize": True, "routed_scaling_factor": 2.5, "eta": 2e-5}
    assert cfg.moe.num_shared == 1 and cfg.moe.top_k == 2
    for i in range(2):
        np.testing.assert_array_equal(new_state["blocks"][i]["router"]["bias"],
                                      state["blocks"][i]["router"]["bias"])
        np.testing.assert_array_equal(new["blocks"][i]["ffn"]["router"]["r"], np.eye(8))
        assert set(params["blocks"][i]["ffn"]["router"]) == {"w_g"}  # inputs untouched
    exact = upcycle.to_star(params, state, AUX_CFG, mix_init=1 - 1e-8)
    assert upcycle.logit_difference(params, state, AUX_CFG, *exact[1:], exact[0],
                                    toks)["max_abs"] == 0.0
    near = upcycle.logit_difference(params, state, AUX_CFG, new, new_state, cfg, toks)
    assert 0 < near["max_rel"] < 1e-2, near


def _hf_tiny(arch):
    """A tiny randomised transformers model of `arch` (its router biases drawn), loaded."""
    torch = pytest.importorskip("torch", reason="needs the 'hf' extra (torch)")
    transformers = pytest.importorskip("transformers", reason="needs the 'hf' extra")
    common = dict(vocab_size=256, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, num_experts_per_tok=2, max_position_embeddings=128,
                  intermediate_size=40, moe_intermediate_size=16, kv_lora_rank=16,
                  qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, first_k_dense_replace=1)
    if arch == "deepseek_v3":
        hf_cfg = transformers.DeepseekV3Config(
            **common, n_routed_experts=8, n_shared_experts=2, n_group=4, topk_group=2,
            q_lora_rank=12, routed_scaling_factor=2.5, rope_interleave=True)
    else:
        hf_cfg = transformers.KimiLinearConfig(
            **common, num_experts=8, num_shared_experts=1, n_group=2, topk_group=1,
            q_lora_rank=None, routed_scaling_factor=2.446, pad_token_id=0, bos_token_id=1,
            eos_token_id=2, linear_attn_config={"head_dim": 8, "num_heads": 2,
                                                "short_conv_kernel_size": 3,
                                                "kda_layers": [1, 2, 4], "full_attn_layers": [3]})
    from tests.interop.test_hf import _randomise  # imports torch: only past the skips above

    torch.manual_seed(0)
    return _randomise(transformers.AutoModelForCausalLM.from_config(
        hf_cfg, attn_implementation="eager"))


@pytest.fixture(scope="module")
def hf_aux_models(tmp_path_factory):
    """arch → (cfg, params, state) of tiny randomised DeepSeek-V3 / Kimi Linear checkpoints."""
    from moejax.interop import load_hf

    out = {}
    for arch in ("deepseek_v3", "kimi_linear"):
        path = tmp_path_factory.mktemp(arch)
        _hf_tiny(arch).save_pretrained(path)
        cfg, params, state, _ = load_hf(path)
        out[arch] = (cfg, params, state)
    return out


def _toks(seed, B=2, T=24):
    return jax.random.randint(jax.random.key(seed), (B, T), 0, 256, dtype=jnp.int32)


@pytest.mark.parametrize("arch", ["deepseek_v3",
                                  pytest.param("kimi_linear", marks=pytest.mark.slow)])
def test_hf_aux_free_upcycles_to_star_where_it_was(hf_aux_models, arch):
    """DeepSeek-V3 / Kimi Linear checkpoints: STAR keeps the checkpoint's router (measured
    max_rel on 4×32 tokens: 0 at σ(a) = 1 in float32; ≈ 5e-5 at mix_init 0.9999 with R = I;
    ≈ 4e-7, float rounding, with r_init="zero" at 0.999)."""
    cfg, params, state = hf_aux_models[arch]
    assert cfg.moe.router == "aux_free"
    toks = _toks(5, 4, 32)
    diff = lambda up: upcycle.logit_difference(params, state, cfg, up[1], up[2], up[0], toks)
    new_cfg, _, new_state = up = upcycle.to_star(params, state, cfg, mix_init=0.9999)
    rc, rk = new_cfg.moe.router_config, cfg.moe.router_config
    assert (rc.score_fn, rc.selection_bias, rc.n_group, rc.topk_group, rc.renormalize,
            rc.routed_scaling_factor, rc.bias_update_rate) == (
        "sigmoid", True, rk.n_group, rk.topk_group, rk.norm_topk_prob, rk.routed_scaling_factor,
        rk.bias_update_rate)
    for i, kind in enumerate(cfg.ffns):
        if kind == "moe":  # the checkpoint's e_score_correction_bias, now STAR's
            bias = np.asarray(state["blocks"][i]["router"]["bias"])
            assert np.abs(bias).max() > 0.01
            np.testing.assert_array_equal(new_state["blocks"][i]["router"]["bias"], bias)
    assert diff(up)["max_rel"] < 1e-3
    assert diff(upcycle.to_star(params, state, cfg, mix_init=1 - 1e-8))["max_abs"] == 0.0
    assert diff(upcycle.to_star(params, state, cfg, mix_init=0.999, r_init="zero"))[
        "max_rel"] < 1e-5
    # The subspace term is live: at σ(a) = 0.5 the model moves measurably.
    assert diff(upcycle.to_star(params, state, cfg, mix_init=0.5))["max_rel"] > 1e-2


@pytest.mark.parametrize("arch,r_init", [
    pytest.param("deepseek_v3", "identity", marks=pytest.mark.slow), ("kimi_linear", "zero")])
def test_hf_aux_free_star_warms_up_and_trains(hf_aux_models, arch, r_init):
    """The GHA warm-up moves only V (the checkpoint's bias stays); then a few SGD steps on the
    LM loss: finite gradients reaching the new router parts (R, a), the loss going down, and the
    aux-free bias update running in training."""
    cfg0, params0, state0 = hf_aux_models[arch]
    cfg, params, state = upcycle.to_star(params0, state0, cfg0, mix_init=0.999, r_init=r_init)
    moe = [i for i, kind in enumerate(cfg.ffns) if kind == "moe"]
    warm = upcycle.gha_warmup(params, state, cfg, [_toks(10 + i) for i in range(4)], eta=1e-2)
    for i in moe:
        old, new = state["blocks"][i]["router"], warm["blocks"][i]["router"]
        assert np.abs(np.asarray(new["v"]) - np.asarray(old["v"])).max() > 1e-4
        np.testing.assert_array_equal(new["bias"], old["bias"])
    diff = upcycle.logit_difference(params0, state0, cfg0, params, warm, cfg, _toks(5, 4, 32))
    if r_init == "zero":  # R = 0: V does not enter the logits yet
        assert diff["max_rel"] < 1e-5, diff
    else:  # (a near-tie flip moves a few logits by O(1): the mean, not the max)
        assert diff["mean_abs"] < 1e-2, diff

    toks = _toks(20, 4, 33)
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:]}

    @jax.jit
    def sgd(params, state):
        (loss, (new_state, _)), g = jax.value_and_grad(lm.loss_fn, has_aux=True)(
            params, state, batch, cfg=cfg, train=True)
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, g), new_state, loss, g

    losses, state = [], warm
    for _ in range(4):
        params, new_state, loss, g = sgd(params, state)
        assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(g))
        for i in moe:
            router = g["blocks"][i]["ffn"]["router"]
            assert all(float(jnp.abs(router[k]).max()) > 0 for k in ("w_g", "r", "a")), i
            assert not np.array_equal(new_state["blocks"][i]["router"]["bias"],
                                      state["blocks"][i]["router"]["bias"])
        losses.append(float(loss))
        state = new_state
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
