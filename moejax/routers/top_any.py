"""Top-any router: each expert has a trainable threshold, a token takes every expert above it.

DynMoE (Guo et al. 2024, "Dynamic Mixture of Experts: An Auto-Tuning Approach for Efficient
Transformer Models"): `gate_e = σ(cos(x, w_e) / τ)`, expert e selected where
`gate_e > σ(G_e)` with trainable thresholds `G`; a token with no expert above its threshold takes
the arg-max. The 0/1 decision `sign(gate − σ(G))` is passed straight through (identity backward,
as the authors' `GAMoEGateBackward`), so `w_g` and `G` get gradients. As in the paper (and its
code, `gates /= K`), the k selected experts share the token equally: weight 1/k each in the
forward pass, with the straight-through gradient of `(gate_e − σ(G_e)) / k`.
Axis letters: N tokens, d width, E experts.

Example:
  >>> cfg = Config(d_model=16, num_experts=4)
  >>> params, state = init(jax.random.key(0), cfg)
  >>> out, state = route(params, state, jnp.ones((8, 16)), cfg=cfg, train=True)
  >>> out.weights.shape
  (8, 4)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from moejax.routers import base, common, losses
from moejax.validation import check_range

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(base.RouterConfig):
    """Top-any options (plus the `RouterConfig` fields; `top_k` is unused).

    Attributes:
      tau: temperature τ > 0 of `σ(cos / τ)`.
      threshold_init: initial value of every threshold G_e (0: σ(G) = 0.5, i.e. cos > 0).
      load_balance_weight: α of the Switch loss (≥ 0; 0, the default, disables it).
    """

    tau: float = 1.0
    threshold_init: float = 0.0
    load_balance_weight: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        check_range("tau", self.tau, 0.0, float("inf"), hi_open=True)
        check_range("threshold_init", self.threshold_init, -float("inf"), float("inf"),
                    hi_open=True, lo_open=True)
        check_range("load_balance_weight", self.load_balance_weight, 0.0, float("inf"),
                    lo_open=False, hi_open=True)


def init(key: Array, cfg: Config) -> tuple[dict, dict]:
    """Returns `({"w_g": <float32>[E, d], "thresholds": <float32>[E]}, {})`."""
    thresholds = jnp.full((cfg.num_experts,), cfg.threshold_init, jnp.float32)
    return {"w_g": common.init_gate(key, cfg), "thresholds": thresholds}, {}


def _unit_rows(a: Array) -> Array:
    return a * jax.lax.rsqrt(jnp.sum(a * a, axis=-1, keepdims=True) + 1e-12)


def route(params: dict, state: dict, x: Array, *, cfg: Config, train: bool,
          rng: Array | None = None) -> tuple[base.RouterOutput, dict]:
    """Routes `x: [N, d]` to every expert whose gate exceeds its threshold (≥ 1 per token).

    Args:
      params: `{"w_g": [E, d], "thresholds": [E]}`.
      state: dict, returned unchanged (may hold `"active": <bool>[E]`).
      x: `[N, d]` tokens, any float dtype (routing runs in float32); rows with NaN/Inf are
        routed nowhere and left out of every loss, metric and statistic.
      cfg: `Config`.
      train: unused (same rule at train and eval).
      rng: unused.

    Returns:
      `(RouterOutput, state)`; weights are 1/k on the k selected experts (straight-through
      gradients); probs = `softmax(cos / τ)` over the active experts.
    """
    del train, rng
    base.check_input(x, cfg)
    x, valid = common.finite_tokens(x)
    w = params["w_g"].astype(jnp.float32)
    cos = common.gate_logits({"w_g": _unit_rows(w)}, _unit_rows(x.astype(jnp.float32)))
    logits = common.mask_inactive(cos / cfg.tau, state)
    gate = jax.nn.sigmoid(logits)  # 0 at inactive slots
    margin = gate - jax.nn.sigmoid(params["thresholds"].astype(jnp.float32))[None, :]
    argmax = jax.nn.one_hot(jnp.argmax(logits, axis=-1), cfg.num_experts, dtype=jnp.bool_)
    above = margin > 0
    mask = (above | (argmax & ~jnp.any(above, axis=-1, keepdims=True))) & jnp.isfinite(logits)
    mask = mask & valid[:, None]
    # Straight-through: forward value 1 on the mask, backward d(margin).
    m_st = jnp.where(mask, 1.0 + margin - jax.lax.stop_gradient(margin), 0.0)
    k = jnp.sum(mask, axis=-1, keepdims=True, dtype=jnp.float32)
    weights = m_st / jnp.maximum(k, 1.0)  # k = 0 only for a non-finite token (m_st = 0 there)
    probs = jax.nn.softmax(logits, axis=-1)
    switch = losses.switch_load_balance_loss(probs, mask, weight=cfg.load_balance_weight,
                                             valid=valid)
    metrics = {"switch_loss": switch, "avg_k": common.valid_mean(k[:, 0], valid),
               "no_expert_frac": common.valid_mean(~jnp.any(above, axis=-1), valid)}
    return base.RouterOutput(weights=weights, mask=mask, probs=probs, aux_loss=switch,
                             metrics=metrics), state


def max_assignments(cfg: Config) -> int:
    """Any number of experts, up to all E."""
    return cfg.num_experts
