"""Upcycling a trained LM's parts into this research line's, starting (almost) where it was.

  to_qdelta(params, cfg, lam_init)        Gated DeltaNet → gated Q-Delta (DeltaNet → Q-Delta):
                                          W_λ = 0 and a learnable λ bias b_λ
                                          (`learnable_lam_bias`) set so that λ = lam_init on
                                          every token; λ → 0 recovers the original layer
                                          exactly.
  to_star(params, state, cfg, mix_init)   top-k or aux-free (DeepSeek-V3, Kimi Linear) router
                                          → STAR: the learned gate keeps W_g and σ(a) = mix_init
                                          (near 1), R = I; V starts random and `gha_warmup`
                                          moves it onto the principal subspace of each MoE
                                          layer's inputs with forward passes over data. An
                                          aux-free router keeps its scoring and selection as
                                          STAR options (sigmoid scores, the
                                          e_score_correction_bias as STAR's selection bias,
                                          expert groups, norm_topk_prob, routed_scaling_factor).

Both return a new config and new trees and never touch the inputs. `logit_difference` reports how
far the upcycled model starts from the original.

How close STAR starts: its logits are `σ(a) (x W_g^T) + (1 − σ(a)) (x Z^T)`, so with R = I the
start differs from the original gate by `(1 − mix_init) (x Z^T − x W_g^T)` (plus the experts
this flips at near-ties); it equals it only where σ(a) rounds to 1 in float32 (mix_init
≥ 1 − 5e-8), and there 1 − σ(a) = 0 also stops every gradient into R and `a`, so the subspace
would never be learned. `r_init="zero"` (free R only) starts exact up to float rounding
with a live subspace: R = 0 makes `x Z^T = 0` and `W_g = W / mix_init` cancels the mixing
weight, while R's gradient, `(1 − σ(a)) x V^T`, is as under R = I.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from moejax.layers.delta_mixer import LAM_SHIFT
from moejax.models import lm
from moejax.routers import star
from moejax.validation import ArgumentTypeError, check_choice, check_range

Array = jax.Array

QDELTA_OF = {"gated_deltanet": "gated_qdelta", "deltanet": "qdelta", "kda": "kda_qdelta"}
_STAR_FIELDS = {f.name for f in dataclasses.fields(star.Config)}
UPCYCLABLE_ROUTERS = ("topk", "aux_free")
R_INITS = ("identity", "zero")


def _check_cfg(cfg: object) -> None:
    if not isinstance(cfg, lm.LMConfig):
        raise ArgumentTypeError(f"cfg must be an LMConfig, got {type(cfg).__name__}")


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def to_qdelta(params: dict, cfg: lm.LMConfig, *, lam_init: float = 1e-4
              ) -> tuple[lm.LMConfig, dict]:
    """Turns every (Gated) DeltaNet layer into (gated) Q-Delta, and every KDA layer (Kimi Linear)
    into gated Q-Delta with KDA's per-channel gate, with λ ≡ `lam_init` at start.

    The new config has `learnable_lam_bias=True` (λ = σ(W_λ h + b_λ − 0.9)): with W_λ = 0 the
    fixed −0.9 alone would give λ = σ(−0.9) ≈ 0.29, far from the trained layer, so b_λ starts
    at logit(lam_init) + 0.9 and is trained with the rest.

    Raises:
      ValueError: `lam_init` not in (0, 1) (with `allow_neg_eigval`: (0, 2)), or the model has
        no DeltaNet / Gated DeltaNet layer (`ArgumentTypeError` for a non-number `lam_init` or
        a `cfg` that is not an `LMConfig`).
    """
    _check_cfg(cfg)
    scale = 2.0 if cfg.allow_neg_eigval else 1.0
    check_range("lam_init", lam_init, 0.0, scale, hi_open=True)
    layers = [i for i, m in enumerate(cfg.mixers) if m in QDELTA_OF]
    if not layers:
        raise ValueError(f"no deltanet / gated_deltanet / kda layer to turn into Q-Delta; this "
                         f"model's layers are {sorted(set(cfg.mixers))}")
    mixers = tuple(QDELTA_OF.get(m, m) for m in cfg.mixers)
    new_cfg = dataclasses.replace(cfg, layer_mixers=mixers, mixer=mixers[0],
                                  learnable_lam_bias=True)
    b_lam = _logit(lam_init / scale) + LAM_SHIFT  # λ = scale · σ(W_λ h + b_λ − 0.9)
    blocks = list(params["blocks"])
    for i in layers:
        mixer = dict(blocks[i]["mixer"])
        H = new_cfg.mixer_config(i).num_heads
        mixer["w_lam"] = jnp.zeros((cfg.d_model, H), jnp.asarray(mixer["w_beta"]).dtype)
        mixer["b_lam"] = jnp.full((H,), b_lam, jnp.float32)
        blocks[i] = {**blocks[i], "mixer": mixer}
    return new_cfg, {**params, "blocks": blocks}


def to_star(params: dict, state: dict, cfg: lm.LMConfig, *, mix_init: float = 0.999,
            eta: float = 2e-5, key: Array | None = None, r_init: str = "identity"
            ) -> tuple[lm.LMConfig, dict, dict]:
    """Turns the top-k or aux-free routers of every MoE layer into STAR routers.

    The learned gate keeps `W_g`; `a = logit(mix_init)` so the subspace term starts with weight
    `1 − mix_init`; R = I (`r_init="identity"`: `P = 0`, or a free R set to the identity) or
    R = 0 with `W_g = W / mix_init` (`r_init="zero"`: the mixed logits are the original ones
    up to the rounding of `W_g`'s dtype); `V` is STAR's random init (run `gha_warmup`).

    A "topk" router's options STAR shares (renormalize, load_balance_weight), where set,
    carry over. An "aux_free" router (DeepSeek-V3, Kimi Linear) becomes STAR with its scoring
    and selection: `score_fn="sigmoid"`, `selection_bias=True` with the router state's bias
    (the checkpoint's `e_score_correction_bias`) as STAR's `state["bias"]`, its
    `bias_update_rate`, `n_group`, `topk_group`, `norm_topk_prob` (as `renormalize`),
    `routed_scaling_factor` and `axis_name`; so at σ(a) → 1 STAR routes exactly as it did.
    An `"active"` slot mask in the router state is kept.

    Raises:
      ValueError: `mix_init` not in (0, 1), `eta` not > 0, `r_init` not one of `R_INITS`, the
        model has no MoE layer, its router is not one of `UPCYCLABLE_ROUTERS`, or an aux-free
        layer's state holds no bias (`ArgumentTypeError` for a non-number or a non-`LMConfig`
        cfg).
    """
    _check_cfg(cfg)
    check_range("mix_init", mix_init, 0.0, 1.0, hi_open=True)
    check_range("eta", eta, 0.0, math.inf, hi_open=True)
    check_choice("r_init", r_init, R_INITS)
    if "moe" not in cfg.ffns:
        raise ValueError("router_override=star needs MoE layers; this model has none")
    router = cfg.moe.router
    if router not in UPCYCLABLE_ROUTERS:
        raise ValueError(f"router_override=star upcycles a 'topk' or 'aux_free' router, got "
                         f"{router!r}")
    if router == "aux_free":
        rc = cfg.moe.router_config
        kwargs = dict(score_fn="sigmoid", selection_bias=True,
                      bias_update_rate=rc.bias_update_rate, n_group=rc.n_group,
                      topk_group=rc.topk_group, renormalize=rc.norm_topk_prob,
                      routed_scaling_factor=rc.routed_scaling_factor)
        if rc.axis_name is not None:
            kwargs["axis_name"] = rc.axis_name
    else:
        kwargs = {k: v for k, v in cfg.moe.router_kwargs if k in _STAR_FIELDS}
    new_cfg = cfg.replace(moe=dict(router="star",
                                   router_kwargs=tuple(sorted({**kwargs, "eta": eta}.items()))))
    star_cfg = new_cfg.moe.router_config
    key = jax.random.key(0) if key is None else key
    a = _logit(mix_init)
    blocks, states = list(params["blocks"]), list(state["blocks"])
    for i, kind in enumerate(cfg.ffns):
        if kind != "moe":
            continue
        old_state = states[i]["router"]
        if router == "aux_free" and "bias" not in old_state:
            raise ValueError(f"layer {i}: the aux_free router state holds no 'bias' (the "
                             "checkpoint's e_score_correction_bias); pass the state load_hf "
                             "returns")
        r_params, r_state = star.init(jax.random.fold_in(key, i), star_cfg)
        w_g = blocks[i]["ffn"]["router"]["w_g"]
        E = r_params["a"].shape[0]
        if r_init == "zero":
            w_g = (jnp.asarray(w_g, jnp.float32) / jax.nn.sigmoid(jnp.float32(a))
                   ).astype(jnp.asarray(w_g).dtype)
        r_params = {**r_params, "w_g": w_g, "a": jnp.full_like(r_params["a"], a)}
        if r_init == "zero" and "r" not in r_params:
            raise ValueError("r_init='zero' needs a free R (orthogonal_r=False): an "
                             "orthogonal R = expm(P − P^T) cannot be 0")
        if "r" in r_params:  # a free R; with orthogonal_r, P = 0 is already R = I
            r = jnp.eye(E, dtype=jnp.float32) if r_init == "identity" else jnp.zeros((E, E))
            r_params["r"] = r.astype(r_params["r"].dtype)
        if router == "aux_free":
            r_state = {**r_state, "bias": jnp.asarray(old_state["bias"], jnp.float32)}
        if "active" in old_state:
            r_state = {**r_state, "active": old_state["active"]}
        blocks[i] = {**blocks[i], "ffn": {**blocks[i]["ffn"], "router": r_params}}
        states[i] = {**states[i], "router": r_state}
    return new_cfg, {**params, "blocks": blocks}, {**state, "blocks": states}


def gha_warmup(params: dict, state: dict, cfg: lm.LMConfig, batches: Iterable[Array], *,
               eta: float = 1e-3) -> dict:
    """Moves every STAR router's `V` toward its layer's input subspace: one GHA step per layer
    per batch, by forward passes in training mode with step size `eta` (params unchanged, and
    so is an aux-free selection bias: its update is off during the warm-up).

    Returns:
      the new model state.
    """
    _check_cfg(cfg)
    router = None if cfg.moe is None else cfg.moe.router
    if router != "star" or "moe" not in cfg.ffns:
        raise ValueError(f"gha_warmup needs STAR routers, got {router!r}"
                         + ("" if "moe" in cfg.ffns else " (and no MoE layer)"))
    check_range("eta", eta, 0.0, math.inf, hi_open=True)
    kwargs = {**dict(cfg.moe.router_kwargs), "eta": eta}
    if kwargs.get("bias_update_rate", 0.0) > 0:  # the selection bias stays the checkpoint's
        kwargs["bias_update_rate"] = 0.0
    warm = cfg.replace(moe=dict(router_kwargs=tuple(sorted(kwargs.items()))))

    @jax.jit
    def step(state, tokens):
        return lm.apply(params, state, tokens, cfg=warm, train=True)[1]

    for tokens in batches:
        state = step(state, jnp.asarray(tokens, jnp.int32))
    return state


def logit_difference(params_a: dict, state_a: dict, cfg_a: lm.LMConfig, params_b: dict,
                     state_b: dict, cfg_b: lm.LMConfig, tokens: Array) -> dict[str, float]:
    """Max and mean |logits_a − logits_b| on `tokens`, and the max relative to max |logits_a|."""
    la = np.asarray(lm.apply(params_a, state_a, tokens, cfg=cfg_a)[0])
    lb = np.asarray(lm.apply(params_b, state_b, tokens, cfg=cfg_b)[0])
    diff = np.abs(la - lb)
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
            "max_rel": float(diff.max() / max(np.abs(la).max(), 1e-30))}
