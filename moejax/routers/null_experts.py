"""Null-expert router: m zero-output experts join the top-k pool, so tokens use 0..k real experts.

AdaMoE (Zeng et al. 2024, "AdaMoE: Token-Adaptive Routing with Null Experts for Mixture-of-Experts
Language Models"): the gate scores E real and m null experts, `probs = softmax(x [W_g; W_null]^T)`
over E+m, each token takes its top-k of the E+m, and the Switch balance loss runs over all E+m
(the paper averages the nulls' loads first; we treat them as ordinary slots, as DESIGN §4 says).
A null expert outputs zero, so its slot is skipped compute. The returned `RouterOutput` covers the
real experts only (`[N, E]`): weights are the E+m probs renormalised over the k selected slots
(nulls included) and restricted to the real experts, so a row sums to 1 − its null share; probs
are the E+m probs restricted to the real experts (rows sum to ≤ 1).
Axis letters: N tokens, d width, E real experts, m null experts.

Example:
  >>> cfg = Config(d_model=16, num_experts=4, top_k=2, num_null=2)
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
from moejax.validation import check_int, check_range

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(base.RouterConfig):
    """Null-expert options (plus the `RouterConfig` fields; `top_k` is k over E+m slots).

    Attributes:
      num_null: number m ≥ 0 of null (zero-output) experts.
      load_balance_weight: α of the Switch loss over all E+m slots (≥ 0; 0 disables).
    """

    num_null: int = 1
    load_balance_weight: float = 1e-2

    def __post_init__(self):
        super().__post_init__()
        check_int("num_null", self.num_null, lo=0)
        check_range("load_balance_weight", self.load_balance_weight, 0.0, float("inf"),
                    lo_open=False, hi_open=True)


def init(key: Array, cfg: Config) -> tuple[dict, dict]:
    """Returns `({"w_g": <float32>[E, d], "w_null": <float32>[m, d]}, {})`."""
    k_real, k_null = jax.random.split(key)
    w_null = jax.random.normal(k_null, (cfg.num_null, cfg.d_model), jnp.float32)
    return {"w_g": common.init_gate(k_real, cfg), "w_null": w_null * cfg.d_model**-0.5}, {}


def route(params: dict, state: dict, x: Array, *, cfg: Config, train: bool,
          rng: Array | None = None) -> tuple[base.RouterOutput, dict]:
    """Routes `x: [N, d]` to its top-k of E real + m null experts; deterministic, stateless.

    Args:
      params: `{"w_g": [E, d], "w_null": [m, d]}`.
      state: dict, returned unchanged (may hold `"active": <bool>[E]` for the real experts).
      x: `[N, d]` tokens, any float dtype (routing runs in float32); rows with NaN/Inf are
        routed nowhere and left out of every loss, metric and statistic.
      cfg: `Config`.
      train: unused.
      rng: unused.

    Returns:
      `(RouterOutput, state)` with `[N, E]` fields for the real experts (see module docstring);
      metrics `avg_real_k` (real experts per token), `null_share` (share of the k slots that went
      to nulls) and `null_weight` (mean combine weight skipped).
    """
    del train, rng
    base.check_input(x, cfg)
    E = cfg.num_experts
    x, valid = common.finite_tokens(x)
    real = common.mask_inactive(common.gate_logits(params, x), state)
    null = common.gate_logits(params, x, name="w_null")
    logits = jnp.concatenate([real, null], axis=-1)  # [N, E+m]
    probs = jax.nn.softmax(logits, axis=-1)
    mask = common.topk_mask(probs, cfg.top_k) & jnp.isfinite(logits) & valid[:, None]
    sel = jnp.where(mask, probs, 0.0)
    weights = sel / jnp.maximum(jnp.sum(sel, axis=-1, keepdims=True), 1e-30)
    switch = losses.switch_load_balance_loss(probs, mask, weight=cfg.load_balance_weight,
                                             valid=valid)
    avg_real_k = common.valid_mean(jnp.sum(mask[:, :E], axis=-1, dtype=jnp.float32), valid)
    metrics = {
        "switch_loss": switch,
        "avg_real_k": avg_real_k,
        "null_share": 1.0 - avg_real_k / cfg.top_k,
        "null_weight": common.valid_mean(jnp.sum(weights[:, E:], axis=-1), valid),
    }
    out = base.RouterOutput(weights=weights[:, :E], mask=mask[:, :E], probs=probs[:, :E],
                            aux_loss=switch, metrics=metrics)
    return out, state


def max_assignments(cfg: Config) -> int:
    """At most `top_k` real experts per token."""
    return cfg.top_k
