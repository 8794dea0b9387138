"""Hugging Face tensor names and layouts ↔ moejax LM params (Mixtral, Qwen3-MoE, Qwen3-Next,
DeepSeek-V3, Kimi Linear).

HF linear weights are `[out, in]`; ours are `[in, out]`, so most tensors are transposed. The
non-trivial layouts:

  * Qwen3-Next attention `q_proj` `[H·2·Dh, d]` holds, per head, the query rows then the output
    gate rows: ours are `w_q` and `w_gate`.
  * Qwen3-Next GDN `in_proj_qkvz` `[Hk·(2·Dk + 2·r·Dv), d]` holds, per key head, q, k, then the r
    value heads' v and z rows (r = H / Hk); `in_proj_ba` `[Hk·2r, d]` holds per key head the r
    beta rows then the r decay rows. `conv1d.weight` `[2·Hk·Dk + H·Dv, 1, K]` convolves the
    concatenation [q | k | v]: ours are three `[K, channels]` convs.
  * Experts are stored one tensor per expert (`experts.{e}.w1/w3/w2` in Mixtral,
    `experts.{e}.gate_proj/up_proj/down_proj` in Qwen and DeepSeek), the layout of the published
    checkpoints.
  * DeepSeek-V3 MLA: `q_a_proj`/`q_a_layernorm`/`q_b_proj` (or `q_proj`), `kv_a_proj_with_mqa`
    `[r + Dr, d]`, `kv_a_layernorm`, `kv_b_proj` `[H·(Dn + Dv), r]` are ours transposed; its
    router's `e_score_correction_bias` is not a parameter but the aux-free router's state
    (`state_from_hf`; `hf_from_params(..., state=)` writes it back).
  * Qwen3.5-MoE GDN keeps Qwen3-Next's conv but splits the projections: `in_proj_qkv`
    `[2·Hk·Dk + H·Dv, d]` is [q | k | v] (not per key head), `in_proj_z` `[H·Dv, d]`,
    `in_proj_b` and `in_proj_a` `[H, d]`.
  * Kimi Linear: KDA and MLA layers both under `self_attn.` (KDA: `q/k/v_proj`, three
    `q/k/v_conv1d` `[C, 1, K]`, `f_a/f_b_proj` the low-rank decay, `A_log` `[1, 1, H, 1]`,
    per-channel `dt_bias`, `b_proj`, `g_a/g_b_proj` the low-rank output gate, `o_norm`,
    `o_proj`); every FFN under `block_sparse_moe.` (experts `w1/w3/w2` as Mixtral, dense layers
    and `shared_experts` as `gate/up/down_proj`).

`params_from_hf(get, cfg, model_type)` reads through `get(name, shape)`, which must return the
tensor with that exact shape or raise; `hf_from_params` is its exact inverse.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from moejax.models.lm import DELTA_MIXERS, LMConfig

Getter = Callable[[str, tuple[int, ...]], np.ndarray]

_EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2"),
                 "qwen3_moe": ("gate_proj", "up_proj", "down_proj"),
                 "qwen3_next": ("gate_proj", "up_proj", "down_proj"),
                 "qwen3_5_moe_text": ("gate_proj", "up_proj", "down_proj"),
                 "deepseek_v3": ("gate_proj", "up_proj", "down_proj"),
                 "kimi_linear": ("w1", "w3", "w2")}
_SHARED_NAMES = {"qwen3_next": "shared_expert.", "qwen3_5_moe_text": "shared_expert.",
                 "deepseek_v3": "shared_experts.",
                 "kimi_linear": "shared_experts."}
_BIASED_ROUTERS = ("deepseek_v3", "kimi_linear")  # e_score_correction_bias = the state's bias
_BIAS = "gate.e_score_correction_bias"  # DeepSeek-V3: the aux-free router's state bias


def _moe_prefix(model_type: str, i: int) -> str:
    """Where layer i's FFN (sparse, and for Kimi Linear dense too) lives, without the dot."""
    moe = model_type in ("mixtral", "kimi_linear")
    return f"model.layers.{i}." + ("block_sparse_moe" if moe else "mlp")


# ----------------------------------------------------------------------------- HF → moejax


