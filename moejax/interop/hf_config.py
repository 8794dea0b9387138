"""Hugging Face `config.json` ↔ `LMConfig` for Mixtral, Qwen3-MoE, Qwen3-Next, Qwen3.5-MoE,
DeepSeek-V3 and Kimi Linear.

What each architecture becomes in moejax (every layer pre-norm, SwiGLU experts, softmax router
with top-k over all experts):

  mixtral     softmax attention (GQA, full rotary), MoE on every layer, top-k renormalised.
  qwen3_moe   + per-head q/k RMSNorm; top-k renormalised iff `norm_topk_prob`; dense SwiGLU layers
              where `mlp_only_layers` / `decoder_sparse_step` say so (width `intermediate_size`).
  qwen3_next  hybrid: `linear_attention` layers → gated_deltanet (grouped key heads, gated
              RMSNorm output), `full_attention` layers → gated_softmax (sigmoid output gate,
              q/k norm, partial rotary); every norm but the delta output norm is zero-centred
              `(1 + w)`; MoE with one sigmoid-gated shared expert.
  qwen3_5_moe_text  Qwen3-Next's layers in Qwen3.5's weight layout (separate `in_proj_qkv`,
              `in_proj_z`, `in_proj_b`, `in_proj_a`); every layer MoE, top-k always renormalised.
  qwen3_5_moe the vision-language checkpoint: its `text_config` is read as qwen3_5_moe_text
              and its `model.language_model.*` tensors are the LM (the vision tower,
              `model.visual.*`, is left out); it exports as qwen3_5_moe_text.
  deepseek_v3 every layer MLA (`mla`: low-rank q if `q_lora_rank`, kv latent, interleaved or
              rotate-half rope); the first `first_k_dense_replace` layers dense SwiGLU, the
              rest MoE routed by `aux_free` (sigmoid scores, `e_score_correction_bias` as its
              state's bias, group-limited top-k, `norm_topk_prob`, `routed_scaling_factor`)
              plus one ungated shared expert of width `n_shared_experts · moe_intermediate_size`.
              The multi-token-prediction layers (`num_nextn_predict_layers`) are not part of
              the causal LM (transformers drops them too).
  kimi_linear `linear_attention` layers → kda (Kimi Delta Attention: per-channel decay from a
              rank-Dk projection, sigmoid low-rank output gate, Dv = Dk), `full_attention`
              layers → mla without RoPE (`mla_rope="none"`); `mlp_layer_types` dense/sparse;
              DeepSeek-V3's router and shared experts (Kimi's key names: `num_experts`,
              `num_experts_per_token`, `num_expert_group`, `moe_renormalize`,
              `num_shared_experts`, `model_max_length`, `linear_attn_config`).

Options we do not implement (sliding windows, attention biases, rope scaling, activations other
than SiLU) are refused with the field's name rather than converted approximately. Every key that is
read is checked: a missing key, a value of the wrong JSON type (a string where an integer
belongs, say) or out of range raises `ValueError` naming config.json and the key. Qwen3-Next's
key/value head dims become `LMConfig.head_dim` and the integer `value_head_dim` (not a float
ratio), so any pair, such as 22 and 30, converts and round-trips exactly.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from moejax.models.lm import MOE_DEFAULTS, LMConfig
from moejax.moe.layer import MoEConfig

SUPPORTED = ("mixtral", "qwen3_moe", "qwen3_next", "qwen3_5_moe_text", "qwen3_5_moe",
             "deepseek_v3", "kimi_linear")
ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                 "qwen3_next": "Qwen3NextForCausalLM",
                 "qwen3_5_moe_text": "Qwen3_5MoeForCausalLM",
                 "deepseek_v3": "DeepseekV3ForCausalLM", "kimi_linear": "KimiLinearForCausalLM"}
# Architectures with Qwen3-Next's layers (gated DeltaNet + gated softmax, shared expert).
NEXT_LIKE = ("qwen3_next", "qwen3_5_moe_text")


def text_config(hf: dict, *, source: str = "config.json") -> dict:
    """The language model's config of `hf`: Qwen3.5-MoE's `text_config` for the
    vision-language checkpoint, else `hf` itself."""
    if not isinstance(hf, dict) or hf.get("model_type") != "qwen3_5_moe":
        return hf  # (lm_config_from_hf names a non-object)
    text = hf.get("text_config")
    if not isinstance(text, dict):
        raise ValueError(f"{source}: a qwen3_5_moe config needs its 'text_config' object")
    outer = {k: hf[k] for k in ("dtype", "tie_word_embeddings") if k in hf and k not in text}
    return {**text, **outer, "model_type": "qwen3_5_moe_text"}
_KIMI_MIXERS = {"linear_attention": "kda", "full_attention": "mla"}
_NEXT_MIXERS = {"linear_attention": "gated_deltanet", "full_attention": "gated_softmax"}


_MISSING = object()
_KINDS = {  # kind -> (test, description)
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "number": (lambda v: isinstance(v, int | float) and not isinstance(v, bool)
               and math.isfinite(v), "a finite number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "list": (lambda v: isinstance(v, list), "a list"),
    "dict": (lambda v: isinstance(v, dict), "an object"),
}


def read_hf_config(hf_dir: str | os.PathLike) -> dict[str, Any]:
    """`hf_dir/config.json` as a dict, checked to be one of the supported architectures.

    Raises:
      ValueError: `hf_dir` is not a directory, config.json is missing, unreadable, not valid
        JSON (file, line and column named), not a JSON object, or has no supported
        `model_type` (the supported ones listed).
    """
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        what = "does not exist" if not hf_dir.exists() else "is not a directory"
        raise ValueError(f"hf_dir: {hf_dir} {what}; a Hugging Face model directory holds "
                         "config.json and *.safetensors")
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ValueError(f"no config.json in {hf_dir}: a Hugging Face model directory holds "
                         "config.json and *.safetensors")
    hf = read_json(path)
    if not isinstance(hf, dict):
        raise ValueError(f"{path} must hold a JSON object (the model's fields), got a JSON "
                         f"{type(hf).__name__}")
    model_type = hf.get("model_type")
    if model_type is None:
        raise ValueError(f"{path} has no 'model_type'; supported: {', '.join(SUPPORTED)}")
    if model_type not in SUPPORTED:
        raise ValueError(f"{path}: unsupported model_type {model_type!r}; supported: "
                         f"{', '.join(SUPPORTED)}")
    return hf


def read_json(path: Path) -> Any:
    """The JSON value of a file; ValueError naming the file (and line/column) if it cannot be
    read or parsed."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column "
                         f"{e.colno}") from e


