"""The KDA mixer (`mode="kda"`, Kimi Linear's Kimi Delta Attention; `"kda_qdelta"`, gated
Q-Delta with its per-channel gate): parameters and options, equality with transformers'
`KimiLinearDeltaAttention` on copied weights, and bad configs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.layers import delta_mixer as dm
from moejax.testing import assert_close

H, DK, D = 2, 8, 24


def _cfg(mode="kda", **kw):
    return dm.DeltaMixerConfig(d_model=D, num_heads=H, head_dim=DK, expand_v=1.0, mode=mode,
                               chunk_size=16, **kw)


@pytest.mark.parametrize("mode", dm.CHANNEL_DECAY_MODES)
def test_parameters_and_per_channel_decay(mode):
    cfg = _cfg(mode)
    assert cfg.decay_rank == DK and cfg.gate_rank == DK and cfg.output_gate == "sigmoid"
    p = dm.init(jax.random.key(0), cfg)
    shapes = {n: p[n].shape for n in ("w_f_a", "w_f_b", "A_log", "dt_bias", "w_og_a", "w_og_b")}
    assert shapes == {"w_f_a": (D, DK), "w_f_b": (DK, H * DK), "A_log": (H,),
                      "dt_bias": (H * DK,), "w_og_a": (D, DK), "w_og_b": (DK, H * DK)}
    assert "w_a" not in p and "w_og" not in p and ("w_lam" in p) == (mode == "kda_qdelta")
    x = jax.random.normal(jax.random.key(1), (2, 9, D))
    f, _ = dm._features(p, x, None, cfg)
    assert f["g"] is None and f["gk"].shape == (2, 9, H, DK)
    gk = np.asarray(f["gk"])
    assert (gk < 0).all() and gk.std(axis=-1).min() > 0  # a decay that differs per channel


def test_ranks_and_gate_are_options():
    cfg = _cfg(decay_rank=3, gate_rank=0, output_gate="silu")
    p = dm.init(jax.random.key(0), cfg)
    assert p["w_f_a"].shape == (D, 3) and p["w_og"].shape == (D, H * DK) and "w_og_a" not in p
    gdn = dm.DeltaMixerConfig(d_model=D, num_heads=H, head_dim=DK, mode="gated_deltanet",
                              gate_rank=4, output_gate="sigmoid")
    q = dm.init(jax.random.key(0), gdn)
    assert q["w_og_a"].shape == (D, 4)
    y, _ = dm.apply(q, jnp.ones((1, 5, D)), cfg=gdn)
    assert np.isfinite(np.asarray(y)).all()


@pytest.mark.parametrize("over,match", [
    ({"mode": "gated_deltanet", "decay_rank": 4}, r"decay_rank .*only for modes"),
    ({"decay_rank": 0}, r"decay_rank"),
    ({"gate_rank": -1}, r"gate_rank"),
    ({"output_gate": "relu"}, r"output_gate"),
    ({"mode": "kda_qdelta", "pairing": "authors", "chunk_size": 64},
     r"pairing='authors'.*per-channel decay"),
])
def test_bad_kda_config_is_refused(over, match):
    kw = {"d_model": D, "num_heads": H, "head_dim": DK, "mode": "kda", **over}
    with pytest.raises(ValueError, match=match):
        dm.DeltaMixerConfig(**kw)


def _to_torch_layer(params, cfg):
    """transformers' KimiLinearDeltaAttention with the mixer's weights copied in."""
    torch = pytest.importorskip("torch")
    kimi = pytest.importorskip("transformers.models.kimi_linear.modeling_kimi_linear")
    from transformers import KimiLinearConfig

    hf_cfg = KimiLinearConfig(hidden_size=D, num_hidden_layers=1, vocab_size=32,
                              linear_attn_config={"head_dim": DK, "num_heads": H,
                                                  "short_conv_kernel_size": cfg.conv_size},
                              rms_norm_eps=cfg.norm_eps, layer_types=["linear_attention"])
    layer = kimi.KimiLinearDeltaAttention(hf_cfg, 0).double()
    t = lambda a: torch.tensor(np.asarray(a, np.float64))
    sd = {"q_proj.weight": t(params["w_q"]).T, "k_proj.weight": t(params["w_k"]).T,
          "v_proj.weight": t(params["w_v"]).T,
          "conv1d.weight": torch.cat([t(params[c]["w"]).T for c in ("conv_q", "conv_k",
                                                                     "conv_v")])[:, None],
          "forget_gate.f_a_proj.weight": t(params["w_f_a"]).T,
          "forget_gate.f_b_proj.weight": t(params["w_f_b"]).T,
          "forget_gate.dt_bias": t(params["dt_bias"]),
          "forget_gate.A_log": t(params["A_log"]).reshape(1, 1, H, 1),
          "b_proj.weight": t(params["w_beta"]).T,
          "g_a_proj.weight": t(params["w_og_a"]).T, "g_b_proj.weight": t(params["w_og_b"]).T,
          "o_norm.weight": t(params["o_norm"]["scale"]), "o_proj.weight": t(params["w_out"]).T}
    layer.load_state_dict(sd, strict=True)
    return torch, layer


def test_kda_equals_transformers_kimi_delta_attention():
    """Same weights, same input: the mixer's output is transformers' (float64 torch, the chunk
    form of its PyTorch fallback) to float32 precision, for T not a multiple of 64."""
    cfg = _cfg(init_std=0.2)
    params = dm.init(jax.random.key(3), cfg)
    x = jax.random.normal(jax.random.key(4), (2, 70, D))
    y, _ = dm.apply(params, x, cfg=cfg)
    torch, layer = _to_torch_layer(params, cfg)
    with torch.no_grad():
        ref = layer(torch.tensor(np.asarray(x, np.float64))).numpy()
    assert_close("y", jnp.asarray(ref, jnp.float32), y, ratio=1e-4)