def params_from_hf(get: Getter, cfg: LMConfig, model_type: str) -> dict:
    """moejax params (float32 numpy leaves) from HF tensors; see the module docstring."""
    d, V = cfg.d_model, cfg.vocab_size
    lin = lambda name, out, inp: get(name, (out, inp)).T
    vec = lambda name, n: get(name, (n,))
    params: dict = {"embed": get("model.embed_tokens.weight", (V, d)),
                    "final_norm": {"scale": vec("model.norm.weight", d)}, "blocks": []}
    if not cfg.tie_embeddings:
        params["unembed"] = lin("lm_head.weight", V, d)
    for i in range(cfg.num_layers):
        pre = f"model.layers.{i}."
        block = {"norm1": {"scale": vec(pre + "input_layernorm.weight", d)},
                 "norm2": {"scale": vec(pre + "post_attention_layernorm.weight", d)}}
        if model_type == "kimi_linear" and cfg.mixers[i] == "kda":
            block["mixer"] = _kda_from_hf(get, cfg.mixer_config(i), pre + "self_attn.")
        elif cfg.mixers[i] in DELTA_MIXERS:
            block["mixer"] = _gdn_from_hf(get, cfg.mixer_config(i), pre + "linear_attn.",
                                          split=model_type == "qwen3_5_moe_text")
        elif cfg.mixers[i] == "mla":
            block["mixer"] = _mla_from_hf(get, cfg.mixer_config(i), pre + "self_attn.")
        else:
            block["mixer"] = _attn_from_hf(get, cfg.mixer_config(i), pre + "self_attn.")
        if cfg.ffns[i] == "moe":
            block["ffn"] = _moe_from_hf(get, cfg, model_type, _moe_prefix(model_type, i) + ".")
        else:
            block["ffn"] = _swiglu_from_hf(get, _moe_prefix(model_type, i) + ".", d,
                                           cfg.dense_d_ff or cfg.d_ff)
        params["blocks"].append(block)
    return params


def state_from_hf(get: Getter, cfg: LMConfig, model_type: str, state: dict) -> dict:
    """`state` (from `lm.init`) with DeepSeek-V3's `e_score_correction_bias` of every MoE layer
    as the aux-free router's bias; unchanged for the other architectures."""
    if model_type not in _BIASED_ROUTERS:
        return state
    E = cfg.moe.num_experts
    blocks = [{**b, "router": {**b["router"], "bias": get(
        _moe_prefix(model_type, i) + "." + _BIAS, (E,))}} if cfg.ffns[i] == "moe" else b
        for i, b in enumerate(state["blocks"])]
    return {**state, "blocks": blocks}


_KDA_LINEAR = {"w_q": "q_proj", "w_k": "k_proj", "w_v": "v_proj", "w_f_a": "f_a_proj",
               "w_f_b": "f_b_proj", "w_beta": "b_proj", "w_og_a": "g_a_proj",
               "w_og_b": "g_b_proj", "w_out": "o_proj"}


def _kda_from_hf(get: Getter, m, pre: str) -> dict:
    d, H, Dk, K = m.d_model, m.num_heads, m.head_dim, m.conv_size
    C = H * Dk
    shapes = {"w_q": (C, d), "w_k": (C, d), "w_v": (H * m.value_dim, d),
              "w_f_a": (m.decay_rank, d), "w_f_b": (C, m.decay_rank), "w_beta": (H, d),
              "w_og_a": (m.gate_rank, d), "w_og_b": (H * m.value_dim, m.gate_rank),
              "w_out": (d, H * m.value_dim)}
    p = {ours: get(f"{pre}{hf}.weight", shapes[ours]).T for ours, hf in _KDA_LINEAR.items()}
    for x, width in (("q", C), ("k", C), ("v", H * m.value_dim)):
        p[f"conv_{x}"] = {"w": get(f"{pre}{x}_conv1d.weight", (width, 1, K))[:, 0].T}
    p["A_log"] = get(pre + "A_log", (1, 1, H, 1)).reshape(H)
    p["dt_bias"] = get(pre + "dt_bias", (C,))
    p["o_norm"] = {"scale": get(pre + "o_norm.weight", (m.value_dim,))}
    return p