class _Config:
    """Typed reads of a config.json dict: every message names the file and the key."""

    def __init__(self, hf: dict, source: str):
        if not isinstance(hf, dict):
            raise ValueError(f"{source} must hold a JSON object, got {type(hf).__name__}")
        self.hf, self.source = hf, source
        self.model_type = hf.get("model_type")

    def get(self, key: str, kind: str, default: Any = _MISSING, *, lo: float | None = None,
            nullable: bool = False) -> Any:
        """`hf[key]`, which must be of `kind` (and ≥ `lo`); `default` when absent (or null)."""
        value = self.hf.get(key, _MISSING)
        if value is None and (nullable or default is not _MISSING):
            value = _MISSING
        if value is _MISSING:
            if default is _MISSING:
                raise ValueError(f"{self.source}: missing key {key!r} (a {self.model_type} "
                                 "config needs it)")
            return default
        test, desc = _KINDS[kind]
        if not test(value):
            raise ValueError(f"{self.source}: {key!r} must be {desc}, got {value!r} "
                             f"({type(value).__name__})")
        if lo is not None and value < lo:
            raise ValueError(f"{self.source}: {key!r} must be >= {lo:g}, got {value!r}")
        return value

    def require(self, key: str, ok: bool, want: str) -> None:
        if not ok:
            raise ValueError(f"{self.source}: {self.model_type} with {key}="
                             f"{self.hf.get(key)!r} is not supported (moejax needs {want})")


