"""Upcycling a trained LM's parts into this research line's, starting (almost) where it was.

  to_qdelta(params, cfg, lam_init)        Gated DeltaNet → gated Q-Delta (DeltaNet → Q-Delta):
                                          W_λ = 0 and a learnable λ bias b_λ
                                          (`learnable_lam_bias`) set so that λ = lam_init on
                                          every token; λ → 0 recovers the original layer
                                          exactly.
  to_star(params, state, cfg, mix_init)   top-k router → STAR: the learned gate keeps W_g and
                                          σ(a) = mix_init (near 1), R = I; V starts random and
                                          `gha_warmup` moves it onto the principal subspace of
                                          each MoE layer's inputs with forward passes over data.

Both return a new config and new trees and never touch the inputs. `logit_difference` reports how
far the upcycled model starts from the original.
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
from moejax.validation import ArgumentTypeError, check_range

Array = jax.Array

QDELTA_OF = {"gated_deltanet": "gated_qdelta", "deltanet": "qdelta", "kda": "kda_qdelta"}
_STAR_FIELDS = {f.name for f in dataclasses.fields(star.Config)}


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
            eta: float = 2e-5, key: Array | None = None) -> tuple[lm.LMConfig, dict, dict]:
    """Turns the top-k routers of every MoE layer into STAR routers.

    The learned gate keeps `W_g`; `a = logit(mix_init)` so the subspace term starts with weight
    `1 − mix_init`; `P = 0` (R = I); `V` is STAR's random orthonormal init (run `gha_warmup`).
    Router options STAR shares (renormalize, load_balance_weight) carry over.

    Raises:
      ValueError: `mix_init` not in (0, 1), `eta` not > 0, the model has no MoE layer, or its
        router is not "topk" (`ArgumentTypeError` for a non-number or a non-`LMConfig` cfg).
    """
    _check_cfg(cfg)
    check_range("mix_init", mix_init, 0.0, 1.0, hi_open=True)
    check_range("eta", eta, 0.0, math.inf, hi_open=True)
    if "moe" not in cfg.ffns:
        raise ValueError("router_override=star needs MoE layers; this model has none")
    if cfg.moe.router != "topk":
        raise ValueError(f"router_override=star upcycles a 'topk' router, got "
                         f"{cfg.moe.router!r}")
    kwargs = {k: v for k, v in cfg.moe.router_kwargs if k in _STAR_FIELDS}
    new_cfg = cfg.replace(moe=dict(router="star",
                                   router_kwargs=tuple(sorted({**kwargs, "eta": eta}.items()))))
    key = jax.random.key(0) if key is None else key
    blocks, states = list(params["blocks"]), list(state["blocks"])
    for i, kind in enumerate(cfg.ffns):
        if kind != "moe":
            continue
        r_params, r_state = star.init(jax.random.fold_in(key, i), new_cfg.moe.router_config)
        w_g = blocks[i]["ffn"]["router"]["w_g"]
        r_params = {**r_params, "w_g": w_g,
                    "a": jnp.full_like(r_params["a"], _logit(mix_init))}
        blocks[i] = {**blocks[i], "ffn": {**blocks[i]["ffn"], "router": r_params}}
        states[i] = {**states[i], "router": r_state}
    return new_cfg, {**params, "blocks": blocks}, {**state, "blocks": states}


def gha_warmup(params: dict, state: dict, cfg: lm.LMConfig, batches: Iterable[Array], *,
               eta: float = 1e-3) -> dict:
    """Moves every STAR router's `V` toward its layer's input subspace: one GHA step per layer
    per batch, by forward passes in training mode with step size `eta` (params unchanged).

    Returns:
      the new model state.
    """
    _check_cfg(cfg)
    router = None if cfg.moe is None else cfg.moe.router
    if router != "star" or "moe" not in cfg.ffns:
        raise ValueError(f"gha_warmup needs STAR routers, got {router!r}"
                         + ("" if "moe" in cfg.ffns else " (and no MoE layer)"))
    check_range("eta", eta, 0.0, math.inf, hi_open=True)
    warm = cfg.replace(moe=dict(
        router_kwargs=tuple(sorted({**dict(cfg.moe.router_kwargs), "eta": eta}.items()))))

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
