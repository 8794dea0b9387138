"""Hugging Face `config.json` ↔ `LMConfig` for Mixtral, Qwen3-MoE and Qwen3-Next.

What each architecture becomes in moejax (every layer pre-norm, SwiGLU experts, softmax router
with top-k over all experts):

  mixtral     softmax attention (GQA, full rotary), MoE on every layer, top-k renormalised.
  qwen3_moe   + per-head q/k RMSNorm; top-k renormalised iff `norm_topk_prob`; dense SwiGLU layers
              where `mlp_only_layers` / `decoder_sparse_step` say so (width `intermediate_size`).
  qwen3_next  hybrid: `linear_attention` layers → gated_deltanet (grouped key heads, gated
              RMSNorm output), `full_attention` layers → gated_softmax (sigmoid output gate,
              q/k norm, partial rotary); every norm but the delta output norm is zero-centred
              `(1 + w)`; MoE with one sigmoid-gated shared expert.

Options we do not implement (sliding windows, attention biases, rope scaling, activations other
than SiLU) are refused with the field's name rather than converted approximately.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moejax.models.lm import LMConfig

SUPPORTED = ("mixtral", "qwen3_moe", "qwen3_next")
ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                 "qwen3_next": "Qwen3NextForCausalLM"}
_NEXT_MIXERS = {"linear_attention": "gated_deltanet", "full_attention": "gated_softmax"}


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    """`hf_dir/config.json` as a dict, checked to be one of the supported architectures."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise ValueError(f"hf_dir: {hf_dir} is not a directory")
    path = hf_dir / "config.json"
    if not path.exists():
        raise ValueError(f"no config.json in {hf_dir}: a Hugging Face model directory holds "
                         "config.json and *.safetensors")
    hf = json.loads(path.read_text())
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
        raise ValueError(f"{path}: unsupported model_type {model_type!r}; supported: "
                         f"{', '.join(SUPPORTED)}")
    return hf


def _require(hf: dict, name: str, ok: bool, want: str) -> None:
    if not ok:
        raise ValueError(f"config.json: {hf['model_type']} with {name}={hf.get(name)!r} is not "
                         f"supported (moejax needs {want})")


def _rope(hf: dict) -> tuple[float, float]:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ValueError(f"config.json: rope_type {kind!r} is not supported (only 'default')")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    fraction = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    return float(theta), float(fraction)


def num_experts(hf: dict) -> int:
    """Routed experts (`num_local_experts` in Mixtral and transformers-5 Qwen configs)."""
    return int(hf.get("num_experts", hf.get("num_local_experts", 0)))


def moe_layers(hf: dict) -> list[bool]:
    """Which layers have a sparse MoE block (Qwen's `mlp_only_layers` / `decoder_sparse_step`)."""
    n = hf["num_hidden_layers"]
    if hf["model_type"] == "mixtral":
        return [True] * n
    step, dense = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or [])
    return [num_experts(hf) > 0 and i not in dense and (i + 1) % step == 0
            for i in range(n)]


def next_layer_types(hf: dict) -> list[str]:
    """Qwen3-Next's `layer_types` (older configs give `full_attention_interval`)."""
    if hf.get("layer_types"):
        return list(hf["layer_types"])
    every = hf.get("full_attention_interval", 4)
    return ["linear_attention" if (i + 1) % every else "full_attention"
            for i in range(hf["num_hidden_layers"])]


def lm_config_from_hf(hf: dict[str, Any], *, dtype: str = "float32",
                      max_seq_len: int | None = None) -> LMConfig:
    """The `LMConfig` of a supported HF config (see the module docstring).

    Args:
      hf: the parsed config.json (`read_hf_config`).
      dtype: compute dtype of the moejax model.
      max_seq_len: longest sequence; default `max_position_embeddings`.
    """
    model_type = hf["model_type"]
    _require(hf, "hidden_act", hf.get("hidden_act", "silu") == "silu", "'silu'")
    _require(hf, "attention_bias", not hf.get("attention_bias", False), "False")
    if model_type == "mixtral":
        _require(hf, "sliding_window", hf.get("sliding_window") is None, "None")
    else:
        _require(hf, "use_sliding_window", not hf.get("use_sliding_window", False), "False")
    theta, fraction = _rope(hf)
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    is_moe = moe_layers(hf)
    experts = num_experts(hf)
    if model_type == "mixtral":
        renormalize, d_ff = True, hf["intermediate_size"]
    else:
        renormalize = bool(hf.get("norm_topk_prob", False))
        d_ff = hf["moe_intermediate_size"]
    kw: dict[str, Any] = dict(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=heads, head_dim=head_dim,
        num_kv_heads=hf.get("num_key_value_heads", heads), mixer="softmax",
        layer_ffns=tuple("moe" if m else "dense" for m in is_moe),
        d_ff=d_ff, dense_d_ff=hf["intermediate_size"], num_experts=max(experts, 1),
        top_k=hf["num_experts_per_tok"], router="topk",
        router_kwargs=(("load_balance_weight", float(hf.get("router_aux_loss_coef", 0.0))),
                       ("renormalize", renormalize), ("z_loss_weight", 0.0)),
        qk_norm=model_type != "mixtral", rope_theta=theta, rotary_fraction=fraction,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), dtype=dtype,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_seq_len=max_seq_len or hf.get("max_position_embeddings", 2048))
    if model_type == "qwen3_next":
        dk, dv = hf["linear_key_head_dim"], hf["linear_value_head_dim"]
        kw.update(
            layer_mixers=tuple(_NEXT_MIXERS[t] for t in next_layer_types(hf)),
            num_heads=hf["linear_num_value_heads"], head_dim=dk,
            num_key_heads=hf["linear_num_key_heads"], expand_v=dv / dk,
            conv_size=hf.get("linear_conv_kernel_dim", 4), attn_num_heads=heads,
            attn_head_dim=head_dim, zero_centered_norm=True, num_shared=1,
            d_ff_shared=hf["shared_expert_intermediate_size"], shared_gate=True)
    return LMConfig(**kw)