def _rope(c: _Config) -> tuple[float, float]:
    rope = c.hf.get("rope_parameters")
    key = "rope_parameters"
    if rope is None:
        rope, key = c.hf.get("rope_scaling"), "rope_scaling"
    rope = {} if rope is None else rope
    if not isinstance(rope, dict):
        raise ValueError(f"{c.source}: {key!r} must be an object or null, got {rope!r}")
    r = _Config(rope, f"{c.source} [{key}]")
    r.model_type = c.model_type
    kind = r.get("rope_type", "str", r.get("type", "str", "default"))
    if kind != "default":
        raise ValueError(f"{c.source}: rope_type {kind!r} is not supported (only 'default')")
    theta = r.get("rope_theta", "number", None)
    theta = c.get("rope_theta", "number", 10000.0) if theta is None else theta
    fraction = r.get("partial_rotary_factor", "number", None)
    if fraction is None:
        fraction = c.get("partial_rotary_factor", "number", 1.0)
    if not theta > 0:
        raise ValueError(f"{c.source}: rope_theta must be > 0, got {theta}")
    if not 0 <= fraction <= 1:
        raise ValueError(f"{c.source}: partial_rotary_factor must be in [0, 1], got {fraction}")
    return float(theta), float(fraction)


def num_experts(hf: dict, *, source: str = "config.json") -> int:
    """Routed experts (`num_local_experts` in Mixtral and transformers-5 Qwen configs)."""
    c = _Config(hf, source)
    if hf.get("num_experts") is not None:
        return c.get("num_experts", "int", lo=0)
    return c.get("num_local_experts", "int", 0, lo=0)


def moe_layers(hf: dict, *, source: str = "config.json") -> list[bool]:
    """Which layers have a sparse MoE block (Qwen's `mlp_only_layers` / `decoder_sparse_step`)."""
    c = _Config(hf, source)
    n = c.get("num_hidden_layers", "int", lo=1)
    if c.model_type == "mixtral":
        return [True] * n
    step = c.get("decoder_sparse_step", "int", 1, lo=1)
    dense = c.get("mlp_only_layers", "list", [])
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in dense):
        raise ValueError(f"{source}: 'mlp_only_layers' must list layer indices, got {dense!r}")
    return [num_experts(hf, source=source) > 0 and i not in set(dense) and (i + 1) % step == 0
            for i in range(n)]


def next_layer_types(hf: dict, *, source: str = "config.json") -> list[str]:
    """Qwen3-Next's `layer_types` (older configs give `full_attention_interval`)."""
    c = _Config(hf, source)
    n = c.get("num_hidden_layers", "int", lo=1)
    types = c.get("layer_types", "list", None)
    if types:
        bad = [t for t in types if t not in _NEXT_MIXERS]
        if bad:
            raise ValueError(f"{source}: 'layer_types' holds {bad[0]!r}; each entry must be "
                             f"one of {', '.join(_NEXT_MIXERS)}")
        if len(types) != n:
            raise ValueError(f"{source}: 'layer_types' lists {len(types)} layers but "
                             f"num_hidden_layers={n}")
        return list(types)
    every = c.get("full_attention_interval", "int", 4, lo=1)
    return ["linear_attention" if (i + 1) % every else "full_attention" for i in range(n)]


def _divides(c: _Config, part: str, whole: str) -> None:
    p, w = c.hf[part], c.hf[whole]
    if w % p:
        raise ValueError(f"{c.source}: {part}={p} must divide {whole}={w}")


