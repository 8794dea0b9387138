"""The decoder LM: positions, losses, presets, configs and bad input (decoding:
tests/models/test_decode.py)."""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moejax.models import decode, lm
from moejax.testing import init_lm


def _tokens(B=2, T=21, seed=1):
    return jax.random.randint(jax.random.key(seed), (B, T), 0, 256, dtype=jnp.int32)


HYBRID = dict(layer_mixers=("gated_deltanet", "gated_softmax"), num_key_heads=1,
              num_kv_heads=1, qk_norm=True, rotary_fraction=0.5, zero_centered_norm=True,
              layer_ffns=("dense", "moe"), dense_d_ff=48, moe=dict(num_shared=1, shared_gate=True))


def test_logits_at_positions_equal_full_logits():
    cfg = lm.get_preset("tiny")
    params, state = init_lm(jax.random.key(0), cfg)
    toks = _tokens()
    full, _, _ = lm.apply(params, state, toks, cfg=cfg)
    pos = jnp.array([[0, 5, 20], [3, 3, 7]])
    part, _, _ = lm.apply(params, state, toks, cfg=cfg, positions=pos)
    np.testing.assert_allclose(np.asarray(part),
                               np.asarray(jnp.take_along_axis(full, pos[..., None], 1)),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("preset_kw", [
    pytest.param(dict(), id="qdelta-moe"),
    pytest.param(dict(mixer="gated_softmax", ffn="dense"), id="gated_softmax-dense",
                 marks=pytest.mark.slow),  # both pieces train in the notebooks and hybrid tests
    pytest.param(dict(moe=dict(router="star"), dtype="bfloat16"), id="star-bf16")])
def test_tiny_loss_drops_in_30_steps(preset_kw):
    cfg = lm.get_preset("tiny", **preset_kw)
    params, state = init_lm(jax.random.key(0), cfg)
    opt = optax.adam(3e-3)
    opt_state = opt.init(params)
    # A repeated periodic byte pattern: learnable in a few steps.
    pattern = jnp.tile(jnp.arange(7, dtype=jnp.int32) * 13 % 256, 10)[:33]
    toks = jnp.stack([jnp.roll(pattern, i) for i in range(4)])
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:]}

    @jax.jit
    def train_step(params, state, opt_state, i):
        (loss, (state, _)), grads = jax.value_and_grad(
            lambda p: lm.loss_fn(p, state, batch, cfg=cfg, train=True,
                                 rng=jax.random.fold_in(jax.random.key(3), i)), has_aux=True)(
            params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), state, opt_state, loss

    losses = []
    for i in range(30):
        params, state, opt_state, loss = train_step(params, state, opt_state, i)
        losses.append(float(loss))
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.5 * losses[0], losses


def test_router_state_updates_in_training():
    cfg = lm.get_preset("tiny", moe=dict(router="star"))
    params, state = init_lm(jax.random.key(0), cfg)
    batch = {"inputs": _tokens(T=16), "targets": _tokens(T=16, seed=2)}
    loss_fn = jax.jit(lm.loss_fn, static_argnames=("cfg", "train"))
    _, (new_state, metrics) = loss_fn(params, state, batch, cfg=cfg, train=True)
    assert metrics["load"].shape == (cfg.num_layers, cfg.moe.num_experts)
    v0, v1 = state["blocks"][0]["router"]["v"], new_state["blocks"][0]["router"]["v"]
    assert not np.allclose(np.asarray(v0), np.asarray(v1))
    _, (eval_state, _) = loss_fn(params, state, batch, cfg=cfg, train=False)
    np.testing.assert_array_equal(np.asarray(eval_state["blocks"][0]["router"]["v"]),
                                  np.asarray(v0))


def test_loss_mask_restricts_the_loss():
    cfg = lm.get_preset("tiny", ffn="dense")
    params, state = init_lm(jax.random.key(0), cfg)
    toks = _tokens(T=12)
    mask = jnp.zeros((2, 12)).at[:, 4].set(1.0)
    batch = {"inputs": toks, "targets": toks, "loss_mask": mask}
    loss, _ = jax.jit(lm.loss_fn, static_argnames=("cfg", "train"))(params, state, batch,
                                                                      cfg=cfg, train=False)
    logits, _, _ = jax.jit(lm.apply, static_argnames="cfg")(params, state, toks, cfg=cfg)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, 4], toks[:, 4])
    np.testing.assert_allclose(float(loss), float(jnp.mean(ce)), rtol=1e-6)