def hf_config_from_lm(cfg: LMConfig, model_type: str) -> dict[str, Any]:
    """The HF config.json dict of a moejax model of a supported architecture.

    Raises:
      ValueError: `model_type` is not supported, or `cfg` uses something that architecture
        cannot express (each such field is named).
    """
    if model_type not in SUPPORTED:
        raise ValueError(f"model_type must be one of {SUPPORTED}, got {model_type!r}")
    router_kw = dict(cfg.router_kwargs)
    renormalize = bool(router_kw.get("renormalize", False))
    next_ = model_type == "qwen3_next"
    want = {"router": "topk", "qk_norm": model_type != "mixtral", "zero_centered_norm": next_,
            "num_shared": 1 if next_ else 0, "shared_gate": next_, "allow_neg_eigval": False}
    bad = [f"{k}={getattr(cfg, k)!r} (needs {v!r})" for k, v in want.items()
           if getattr(cfg, k) != v]
    mixers = {"gated_deltanet", "gated_softmax"} if next_ else {"softmax"}
    if set(cfg.mixers) - mixers:
        bad.append(f"layer mixers {sorted(set(cfg.mixers))} (needs {sorted(mixers)})")
    if next_ and not {"gated_deltanet", "gated_softmax"} <= set(cfg.mixers):
        bad.append("Qwen3-Next needs both gated_deltanet and gated_softmax layers")
    if model_type == "mixtral" and "dense" in cfg.ffns:
        bad.append("dense FFN layers (Mixtral has MoE on every layer)")
    if model_type == "mixtral" and not renormalize:
        bad.append("router_kwargs renormalize=False (Mixtral renormalises the top-k weights)")
    if bad:
        raise ValueError(f"this model cannot be exported as {model_type}: " + "; ".join(bad))
    attn = cfg.mixer_config(cfg.mixers.index("gated_softmax") if next_ else 0)
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURES[model_type]], "model_type": model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": attn.num_heads,
        "num_key_value_heads": attn.kv_heads, "head_dim": attn.head_dim,
        "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "num_experts_per_tok": cfg.top_k, "attention_bias": False, "attention_dropout": 0.0,
        "router_aux_loss_coef": float(router_kw.get("load_balance_weight", 0.0)),
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "dtype": "float32", "use_cache": True,
    }
    if model_type == "mixtral":
        hf.update(num_local_experts=cfg.num_experts, intermediate_size=cfg.d_ff,
                  sliding_window=None, router_jitter_noise=0.0)
        return hf
    ffns = cfg.ffns
    hf.update(num_experts=cfg.num_experts, moe_intermediate_size=cfg.d_ff,
              intermediate_size=cfg.dense_d_ff or cfg.d_ff, norm_topk_prob=renormalize,
              decoder_sparse_step=1, mlp_only_layers=[i for i, f in enumerate(ffns)
                                                      if f == "dense"])
    if not next_:
        hf.update(use_sliding_window=False, sliding_window=None)
        return hf
    delta = cfg.mixer_config(cfg.mixers.index("gated_deltanet"))
    hf["rope_parameters"]["partial_rotary_factor"] = attn.rotary / attn.head_dim
    hf.update(layer_types=[{v: k for k, v in _NEXT_MIXERS.items()}[m] for m in cfg.mixers],
              linear_num_value_heads=delta.num_heads, linear_num_key_heads=delta.key_heads,
              linear_key_head_dim=delta.head_dim, linear_value_head_dim=delta.value_dim,
              linear_conv_kernel_dim=delta.conv_size,
              shared_expert_intermediate_size=cfg.d_ff_shared or cfg.d_ff)
    return hf