def lm_config_from_hf(hf: dict[str, Any], *, dtype: str = "float32",
                      max_seq_len: int | None = None,
                      source: str = "config.json") -> LMConfig:
    """The `LMConfig` of a supported HF config (see the module docstring).

    Args:
      hf: the parsed config.json (`read_hf_config`).
      dtype: compute dtype of the moejax model.
      max_seq_len: longest sequence; default `max_position_embeddings`.
      source: the file named in messages (`load_hf` passes config.json's path).

    Raises:
      ValueError: a missing key, a value of the wrong type or range, or an option moejax does
        not implement; the message names `source` and the key.
    """
    hf = text_config(hf, source=source)
    c = _Config(hf, source)
    if c.model_type not in SUPPORTED:
        raise ValueError(f"{source}: unsupported model_type {c.model_type!r}; supported: "
                         f"{', '.join(SUPPORTED)}")
    model_type = c.model_type
    c.require("hidden_act", c.get("hidden_act", "str", "silu") == "silu", "'silu'")
    c.require("attention_bias", not c.get("attention_bias", "bool", False), "False")
    if model_type in ("deepseek_v3", "kimi_linear"):
        return _deepseek_v3_config(c, dtype=dtype, max_seq_len=max_seq_len)
    if model_type == "mixtral":
        c.require("sliding_window", c.hf.get("sliding_window") is None, "None")
    else:
        c.require("use_sliding_window", not c.get("use_sliding_window", "bool", False), "False")
    theta, fraction = _rope(c)
    hidden = c.get("hidden_size", "int", lo=1)
    heads = c.get("num_attention_heads", "int", lo=1)
    head_dim = c.get("head_dim", "int", None, lo=1, nullable=True)
    if head_dim is None:
        if hidden % heads:
            raise ValueError(f"{source}: no head_dim, and num_attention_heads={heads} does not "
                             f"divide hidden_size={hidden}")
        head_dim = hidden // heads
    kv_heads = c.get("num_key_value_heads", "int", heads, lo=1)
    if heads % kv_heads:
        raise ValueError(f"{source}: num_key_value_heads={kv_heads} must divide "
                         f"num_attention_heads={heads}")
    layers = c.get("num_hidden_layers", "int", lo=1)
    is_moe = moe_layers(hf, source=source)
    experts = num_experts(hf, source=source)
    top_k = c.get("num_experts_per_tok", "int", lo=1)
    if any(is_moe) and top_k > experts:
        raise ValueError(f"{source}: num_experts_per_tok={top_k} exceeds the {experts} experts")
    if model_type == "mixtral":
        renormalize, d_ff = True, c.get("intermediate_size", "int", lo=1)
    else:
        renormalize = (model_type == "qwen3_5_moe_text"  # its router always renormalises
                       or c.get("norm_topk_prob", "bool", False))
        d_ff = c.get("moe_intermediate_size", "int", lo=1)
    dense_d_ff = (c.get("intermediate_size", "int", d_ff, lo=1) if model_type == "qwen3_5_moe_text"
                  else c.get("intermediate_size", "int", lo=1))
    kw: dict[str, Any] = dict(
        vocab_size=c.get("vocab_size", "int", lo=1), d_model=hidden,
        num_layers=layers, num_heads=heads, head_dim=head_dim,
        num_kv_heads=kv_heads, mixer="softmax",
        layer_ffns=tuple("moe" if m else "dense" for m in is_moe),
        d_ff=d_ff, dense_d_ff=dense_d_ff,
        qk_norm=model_type != "mixtral", rope_theta=theta, rotary_fraction=fraction,
        tie_embeddings=c.get("tie_word_embeddings", "bool", False), dtype=dtype,
        norm_eps=float(c.get("rms_norm_eps", "number", 1e-6)),
        max_seq_len=max_seq_len or c.get("max_position_embeddings", "int", 2048, lo=1))
    aux_coef = float(c.get("router_aux_loss_coef", "number", 0.0, lo=0))
    moe: dict[str, Any] = dict(
        num_experts=max(experts, 1), top_k=top_k, router="topk",
        router_kwargs=(("load_balance_weight", aux_coef), ("renormalize", renormalize),
                       ("z_loss_weight", 0.0)))
    if model_type in NEXT_LIKE:
        dk = c.get("linear_key_head_dim", "int", lo=1)
        dv = c.get("linear_value_head_dim", "int", lo=1)
        v_heads = c.get("linear_num_value_heads", "int", lo=1)
        k_heads = c.get("linear_num_key_heads", "int", lo=1)
        _divides(c, "linear_num_key_heads", "linear_num_value_heads")
        types = next_layer_types(hf, source=source)
        kw.update(
            layer_mixers=tuple(_NEXT_MIXERS[t] for t in types),
            num_heads=v_heads, head_dim=dk, num_key_heads=k_heads,
            value_head_dim=dv,  # an int: exact for any dk, dv (dv / dk need not be a binary ratio)
            conv_size=c.get("linear_conv_kernel_dim", "int", 4, lo=1), attn_num_heads=heads,
            attn_head_dim=head_dim, zero_centered_norm=True)
        moe.update(num_shared=1, shared_gate=True,
                   d_ff_shared=c.get("shared_expert_intermediate_size", "int", lo=1))
    if any(is_moe) or top_k <= max(experts, 1):  # an all-dense model keeps valid options
        kw["moe"] = moe  # (export gives them back); else moe=None
    try:
        return LMConfig(**kw)
    except ValueError as e:
        raise ValueError(f"{source}: these values give no valid moejax model: {e}") from e


