"""config.json ↔ LMConfig without transformers: Qwen3-Next key/value head dims whose ratio is not
exact in binary convert, export, load and save exactly (the value head dim is an int)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from moejax.interop import export_hf, hf_config_from_lm, lm_config_from_hf, load_hf
from moejax.models import lm
from moejax.train import checkpoint


def _next_cfg(dk: int, dv: int) -> lm.LMConfig:
    return lm.LMConfig(
        vocab_size=64, d_model=16, num_layers=2, num_heads=2, num_key_heads=1, head_dim=dk,
        value_head_dim=dv, layer_mixers=("gated_deltanet", "gated_softmax"),
        mixer="gated_deltanet", attn_head_dim=8, num_kv_heads=1, qk_norm=True,
        rotary_fraction=0.5, zero_centered_norm=True, d_ff=16, max_seq_len=32,
        moe=dict(num_experts=2, top_k=1, num_shared=1, d_ff_shared=8, shared_gate=True))


@pytest.mark.parametrize("dk,dv", [(22, 30), (7, 29), (11, 15), (30, 22)])
def test_qwen3_next_head_dims_convert_exactly(dk, dv):
    hf = hf_config_from_lm(_next_cfg(dk, dv), "qwen3_next")
    assert (hf["linear_key_head_dim"], hf["linear_value_head_dim"]) == (dk, dv)
    cfg = lm_config_from_hf(hf)
    assert (cfg.head_dim, cfg.value_dim, cfg.value_head_dim) == (dk, dv, dv)
    assert hf_config_from_lm(cfg, "qwen3_next") == hf


def test_qwen3_next_22_30_exports_loads_and_saves_exactly(tmp_path):
    cfg = _next_cfg(22, 30)
    params, state = jax.jit(lambda k: lm.init(k, cfg))(jax.random.key(0))
    out = export_hf(params, cfg, tmp_path / "hf", model_type="qwen3_next")
    cfg2, params2, state2, hf = load_hf(out)
    assert hf["linear_value_head_dim"] == 30 and cfg2.value_dim == 30
    assert params2["blocks"][0]["mixer"]["o_norm"]["scale"].shape == (30,)
    same = lambda a, b: jax.tree.map(
        lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
    same(params, params2)
    # Through a moejax model directory (JSON config + orbax tree) and back: the same config.
    checkpoint.save_model(tmp_path / "model", cfg2, params2, state2)
    cfg3, params3, _, _ = checkpoint.load_model(tmp_path / "model", lm.LMConfig, lm.init)
    assert cfg3 == cfg2
    same(params2, params3)