def _kda_to_hf(p: dict, m, pre: str) -> dict:
    out = {f"{pre}{hf}.weight": p[ours].T for ours, hf in _KDA_LINEAR.items()}
    for x in "qkv":
        out[f"{pre}{x}_conv1d.weight"] = np.asarray(p[f"conv_{x}"]["w"]).T[:, None, :]
    out[pre + "A_log"] = np.asarray(p["A_log"]).reshape(1, 1, -1, 1)
    out[pre + "dt_bias"] = p["dt_bias"]
    out[pre + "o_norm.weight"] = p["o_norm"]["scale"]
    return out


def _mla_from_hf(get: Getter, m, pre: str) -> dict:
    d, H, r = m.d_model, m.num_heads, m.kv_lora_rank
    qk, Dr = m.qk_head_dim, m.qk_rope_head_dim
    lin = lambda name, out, inp: get(pre + name + ".weight", (out, inp)).T
    p = {"w_kv_a": lin("kv_a_proj_with_mqa", r + Dr, d),
         "kv_a_norm": {"scale": get(pre + "kv_a_layernorm.weight", (r,))},
         "w_kv_b": lin("kv_b_proj", H * (m.qk_nope_head_dim + m.v_head_dim), r),
         "w_out": lin("o_proj", d, H * m.v_head_dim)}
    if m.q_lora_rank is None:
        p["w_q"] = lin("q_proj", H * qk, d)
    else:
        p["w_q_a"] = lin("q_a_proj", m.q_lora_rank, d)
        p["q_a_norm"] = {"scale": get(pre + "q_a_layernorm.weight", (m.q_lora_rank,))}
        p["w_q_b"] = lin("q_b_proj", H * qk, m.q_lora_rank)
    return p


def _swiglu_from_hf(get: Getter, pre: str, d: int, f: int) -> dict:
    return {"w_gate": get(pre + "gate_proj.weight", (f, d)).T,
            "w_up": get(pre + "up_proj.weight", (f, d)).T,
            "w_down": get(pre + "down_proj.weight", (d, f)).T}


def _attn_from_hf(get: Getter, a, pre: str) -> dict:
    d, H, Hkv, Dh = a.d_model, a.num_heads, a.kv_heads, a.head_dim
    p = {"w_k": get(pre + "k_proj.weight", (Hkv * Dh, d)).T,
         "w_v": get(pre + "v_proj.weight", (Hkv * Dh, d)).T,
         "w_out": get(pre + "o_proj.weight", (d, H * Dh)).T}
    if a.gated:  # per head: Dh query rows, then Dh gate rows
        qg = get(pre + "q_proj.weight", (H * 2 * Dh, d)).reshape(H, 2, Dh, d)
        p["w_q"] = qg[:, 0].reshape(H * Dh, d).T
        p["w_gate"] = qg[:, 1].reshape(H * Dh, d).T
    else:
        p["w_q"] = get(pre + "q_proj.weight", (H * Dh, d)).T
    if a.qk_norm:
        p["q_norm"] = {"scale": get(pre + "q_norm.weight", (Dh,))}
        p["k_norm"] = {"scale": get(pre + "k_norm.weight", (Dh,))}
    return p


def _gdn_from_hf(get: Getter, m, pre: str, *, split: bool = False) -> dict:
    """Qwen3-Next's GDN (`in_proj_qkvz`, `in_proj_ba` per key head), or with `split` Qwen3.5's
    (`in_proj_qkv`, `in_proj_z`, `in_proj_b`, `in_proj_a`)."""
    d, H, Hk, Dk, Dv, K = (m.d_model, m.num_heads, m.key_heads, m.head_dim, m.value_dim,
                           m.conv_size)
    r = H // Hk
    flat = lambda w: w.reshape(-1, d).T
    if split:
        qkv = get(pre + "in_proj_qkv.weight", (2 * Hk * Dk + H * Dv, d))
        q, k, v = np.split(qkv, [Hk * Dk, 2 * Hk * Dk])
        z = get(pre + "in_proj_z.weight", (H * Dv, d))
        b, a = (get(pre + f"in_proj_{x}.weight", (H, d)) for x in "ba")
    else:
        qkvz = get(pre + "in_proj_qkvz.weight", (Hk * (2 * Dk + 2 * r * Dv), d))
        q, k, v, z = np.split(qkvz.reshape(Hk, 2 * Dk + 2 * r * Dv, d),
                              np.cumsum([Dk, Dk, r * Dv]), axis=1)
        ba = get(pre + "in_proj_ba.weight", (Hk * 2 * r, d)).reshape(Hk, 2 * r, d)
        b, a = ba[:, :r], ba[:, r:]
    conv = get(pre + "conv1d.weight", (2 * Hk * Dk + H * Dv, 1, K))[:, 0].T  # [K, C]
    cq, ck, cv = np.split(conv, [Hk * Dk, 2 * Hk * Dk], axis=1)
    return {"w_q": flat(q), "w_k": flat(k), "w_v": flat(v), "w_og": flat(z),
            "conv_q": {"w": cq}, "conv_k": {"w": ck}, "conv_v": {"w": cv},
            "w_beta": flat(b), "w_a": flat(a),
            "A_log": get(pre + "A_log", (H,)), "dt_bias": get(pre + "dt_bias", (H,)),
            "o_norm": {"scale": get(pre + "norm.weight", (Dv,))},
            "w_out": get(pre + "out_proj.weight", (d, H * Dv)).T}