def _first_of(c: _Config, keys: tuple[str, ...], kind: str, default: Any = _MISSING, **kw):
    """The first of `keys` present (Kimi Linear's names before DeepSeek-V3's), read as `get`."""
    for key in keys[:-1]:
        if c.hf.get(key) is not None:
            return c.get(key, kind, **kw)
    return c.get(keys[-1], kind, default, **kw)


def _kimi_layers(c: _Config, layers: int) -> tuple[list[str], list[str]]:
    """Kimi Linear's `(layer_types, mlp_layer_types)`, from the lists or from
    `linear_attn_config`'s 1-based `kda_layers` / `full_attn_layers` and `first_k_dense_replace`."""
    lin = c.get("linear_attn_config", "dict", {})
    types = c.get("layer_types", "list", None)
    if types is None:
        full = set(lin.get("full_attn_layers", []))
        types = ["full_attention" if i + 1 in full else "linear_attention" for i in range(layers)]
    mlp = c.get("mlp_layer_types", "list", None)
    if mlp is None:
        first = c.get("first_k_dense_replace", "int", 1, lo=0)
        mlp = ["dense" if i < first else "sparse" for i in range(layers)]
    for key, value, valid in (("layer_types", types, _KIMI_MIXERS),
                              ("mlp_layer_types", mlp, ("dense", "sparse"))):
        bad = [t for t in value if t not in valid]
        if bad or len(value) != layers:
            raise ValueError(f"{c.source}: {key!r} must list one of {', '.join(valid)} per layer "
                             f"(num_hidden_layers={layers}), got {value!r}")
    return list(types), list(mlp)