def test_presets_build():
    for name in lm.PRESETS:
        cfg = lm.get_preset(name)
        assert cfg.to_dict()["d_model"] == cfg.d_model


def _param_count(cfg):
    return lm.num_params(jax.eval_shape(lambda: lm.init(jax.random.key(0), cfg)[0]))


@pytest.mark.parametrize("name, d, head_dim, d_ff, lo, hi", [
    ("340m", 1024, 128, 2816, 3.6e8, 4.2e8),
    ("1b", 2048, 256, 5632, 1.3e9, 1.45e9),
])
def test_paper_presets_are_the_authors_configs(name, d, head_dim, d_ff, lo, hi):
    """psmiz/Q-Delta configs/qdelta_{340M,1B}.json: gated Q-Delta, 21 layers, 6 heads, expand_v
    2, SwiGLU of fla's width (4d · 2/3 rounded up to 256), untied embeddings, vocab 32000."""
    cfg = lm.get_preset(name)
    assert (cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.value_dim) == (
        d, 21, 6, head_dim, 2 * head_dim)
    assert cfg.mixers == ("gated_qdelta",) * 21 and cfg.ffns == ("dense",) * 21
    assert d_ff == 256 * -(-int(4 * d * 2 / 3) // 256) == cfg.d_ff
    assert (cfg.tie_embeddings, cfg.vocab_size, cfg.init_std, cfg.norm_eps) == (
        False, 32000, 0.02, 1e-6)
    assert not cfg.learnable_lam_bias and cfg.a_init_min == 0.0
    n = _param_count(cfg)
    # Per layer: q, k (d·6·Dk each), v, g, o (d·6·2Dk each), β, λ, a (d·6 each), 3 convs,
    # o-norm, A_log, dt_bias, two norms and the SwiGLU; plus embed, unembed and final norm.
    key_dim = 6 * head_dim
    per_layer = (2 * d * key_dim + 3 * d * 2 * key_dim + 3 * d * 6 + 4 * (2 * key_dim
                 + 2 * key_dim) + 2 * head_dim + 12 + 2 * d + 3 * d * d_ff)
    assert n == 21 * per_layer + 2 * 32000 * d + d
    assert lo < n < hi, n
    assert _param_count(lm.get_preset(name, vocab_size=256)) == n - 2 * (32000 - 256) * d


def test_init_std_sets_every_projection_and_the_embedding():
    """Default N(0, 0.02²) everywhere (the authors'); `init_std=None` is the fan-in init (with
    the embedding kept at N(0, 0.02²), as moejax had it)."""
    cfg = lm.LMConfig(vocab_size=512, d_model=256, num_layers=1, num_heads=2, head_dim=64,
                      mixer="gated_qdelta", ffn="dense", d_ff=512, tie_embeddings=False)
    assert cfg.init_std == 0.02 and cfg.mixer_config(0).init_std == 0.02
    params, _ = lm.init(jax.random.key(0), cfg)
    block = params["blocks"][0]
    for name, w in [("embed", params["embed"]), ("unembed", params["unembed"]),
                    ("mixer.w_v", block["mixer"]["w_v"]), ("ffn.w_down", block["ffn"]["w_down"]),
                    ("conv", block["mixer"]["conv_v"]["w"])]:
        np.testing.assert_allclose(float(jnp.std(w)), 0.02, rtol=0.05, err_msg=name)
    fan = cfg.replace(init_std=None)
    assert fan.mixer_config(0).init_std is None
    p2, _ = lm.init(jax.random.key(0), fan)
    np.testing.assert_allclose(float(jnp.std(p2["embed"])), 0.02, rtol=0.05)
    np.testing.assert_allclose(float(jnp.std(p2["unembed"])), 256**-0.5, rtol=0.05)
    np.testing.assert_allclose(float(jnp.std(p2["blocks"][0]["ffn"]["w_down"])), 512**-0.5,
                               rtol=0.05)
    attn_cfg = lm.LMConfig(mixer="softmax", ffn="dense", init_std=0.05)
    assert attn_cfg.mixer_config(0).init_std == 0.05
    with pytest.raises(ValueError, match="init_std must be in"):
        lm.LMConfig(init_std=0.0)
    with pytest.raises(ValueError, match="a_init_min must be in"):
        lm.LMConfig(a_init_min=20.0)


def test_configs_saved_before_the_init_fields_load_as_they_were_built(tmp_path):
    """A config saved without `init_std` / `a_init_min` / `learnable_lam_bias` is read with the
    values its model had (fan-in init, A ~ U(1, 16), a trained λ bias `b_lam`), so a Q-Delta
    model directory of that time loads; a config saved now round-trips unchanged."""
    from moejax.train import checkpoint as ckpt_lib

    now = lm.get_preset("tiny", mixer="gated_qdelta")
    assert lm.LMConfig.from_dict(json.loads(json.dumps(now.to_dict()))) == now
    old = now.replace(init_std=None, a_init_min=1.0, learnable_lam_bias=True)
    params, state = init_lm(jax.random.key(0), old)
    assert "b_lam" in params["blocks"][0]["mixer"]
    directory = ckpt_lib.save_model(tmp_path / "m", old, params, state)
    meta = json.loads((directory / ckpt_lib.MODEL_CONFIG).read_text())
    for name in ("init_std", "a_init_min", "learnable_lam_bias"):
        meta["model"].pop(name)
    (directory / ckpt_lib.MODEL_CONFIG).write_text(json.dumps(meta))
    got, loaded, _, _ = ckpt_lib.load_model(directory, lm.LMConfig, lm.init)
    assert got == old
    np.testing.assert_array_equal(np.asarray(loaded["blocks"][0]["mixer"]["b_lam"]),
                                  np.asarray(params["blocks"][0]["mixer"]["b_lam"]))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: lm.get_preset("huge"), "Unknown preset 'huge'"),
        (lambda: lm.get_preset("tiny", mixer="mamba"), "mixer must be one of"),
        (lambda: lm.get_preset("tiny", moe=dict(router="nope")), "(?i)unknown router 'nope'"),
        (lambda: lm.get_preset("tiny", ffn="conv"), "ffn must be one of"),
        (lambda: lm.get_preset("tiny", dtype="float16"), "dtype must be one of"),
        (lambda: lm.get_preset("tiny", d_model=0), "d_model must be >= 1"),
        (lambda: lm.get_preset("tiny", layer_mixers=("softmax",)),
         r"layer_mixers must list one entry per layer \(num_layers=2\), got 1"),
        (lambda: lm.get_preset("tiny", layer_ffns=("moe", "conv")), "layer_ffns must be one of"),
        (lambda: lm.get_preset("tiny", mixer="softmax", num_kv_heads=3),
         "num_kv_heads=3 must divide num_heads=2"),
        (lambda: lm.get_preset("tiny", num_key_heads=3), "num_key_heads=3 must divide num_heads=2"),
        (lambda: lm.get_preset("tiny", rotary_fraction=1.5), r"rotary_fraction must be in"),
    ],
)
def test_config_rejects(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_apply_rejects_long_or_float_sequences():
    cfg = lm.get_preset("tiny", max_seq_len=16)
    params, state = init_lm(jax.random.key(0), cfg)
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len=16"):
        lm.apply(params, state, _tokens(T=17), cfg=cfg)
    with pytest.raises(ValueError, match="tokens must be integers"):
        lm.apply(params, state, jnp.ones((2, 4)), cfg=cfg)


# Key/value head dims whose ratio is not exact in binary: dv / dk * dk != dv in floats.
ODD_HEAD_DIMS = [(22, 30), (7, 29), (11, 15)]


@pytest.mark.parametrize("dk,dv", ODD_HEAD_DIMS, ids=[f"Dk{a}-Dv{b}" for a, b in ODD_HEAD_DIMS])
def test_value_head_dim_is_exact_for_any_pair(dk, dv):
    assert (dv / dk) * dk != dv  # the float route alone would not give an integer
    base = dict(mixer="gated_deltanet", ffn="dense", head_dim=dk, num_key_heads=1)
    cfg = lm.get_preset("tiny", **base, value_head_dim=dv)
    assert cfg.value_dim == cfg.mixer_config(0).value_dim == dv
    assert cfg.expand_v == dv / dk
    shapes = jax.eval_shape(lambda: init_lm(jax.random.key(0), cfg)[0])
    assert shapes["blocks"][0]["mixer"]["w_v"].shape == (cfg.d_model, cfg.num_heads * dv)
    # The ratio alone (how older configs stored it) now rounds to the same integer.
    old = lm.get_preset("tiny", **base, expand_v=dv / dk)
    assert old.value_dim == dv
    # JSON round trip (to_dict -> from_dict) is exact, and an old saved dict without the
    # value_head_dim key still loads.
    assert lm.LMConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    saved = {k: v for k, v in old.to_dict().items() if k != "value_head_dim"}
    assert lm.LMConfig.from_dict(saved) == old


def test_value_head_dim_disagreeing_with_expand_v_is_refused():
    with pytest.raises(ValueError, match="expand_v=3.0 and value_head_dim=30 disagree"):
        lm.get_preset("tiny", head_dim=22, value_head_dim=30, expand_v=3.0)
    # A changed head_dim with a kept value_head_dim re-derives expand_v only if it agrees.
    cfg = lm.get_preset("tiny", head_dim=22, value_head_dim=30)
    with pytest.raises(ValueError, match="disagree"):
        dataclasses.replace(cfg, head_dim=16)
    assert dataclasses.replace(cfg, head_dim=16, expand_v=30 / 16).value_dim == 30


@pytest.mark.parametrize("bad", [256, -1], ids=["too-large", "negative"])
def test_out_of_range_tokens(bad):
    """Eager calls refuse them; under jit `apply` clamps them (documented) and `checked_apply`
    reports them."""
    cfg = lm.get_preset("tiny", ffn="dense", mixer="softmax", num_layers=1)
    params, state = init_lm(jax.random.key(0), cfg)
    toks = jnp.array([[5, bad, 7]], jnp.int32)
    with pytest.raises(ValueError, match=r"tokens must be in \[0, vocab_size=256\)"):
        lm.apply(params, state, toks, cfg=cfg)
    with pytest.raises(ValueError, match=r"prompt must be in \[0, vocab_size=256\)"):
        decode.generate(params, state, toks, cfg=cfg, key=jax.random.key(0), max_new_tokens=1)
    fwd = jax.jit(lambda t: lm.apply(params, state, t, cfg=cfg)[0])
    clamped = jnp.array([[5, 255 if bad > 0 else 0, 7]], jnp.int32)
    np.testing.assert_array_equal(np.asarray(fwd(toks)), np.asarray(fwd(clamped)))
    err, (logits, _, _) = jax.jit(functools.partial(lm.checked_apply, cfg=cfg))(
        params, state, toks)
    with pytest.raises(ValueError, match=rf"tokens must be in \[0, vocab_size=256\), got ids "
                                         rf"from {min(bad, 5)} to {max(bad, 7)}"):
        err.throw()
    err, _ = jax.jit(functools.partial(lm.checked_apply, cfg=cfg))(params, state, clamped)
    assert err.get() is None


def test_out_of_range_positions_give_nan_under_jit():
    cfg = lm.get_preset("tiny", ffn="dense", mixer="softmax", num_layers=1)
    params, state = init_lm(jax.random.key(0), cfg)
    toks = _tokens(T=6)
    pos = jnp.array([[0, 6], [-1, 5]])
    with pytest.raises(ValueError, match=r"positions must be in \[0, T=6\)"):
        lm.apply(params, state, toks, cfg=cfg, positions=pos)
    out = jax.jit(lambda p: lm.apply(params, state, toks, cfg=cfg, positions=p)[0])(pos)
    finite = np.isfinite(np.asarray(out)).all(-1)
    np.testing.assert_array_equal(finite, [[True, False], [False, True]])


def test_run_saved_before_value_head_dim_resumes(tmp_path):
    """A config saved before `value_head_dim` existed (the key absent) compares equal to today's
    config of the same model, so its run resumes; its model directory loads."""
    from moejax.train import checkpoint as ckpt_lib

    cfg = lm.get_preset("tiny", mixer="qdelta")
    saved = ckpt_lib.config_to_json(cfg)
    saved.pop("value_head_dim")
    assert ckpt_lib.config_differences(saved, ckpt_lib.config_to_json(cfg)) == []
    params, state = init_lm(jax.random.key(0), cfg)
    directory = ckpt_lib.save_model(tmp_path / "m", cfg, params, state)
    meta = json.loads((directory / ckpt_lib.MODEL_CONFIG).read_text())
    meta["model"].pop("value_head_dim")
    (directory / ckpt_lib.MODEL_CONFIG).write_text(json.dumps(meta))
    got, _, _, _ = ckpt_lib.load_model(directory, lm.LMConfig, lm.init)
    assert got == cfg


def test_moe_options_nest_with_the_lm_widths():
    """`moe` is a MoEConfig whose widths are the LM's; a dict gives the other options."""
    from moejax.moe.layer import MoEConfig

    assert lm.LMConfig().moe == MoEConfig(d_model=128, d_ff=256, num_experts=8)
    cfg = lm.LMConfig(d_model=64, d_ff=96, moe=dict(num_experts=4, top_k=1, router="star"))
    assert cfg.moe == MoEConfig(d_model=64, d_ff=96, num_experts=4, top_k=1, router="star")
    assert lm.LMConfig(d_model=64, d_ff=96, moe=cfg.moe) == cfg
    assert lm.LMConfig(ffn="dense").moe is None  # no MoE layer, no options given
    assert lm.LMConfig(ffn="dense", moe=dict(num_experts=4)).moe.num_experts == 4
    with pytest.raises(ValueError, match="moe: d_model=64, d_ff=96 must equal the LM's"):
        lm.LMConfig(moe=cfg.moe)
    with pytest.raises(ValueError, match="moe: d_model=8 must equal the LM's d_model=128"):
        lm.LMConfig(moe=dict(d_model=8))
    with pytest.raises(ValueError, match="moe: unknown MoEConfig field.*num_expert;"):
        lm.LMConfig(moe=dict(num_expert=4))
    with pytest.raises(ValueError, match="moe: .*top_k=9 must be <= num_experts=8"):
        lm.LMConfig(moe=dict(top_k=9))
    with pytest.raises(TypeError, match="moe must be a MoEConfig, a dict"):
        lm.LMConfig(moe="topk")
    # No attribute but the declared fields; the mixer configs are built on demand.
    assert set(vars(cfg)) == {f.name for f in dataclasses.fields(lm.LMConfig)}
    assert set(vars(cfg.moe)) == {f.name for f in dataclasses.fields(MoEConfig)}
    assert set(lm.MIXER_MODULES) == set(lm.MIXERS)
    assert cfg.mixer_config(0) is cfg.mixer_config(1)


def test_replace_keeps_moe_in_step():
    cfg = lm.get_preset("tiny", moe=dict(router="star"))
    assert (cfg.moe.num_experts, cfg.moe.router) == (4, "star")  # the preset's options updated
    wide = cfg.replace(d_model=48, d_ff=80)
    assert (wide.moe.d_model, wide.moe.d_ff, wide.moe.router) == (48, 80, "star")
    with pytest.raises(ValueError, match="LMConfig.replace"):
        dataclasses.replace(cfg, d_model=48)
    topk = cfg.replace(moe=dict(router="topk", top_k=1))
    assert (topk.moe.num_experts, topk.moe.router, topk.moe.top_k) == (4, "topk", 1)
    assert cfg.replace(ffn="dense", moe=None).moe is None
    assert lm.get_preset("340m").replace(num_layers=2).moe is None


def _flat(cfg: lm.LMConfig) -> dict:
    """`cfg` as configs were saved before `moe` nested: the MoE options at the top level."""
    d = cfg.to_dict()
    moe = d.pop("moe")
    d.update({k: moe[k] for k in lm.FLAT_MOE_FIELDS})
    return json.loads(json.dumps(d))


@pytest.mark.parametrize("name", ["tiny", "hybrid", "demo"])
def test_old_flat_configs_load_and_compare_equal(name):
    from moejax.train import checkpoint as ckpt_lib

    cfg = lm.get_preset(name)
    assert cfg.to_dict() == ckpt_lib.config_to_json(cfg)  # what checkpoints save
    assert lm.LMConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    old = _flat(cfg)
    assert "moe" not in old and old["num_experts"] == cfg.moe.num_experts
    assert lm.LMConfig.from_dict(old, source="run/model_config.json") == cfg
    # Upgraded through from_dict, an old saved config has no differences from today's.
    upgraded = ckpt_lib.config_to_json(lm.LMConfig.from_dict(old))
    assert ckpt_lib.config_differences(upgraded, ckpt_lib.config_to_json(cfg)) == []
    # Missing flat fields take the old defaults (8 experts, top-2).
    partial = {k: v for k, v in old.items() if k not in ("num_experts", "top_k")}
    assert lm.LMConfig.from_dict(partial).moe.num_experts == 8
    with pytest.raises(ValueError, match="run.json: holds both 'moe' and the old top-level"):
        lm.LMConfig.from_dict({**old, "moe": None}, source="run.json")
    with pytest.raises(ValueError, match="run.json: moe: .*num_expert"):
        lm.LMConfig.from_dict({**cfg.to_dict(), "moe": {"num_expert": 2}}, source="run.json")


def test_old_flat_dense_config_with_unchecked_moe_fields_loads():
    """Dense models never checked their MoE fields together (e.g. top_k > num_experts)."""
    cfg = lm.get_preset("tiny", ffn="dense", moe=None)
    old = {**cfg.to_dict(), "num_experts": 1, "top_k": 4}
    old.pop("moe")
    assert lm.LMConfig.from_dict(old) == cfg
    valid = {**old, "top_k": 1}
    assert lm.LMConfig.from_dict(valid).moe.num_experts == 1
    with pytest.raises(ValueError, match="top_k=4 must be <= num_experts=1"):
        lm.LMConfig.from_dict({**old, "ffn": "moe"})


def test_ffn_none_blocks_are_the_mixer_alone():
    """ffn="none" (Zoology's MQAR models): no FFN sublayer and no second norm; the forward pass
    equals the blocks applied by hand and decoding equals it token by token."""
    cfg = lm.LMConfig(d_model=32, num_layers=2, num_heads=2, head_dim=16, ffn="none",
                      layer_mixers=("gated_deltanet", "softmax"), chunk_size=16, max_seq_len=32)
    assert cfg.moe is None
    params, state = init_lm(jax.random.key(0), cfg)
    assert [set(b) for b in params["blocks"]] == [{"norm1", "mixer"}] * 2
    toks = _tokens(T=12)
    logits, new_state, _ = lm.apply(params, state, toks, cfg=cfg)
    h = lm.embed(params, toks, cfg)
    for i, block in enumerate(params["blocks"]):
        h = h + lm.mixer_apply(block["mixer"], lm.norm(block["norm1"], h, cfg), cfg, i)[0]
    want = lm.logits_from_hidden(params, lm.norm(params["final_norm"], h, cfg), cfg)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert new_state == state
    cache = decode.init_cache(cfg, 2)
    _, cache = decode.prefill(params, state, toks[:, :8], cache, cfg=cfg)
    for t in range(8, 12):
        step_logits, cache = decode.decode_step(params, state, toks[:, t], cache, cfg=cfg)
        np.testing.assert_allclose(np.asarray(step_logits), np.asarray(logits[:, t]),
                                   rtol=2e-4, atol=2e-4)
    from moejax.interop import hf_config

    moe_cfg = lm.get_preset("tiny", mixer="softmax", layer_ffns=("moe", "none"),
                            moe=dict(router_kwargs={"renormalize": True}))
    with pytest.raises(ValueError, match=r"layers without FFN \(ffn='none'\)"):
        hf_config.hf_config_from_lm(moe_cfg, "mixtral")


def test_delta_pairing_is_validated_by_name_and_reaches_the_mixers():
    with pytest.raises(ValueError, match="delta_pairing must be one of"):
        lm.LMConfig(delta_pairing="authorz")
    cfg = lm.LMConfig(mixer="gated_qdelta", delta_pairing="authors")
    assert cfg.mixer_config(0).pairing == "authors"