def _moe_from_hf(get: Getter, cfg: LMConfig, model_type: str, pre: str) -> dict:
    d, E, f = cfg.d_model, cfg.moe.num_experts, cfg.d_ff
    g, u, o = _EXPERT_NAMES[model_type]
    ex = lambda name, shape: np.stack(
        [get(f"{pre}experts.{e}.{name}.weight", shape).T for e in range(E)])
    p = {"router": {"w_g": get(pre + "gate.weight", (E, d))},
         "experts": {"w_gate": ex(g, (f, d)), "w_up": ex(u, (f, d)), "w_down": ex(o, (d, f))}}
    if cfg.moe.num_shared:
        s = _swiglu_from_hf(get, pre + _SHARED_NAMES[model_type], d, cfg.moe.d_ff_shared or f)
        p["shared"] = {"bank": {k: w[None] for k, w in s.items()}}
        if cfg.moe.shared_gate:
            p["shared"]["gate"] = get(pre + "shared_expert_gate.weight", (1, d))[0]
    return p


# ----------------------------------------------------------------------------- moejax → HF


def hf_from_params(params: dict, cfg: LMConfig, model_type: str,
                   state: dict | None = None) -> dict[str, np.ndarray]:
    """HF tensors (contiguous numpy, params' dtype) of moejax params: the inverse of
    `params_from_hf` (and, for DeepSeek-V3, of `state_from_hf`: its router biases come from
    `state`, which it then needs)."""
    out: dict[str, np.ndarray] = {"model.embed_tokens.weight": params["embed"],
                                  "model.norm.weight": params["final_norm"]["scale"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = params["unembed"].T
    for i, block in enumerate(params["blocks"]):
        pre = f"model.layers.{i}."
        out[pre + "input_layernorm.weight"] = block["norm1"]["scale"]
        out[pre + "post_attention_layernorm.weight"] = block["norm2"]["scale"]
        if model_type == "kimi_linear" and cfg.mixers[i] == "kda":
            out.update(_kda_to_hf(block["mixer"], cfg.mixer_config(i), pre + "self_attn."))
        elif cfg.mixers[i] in DELTA_MIXERS:
            out.update(_gdn_to_hf(block["mixer"], cfg.mixer_config(i), pre + "linear_attn.",
                                  split=model_type == "qwen3_5_moe_text"))
        elif cfg.mixers[i] == "mla":
            out.update(_mla_to_hf(block["mixer"], pre + "self_attn."))
        else:
            out.update(_attn_to_hf(block["mixer"], cfg.mixer_config(i), pre + "self_attn."))
        if cfg.ffns[i] == "moe":
            out.update(_moe_to_hf(block["ffn"], model_type, _moe_prefix(model_type, i) + "."))
            if model_type in _BIASED_ROUTERS:
                if state is None:
                    raise ValueError(f"{model_type} export needs the router state (its bias is "
                                     "e_score_correction_bias): pass state=")
                out[_moe_prefix(model_type, i) + "." + _BIAS] = np.asarray(
                    state["blocks"][i]["router"]["bias"], np.float32)
        else:
            out.update(_swiglu_to_hf(block["ffn"], _moe_prefix(model_type, i) + "."))
    return {k: np.ascontiguousarray(np.asarray(v)) for k, v in out.items()}


def _mla_to_hf(p: dict, pre: str) -> dict:
    names = {"w_kv_a": "kv_a_proj_with_mqa", "w_kv_b": "kv_b_proj", "w_out": "o_proj",
             "w_q": "q_proj", "w_q_a": "q_a_proj", "w_q_b": "q_b_proj"}
    out = {f"{pre}{hf}.weight": p[ours].T for ours, hf in names.items() if ours in p}
    out[pre + "kv_a_layernorm.weight"] = p["kv_a_norm"]["scale"]
    if "q_a_norm" in p:
        out[pre + "q_a_layernorm.weight"] = p["q_a_norm"]["scale"]
    return out


def _swiglu_to_hf(p: dict, pre: str) -> dict:
    return {pre + "gate_proj.weight": p["w_gate"].T, pre + "up_proj.weight": p["w_up"].T,
            pre + "down_proj.weight": p["w_down"].T}


def _attn_to_hf(p: dict, a, pre: str) -> dict:
    d, H, Dh = a.d_model, a.num_heads, a.head_dim
    out = {pre + "k_proj.weight": p["w_k"].T, pre + "v_proj.weight": p["w_v"].T,
           pre + "o_proj.weight": p["w_out"].T}
    if a.gated:
        qg = np.stack([np.asarray(p["w_q"]).T.reshape(H, Dh, d),
                       np.asarray(p["w_gate"]).T.reshape(H, Dh, d)], axis=1)
        out[pre + "q_proj.weight"] = qg.reshape(H * 2 * Dh, d)
    else:
        out[pre + "q_proj.weight"] = p["w_q"].T
    if a.qk_norm:
        out[pre + "q_norm.weight"] = p["q_norm"]["scale"]
        out[pre + "k_norm.weight"] = p["k_norm"]["scale"]
    return out


def _gdn_to_hf(p: dict, m, pre: str, *, split: bool = False) -> dict:
    d, Hk = m.d_model, m.key_heads
    rows = lambda w: np.asarray(w).T.reshape(Hk, -1, d)  # [in, Hk·n] → [Hk, n, d]
    conv = np.concatenate([p["conv_q"]["w"], p["conv_k"]["w"], p["conv_v"]["w"]], axis=1)
    if split:
        proj = {pre + "in_proj_qkv.weight": np.concatenate(
                    [np.asarray(p[n]).T for n in ("w_q", "w_k", "w_v")]),
                pre + "in_proj_z.weight": p["w_og"].T, pre + "in_proj_b.weight": p["w_beta"].T,
                pre + "in_proj_a.weight": p["w_a"].T}
    else:
        qkvz = np.concatenate([rows(p["w_q"]), rows(p["w_k"]), rows(p["w_v"]),
                               rows(p["w_og"])], 1)
        ba = np.concatenate([rows(p["w_beta"]), rows(p["w_a"])], axis=1)
        proj = {pre + "in_proj_qkvz.weight": qkvz.reshape(-1, d),
                pre + "in_proj_ba.weight": ba.reshape(-1, d)}
    return {**proj,
            pre + "conv1d.weight": np.asarray(conv).T[:, None, :],
            pre + "A_log": p["A_log"], pre + "dt_bias": p["dt_bias"],
            pre + "norm.weight": p["o_norm"]["scale"], pre + "out_proj.weight": p["w_out"].T}


def _moe_to_hf(p: dict, model_type: str, pre: str) -> dict:
    g, u, o = _EXPERT_NAMES[model_type]
    out = {pre + "gate.weight": p["router"]["w_g"]}
    bank = p["experts"]
    for e in range(bank["w_up"].shape[0]):
        out[f"{pre}experts.{e}.{g}.weight"] = bank["w_gate"][e].T
        out[f"{pre}experts.{e}.{u}.weight"] = bank["w_up"][e].T
        out[f"{pre}experts.{e}.{o}.weight"] = bank["w_down"][e].T
    if "shared" in p:
        out.update(_swiglu_to_hf({k: w[0] for k, w in p["shared"]["bank"].items()},
                                 pre + _SHARED_NAMES[model_type]))
        if "gate" in p["shared"]:
            out[pre + "shared_expert_gate.weight"] = np.asarray(p["shared"]["gate"])[None]
    return out