def _deepseek_v3_config(c: _Config, *, dtype: str, max_seq_len: int | None) -> LMConfig:
    """`lm_config_from_hf` for DeepSeek-V3 and Kimi Linear (module docstring)."""
    kimi = c.model_type == "kimi_linear"
    theta, fraction = _rope(c)
    c.require("partial_rotary_factor", fraction == 1.0, "1.0")
    heads = c.get("num_attention_heads", "int", lo=1)
    layers = c.get("num_hidden_layers", "int", lo=1)
    if kimi:
        types, mlp = _kimi_layers(c, layers)
        ffns = tuple("moe" if t == "sparse" else "dense" for t in mlp)
    else:
        first_dense = c.get("first_k_dense_replace", "int", 0, lo=0)
        ffns = tuple("dense" if i < first_dense else "moe" for i in range(layers))
    experts = _first_of(c, ("num_experts", "n_routed_experts"), "int", lo=1)
    f = c.get("moe_intermediate_size", "int", lo=1)
    shared = _first_of(c, ("num_shared_experts", "n_shared_experts"), "int", 0, lo=0)
    v_dim = c.get("v_head_dim", "int", lo=1)
    router_kwargs = (
        ("n_group", _first_of(c, ("num_expert_group", "n_group"), "int", 1, lo=1)),
        ("topk_group", c.get("topk_group", "int", 1, lo=1)),
        ("norm_topk_prob", _first_of(c, ("moe_renormalize", "norm_topk_prob"), "bool", True)),
        ("routed_scaling_factor", float(c.get("routed_scaling_factor", "number", 1.0, lo=0))))
    moe = dict(num_experts=experts,
               top_k=_first_of(c, ("num_experts_per_token", "num_experts_per_tok"), "int", lo=1),
               router="aux_free", router_kwargs=router_kwargs, num_shared=min(shared, 1),
               d_ff_shared=shared * f if shared else None)
    kw = dict(
        vocab_size=c.get("vocab_size", "int", lo=1), d_model=c.get("hidden_size", "int", lo=1),
        num_layers=layers, num_heads=heads, head_dim=v_dim, attn_num_heads=heads,
        attn_head_dim=v_dim, mixer="mla",
        mla_kv_lora_rank=c.get("kv_lora_rank", "int", lo=1),
        mla_q_lora_rank=c.get("q_lora_rank", "int", None, lo=1, nullable=True),
        mla_qk_nope_head_dim=c.get("qk_nope_head_dim", "int", lo=0),
        mla_qk_rope_head_dim=c.get("qk_rope_head_dim", "int", lo=0), mla_v_head_dim=v_dim,
        mla_rope="interleave" if c.get("rope_interleave", "bool", True) else "half",
        layer_ffns=ffns,
        d_ff=f, dense_d_ff=c.get("intermediate_size", "int", lo=1), rope_theta=theta,
        tie_embeddings=c.get("tie_word_embeddings", "bool", False), dtype=dtype,
        norm_eps=float(c.get("rms_norm_eps", "number", 1e-6)), moe=moe,
        max_seq_len=max_seq_len or _first_of(c, ("model_max_length", "max_position_embeddings"),
                                             "int", 2048, lo=1))
    if kimi:  # KDA's heads are the model's delta heads; Dv = Dk; MLA without RoPE
        lin = c.get("linear_attn_config", "dict", {})
        kw.update(layer_mixers=tuple(_KIMI_MIXERS[t] for t in types), mla_rope="none",
                  num_heads=lin.get("num_heads", c.get("linear_num_heads", "int", 32, lo=1)),
                  head_dim=lin.get("head_dim", c.get("linear_head_dim", "int", 128, lo=1)),
                  expand_v=1.0, conv_size=lin.get("short_conv_kernel_size", c.get(
                      "linear_conv_kernel_dim", "int", 4, lo=1)))
    try:
        return LMConfig(**kw)
    except ValueError as e:
        raise ValueError(f"{c.source}: these values give no valid moejax model: {e}") from e


