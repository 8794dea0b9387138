"""Multi-head latent attention: equal to transformers' DeepSeek-V3 and Kimi Linear attention on
copied weights; the latent-cache decode (absorbed W_kvb) equals the full forward; bad configs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.layers import mla
from moejax.testing import RATIO_F32, assert_close

D, H = 24, 3


def _cfg(**kw):
    base = dict(d_model=D, num_heads=H, kv_lora_rank=10, q_lora_rank=7, qk_nope_head_dim=6,
                qk_rope_head_dim=4, v_head_dim=5, init_std=0.2)
    return mla.MLAConfig(**{**base, **kw})


def _torch_weights(params, cfg):
    torch = pytest.importorskip("torch")
    vec = lambda a: torch.tensor(np.asarray(a, np.float64))
    t = lambda a: vec(a).T
    sd = {"kv_a_proj_with_mqa.weight": t(params["w_kv_a"]),
          "kv_a_layernorm.weight": vec(params["kv_a_norm"]["scale"]),
          "kv_b_proj.weight": t(params["w_kv_b"]), "o_proj.weight": t(params["w_out"])}
    if cfg.q_lora_rank is None:
        sd["q_proj.weight"] = t(params["w_q"])
    else:
        sd.update({"q_a_proj.weight": t(params["w_q_a"]),
                   "q_a_layernorm.weight": vec(params["q_a_norm"]["scale"]),
                   "q_b_proj.weight": t(params["w_q_b"])})
    return torch, sd


def _hf_kwargs(cfg):
    return dict(hidden_size=D, num_attention_heads=H, num_key_value_heads=H,
                kv_lora_rank=cfg.kv_lora_rank, q_lora_rank=cfg.q_lora_rank,
                qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
                v_head_dim=cfg.v_head_dim, attn_implementation="eager")


def _causal(torch, T):
    return torch.triu(torch.full((T, T), -1e30, dtype=torch.float64), 1)[None, None]


@pytest.mark.parametrize("q_lora_rank,rope", [(7, "interleave"), (None, "interleave"),
                                              (7, "half")])
def test_equals_transformers_deepseek_v3_attention(q_lora_rank, rope):
    ds = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
    from transformers import DeepseekV3Config

    cfg = _cfg(q_lora_rank=q_lora_rank, rope=rope)
    params = mla.init(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (2, 11, D))
    y, _ = mla.apply(params, x, cfg=cfg)
    torch, sd = _torch_weights(params, cfg)
    hf_cfg = DeepseekV3Config(**_hf_kwargs(cfg), rope_interleave=rope == "interleave",
                              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    layer = ds.DeepseekV3Attention(hf_cfg, 0).double()
    layer.load_state_dict(sd, strict=True)
    xt = torch.tensor(np.asarray(x, np.float64))
    pos = torch.arange(11)[None].expand(2, -1)
    cos, sin = ds.DeepseekV3RotaryEmbedding(hf_cfg)(xt, pos)
    with torch.no_grad():
        ref = layer(xt, (cos.double(), sin.double()), _causal(torch, 11))[0].numpy()
    assert_close("y", jnp.asarray(ref, jnp.float32), y, ratio=1e-5)


def test_equals_transformers_kimi_linear_attention():
    kimi = pytest.importorskip("transformers.models.kimi_linear.modeling_kimi_linear")
    from transformers import KimiLinearConfig

    cfg = _cfg(rope="none")
    params = mla.init(jax.random.key(2), cfg)
    x = jax.random.normal(jax.random.key(3), (2, 9, D))
    y, _ = mla.apply(params, x, cfg=cfg)
    torch, sd = _torch_weights(params, cfg)
    kw = _hf_kwargs(cfg)
    kw.pop("attn_implementation")
    hf_cfg = KimiLinearConfig(**kw, num_hidden_layers=1, layer_types=["full_attention"])
    hf_cfg._attn_implementation = "eager"
    layer = kimi.KimiLinearAttention(hf_cfg, 0).double()
    layer.load_state_dict(sd, strict=True)
    with torch.no_grad():
        ref = layer(torch.tensor(np.asarray(x, np.float64)), _causal(torch, 9))[0].numpy()
    assert_close("y", jnp.asarray(ref, jnp.float32), y, ratio=1e-5)


@pytest.mark.parametrize("rope", mla.ROPE_LAYOUTS)
def test_latent_cache_prefill_and_decode_equal_full(rope):
    cfg = _cfg(rope=rope, v_head_dim=12)  # Dv > Dn + Dr: the padded full path
    params = mla.init(jax.random.key(4), cfg)
    x = jax.random.normal(jax.random.key(5), (2, 20, D))
    y, _ = mla.apply(params, x, cfg=cfg)
    cache = mla.init_cache(cfg, 2, 32)
    assert cache["c"].shape[-1] + cache["k_rope"].shape[-1] == cfg.cache_width == 14
    y1, cache = mla.apply(params, x[:, :13], cfg=cfg, cache=cache)
    ys = [y1]
    step = jax.jit(lambda p, xt, c: mla.apply(p, xt, cfg=cfg, cache=c))
    for t in range(13, 20):
        yt, cache = step(params, x[:, t:t + 1], cache)
        ys.append(yt)
    assert int(cache["pos"]) == 20
    assert_close("decode", y, jnp.concatenate(ys, axis=1), ratio=RATIO_F32)


def test_segment_ids_keep_documents_apart():
    cfg = _cfg()
    params = mla.init(jax.random.key(6), cfg)
    x = jax.random.normal(jax.random.key(7), (1, 16, D))
    seg = jnp.array([[0] * 9 + [1] * 7])
    y, _ = mla.apply(params, x, cfg=cfg, segment_ids=seg)
    a, _ = mla.apply(params, x[:, :9], cfg=cfg)
    # The second document alone starts at position 0: rotary scores depend on distance only.
    b, _ = mla.apply(params, x[:, 9:], cfg=cfg)
    assert_close("doc 0", a, y[:, :9], ratio=RATIO_F32)
    assert_close("doc 1", b, y[:, 9:], ratio=RATIO_F32)


@pytest.mark.parametrize("over,match", [
    ({"qk_rope_head_dim": 3}, "qk_rope_head_dim must be even"),
    ({"qk_nope_head_dim": 0, "qk_rope_head_dim": 0}, "must be >= 1"),
    ({"rope": "yarn"}, "rope"),
    ({"kv_lora_rank": 0}, "kv_lora_rank"),
    ({"q_lora_rank": 0}, "q_lora_rank"),
    ({"softmax_scale": -1.0}, "softmax_scale"),
])
def test_bad_config_is_refused(over, match):
    with pytest.raises(ValueError, match=match):
        _cfg(**over)