def _deepseek_v3_hf_config(cfg: LMConfig, model_type: str = "deepseek_v3") -> dict[str, Any]:
    """`hf_config_from_lm` for DeepSeek-V3 and Kimi Linear: the inverse of
    `_deepseek_v3_config`."""
    moe = cfg.moe
    kimi = model_type == "kimi_linear"
    bad = []
    mixers = {"kda", "mla"} if kimi else {"mla"}
    if set(cfg.mixers) - mixers or "mla" not in cfg.mixers:
        bad.append(f"layer mixers {sorted(set(cfg.mixers))} (needs {sorted(mixers)})")
    ffns = cfg.ffns
    first = ffns.index("moe") if "moe" in ffns else len(ffns)
    if "none" in ffns or (not kimi and set(ffns[first:]) - {"moe"}):
        bad.append(f"layer ffns {list(ffns)} (needs dense layers, then MoE layers)")
    if kimi and "kda" in cfg.mixers:
        k = cfg.mixer_config(cfg.mixers.index("kda"))
        if (k.decay_rank, k.gate_rank, k.value_dim, k.key_heads) != (k.head_dim,) * 3 + (
                k.num_heads,) or k.output_gate != "sigmoid" or k.allow_neg_eigval:
            bad.append("KDA options (needs decay_rank = gate_rank = value dim = head_dim, all "
                       "key heads, a sigmoid output gate, no negative eigenvalues)")
    if moe is None or moe.router != "aux_free":
        bad.append("router (needs 'aux_free')")
    elif moe.shared_gate:
        bad.append("shared_gate=True (DeepSeek-V3's shared experts are ungated)")
    if cfg.qk_norm or cfg.zero_centered_norm:
        bad.append("qk_norm / zero_centered_norm (DeepSeek-V3 has neither)")
    if bad:
        raise ValueError(f"this model cannot be exported as {model_type}: " + "; ".join(bad))
    a = cfg.mixer_config(cfg.mixers.index("mla"))
    rk = moe.router_config
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURES["deepseek_v3"]], "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": a.num_heads,
        "num_key_value_heads": a.num_heads, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False,
        "attention_dropout": 0.0, "kv_lora_rank": a.kv_lora_rank, "q_lora_rank": a.q_lora_rank,
        "qk_nope_head_dim": a.qk_nope_head_dim, "qk_rope_head_dim": a.qk_rope_head_dim,
        "v_head_dim": a.v_head_dim, "rope_interleave": a.rope == "interleave",
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "first_k_dense_replace": first, "intermediate_size": cfg.dense_d_ff or cfg.d_ff,
        "moe_intermediate_size": cfg.d_ff, "n_routed_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k, "n_group": rk.n_group, "topk_group": rk.topk_group,
        "norm_topk_prob": rk.norm_topk_prob, "routed_scaling_factor": rk.routed_scaling_factor,
        "n_shared_experts": 0, "num_nextn_predict_layers": 0, "dtype": "float32",
        "use_cache": True}
    if moe.num_shared:
        width = moe.d_ff_shared or cfg.d_ff
        if moe.num_shared != 1 or width % cfg.d_ff:
            raise ValueError(f"this model cannot be exported as {model_type}: {moe.num_shared} "
                             f"shared experts of width {width} (needs one, a multiple of "
                             f"d_ff={cfg.d_ff})")
        hf["n_shared_experts"] = width // cfg.d_ff
    if kimi:
        return _kimi_hf_config(cfg, hf, a)
    if a.rope == "none":
        raise ValueError("this model cannot be exported as deepseek_v3: mla_rope='none' "
                         "(DeepSeek-V3 rotates the rope channels)")
    return hf


def _kimi_hf_config(cfg: LMConfig, hf: dict[str, Any], a) -> dict[str, Any]:
    """DeepSeek-V3's dict in Kimi Linear's names, with its layer lists and KDA shape."""
    if a.rope != "none":
        raise ValueError(f"this model cannot be exported as kimi_linear: mla_rope={a.rope!r} "
                         "(Kimi Linear's MLA has no RoPE: 'none')")
    rename = {"n_routed_experts": "num_experts", "num_experts_per_tok": "num_experts_per_token",
              "n_group": "num_expert_group", "norm_topk_prob": "moe_renormalize",
              "n_shared_experts": "num_shared_experts",
              "max_position_embeddings": "model_max_length"}
    out = {rename.get(k, k): v for k, v in hf.items()
           if k not in ("rope_interleave", "num_nextn_predict_layers", "first_k_dense_replace")}
    types = {v: k for k, v in _KIMI_MIXERS.items()}
    kda = cfg.mixer_config(cfg.mixers.index("kda")) if "kda" in cfg.mixers else None
    lin = {"num_heads": cfg.num_heads, "head_dim": cfg.head_dim,
           "short_conv_kernel_size": kda.conv_size if kda else cfg.conv_size,
           "kda_layers": [i + 1 for i, m in enumerate(cfg.mixers) if m == "kda"],
           "full_attn_layers": [i + 1 for i, m in enumerate(cfg.mixers) if m == "mla"]}
    out.update(architectures=[ARCHITECTURES["kimi_linear"]], model_type="kimi_linear",
               layer_types=[types[m] for m in cfg.mixers], linear_attn_config=lin,
               mlp_layer_types=["sparse" if f == "moe" else "dense" for f in cfg.ffns],
               # transformers' defaults are Kimi's 163k-vocabulary ids; moejax keeps none
               pad_token_id=None, bos_token_id=None, eos_token_id=None)
    return out


def hf_config_from_lm(cfg: LMConfig, model_type: str) -> dict[str, Any]:
    """The HF config.json dict of a moejax model of a supported architecture.

    Raises:
      ValueError: `model_type` is not supported, or `cfg` uses something that architecture
        cannot express (each such field is named).
    """
    if model_type not in SUPPORTED:
        raise ValueError(f"model_type must be one of {SUPPORTED}, got {model_type!r}")
    if model_type in ("deepseek_v3", "kimi_linear"):
        return _deepseek_v3_hf_config(cfg, model_type)
    # A model without MoE options (all layers dense) exports the LM's default ones.
    moe = cfg.moe or MoEConfig(d_model=cfg.d_model, d_ff=cfg.d_ff, **MOE_DEFAULTS)
    router_kw = dict(moe.router_kwargs)
    renormalize = bool(router_kw.get("renormalize", False))
    if model_type == "qwen3_5_moe":
        raise ValueError("model_type 'qwen3_5_moe' is the vision-language checkpoint; moejax "
                         "holds its language model: export it as 'qwen3_5_moe_text'")
    next_ = model_type in NEXT_LIKE
    want = {"router": (moe.router, "topk"),
            "qk_norm": (cfg.qk_norm, model_type != "mixtral"),
            "zero_centered_norm": (cfg.zero_centered_norm, next_),
            "num_shared": (moe.num_shared, 1 if next_ else 0),
            "shared_gate": (moe.shared_gate, next_),
            "allow_neg_eigval": (cfg.allow_neg_eigval, False)}
    bad = [f"{k}={have!r} (needs {need!r})" for k, (have, need) in want.items() if have != need]
    mixers = {"gated_deltanet", "gated_softmax"} if next_ else {"softmax"}
    if set(cfg.mixers) - mixers:
        bad.append(f"layer mixers {sorted(set(cfg.mixers))} (needs {sorted(mixers)})")
    if next_ and not {"gated_deltanet", "gated_softmax"} <= set(cfg.mixers):
        bad.append("Qwen3-Next needs both gated_deltanet and gated_softmax layers")
    if "none" in cfg.ffns:
        bad.append("layers without FFN (ffn='none')")
    if model_type == "mixtral" and "dense" in cfg.ffns:
        bad.append("dense FFN layers (Mixtral has MoE on every layer)")
    if model_type in ("mixtral", "qwen3_5_moe_text") and not renormalize:
        bad.append(f"router_kwargs renormalize=False ({model_type} renormalises the top-k "
                   "weights)")
    if model_type == "qwen3_5_moe_text" and "dense" in cfg.ffns:
        bad.append("dense FFN layers (Qwen3.5-MoE has MoE on every layer)")
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
        "num_experts_per_tok": moe.top_k, "attention_bias": False, "attention_dropout": 0.0,
        "router_aux_loss_coef": float(router_kw.get("load_balance_weight", 0.0)),
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "dtype": "float32", "use_cache": True,
    }
    if model_type == "mixtral":
        hf.update(num_local_experts=moe.num_experts, intermediate_size=cfg.d_ff,
                  sliding_window=None, router_jitter_noise=0.0)
        return hf
    ffns = cfg.ffns
    hf.update(num_experts=moe.num_experts, moe_intermediate_size=cfg.d_ff,
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
              shared_expert_intermediate_size=moe.d_ff_shared or cfg.d_ff)
    if model_type == "qwen3_5_moe_text":  # no dense layers, always renormalised
        for key in ("intermediate_size", "norm_topk_prob", "decoder_sparse_step",
                    "mlp_only_layers"):
            hf.pop(key)
    return hf
