"""Top-p (confidence-mass) router: each token takes experts until their mass reaches p.

MASS (Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing in MoE Models"):
sort `probs = softmax(x W_g^T)` descending and keep an expert while the mass *before* it is
below p, `mask = (cumsum(sorted) − sorted) < p`, so the first expert is always kept. Weights are
the selected probabilities renormalised to sum to 1 per token, as in the MASS authors' code
(Park & Park 2025, psmiz/MASS: their tutel gate feeds the probs to a MoE layer built with
`normalize_gate=True`); `renormalize=False` keeps the raw probabilities. Axis letters: N tokens,
d width, E experts.

Example:
  >>> cfg = Config(d_model=16, num_experts=4, top_p=0.5)
  >>> params, state = init(jax.random.key(0), cfg)
  >>> out, state = route(params, state, jnp.ones((8, 16)), cfg=cfg, train=True)
  >>> out.mask.shape
  (8, 4)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from moejax.routers import base, common, losses
from moejax.validation import check_bool, check_int, check_range

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(base.RouterConfig):
    """Top-p options (plus the `RouterConfig` fields; `top_k` is unused).

    Attributes:
      top_p: confidence mass p in (0, 1] (MASS uses 0.5 or 0.3).
      max_k: optional cap on experts per token, 1 ≤ max_k ≤ num_experts (None: no cap).
      load_balance_weight: α of the Switch loss (≥ 0; 0, the default, disables it).
      renormalize: rescale the selected probabilities to sum to 1 per token (default True, the
        authors' `normalize_gate=True`); False: the weights are the probabilities themselves.
    """

    top_p: float = 0.5
    max_k: int | None = None
    load_balance_weight: float = 0.0
    renormalize: bool = True

    def __post_init__(self):
        super().__post_init__()
        check_range("top_p", self.top_p, 0.0, 1.0)
        if self.max_k is not None:
            check_int("max_k", self.max_k, lo=1)
            if self.max_k > self.num_experts:
                raise ValueError(f"max_k={self.max_k} must be <= num_experts={self.num_experts}")
        check_range("load_balance_weight", self.load_balance_weight, 0.0, float("inf"),
                    lo_open=False, hi_open=True)
        check_bool("renormalize", self.renormalize)


def init(key: Array, cfg: Config) -> tuple[dict, dict]:
    """Returns `({"w_g": <float32>[E, d]}, {})`."""
    return {"w_g": common.init_gate(key, cfg)}, {}


def top_p_mask(probs: Array, p: float, max_k: int | None = None) -> Array:
    """`<bool>[N, E]`: the fewest largest probabilities whose mass reaches `p` (≥ 1, ≤ max_k).

    Ties are broken by the lower expert index (stable sort).
    """
    order = jnp.argsort(-probs, axis=-1, stable=True)
    sorted_p = jnp.take_along_axis(probs, order, axis=-1)
    keep = (jnp.cumsum(sorted_p, axis=-1) - sorted_p) < p
    rank = jnp.arange(probs.shape[-1])
    keep = (keep | (rank == 0)) & (rank < (max_k or probs.shape[-1]))
    return jnp.take_along_axis(keep, jnp.argsort(order, axis=-1), axis=-1)


def route(params: dict, state: dict, x: Array, *, cfg: Config, train: bool,
          rng: Array | None = None) -> tuple[base.RouterOutput, dict]:
    """Routes `x: [N, d]` to a variable number of experts per token; deterministic, stateless.

    Args:
      params: `{"w_g": [E, d]}`.
      state: dict, returned unchanged (may hold `"active": <bool>[E]`).
      x: `[N, d]` tokens, any float dtype (routing runs in float32); rows with NaN/Inf are
        routed nowhere and left out of every loss, metric and statistic.
      cfg: `Config`.
      train: unused.
      rng: unused.

    Returns:
      `(RouterOutput, state)`; weights are the probs of the selected experts, renormalised
      over them per token when `cfg.renormalize` (0 elsewhere and for non-finite tokens).
    """
    del train, rng
    base.check_input(x, cfg)
    x, valid = common.finite_tokens(x)
    logits = common.mask_inactive(common.gate_logits(params, x), state)
    probs = jax.nn.softmax(logits, axis=-1)
    mask = top_p_mask(probs, cfg.top_p, cfg.max_k) & jnp.isfinite(logits) & valid[:, None]
    weights = common.masked_weights(probs, mask, renormalize=cfg.renormalize)
    switch = losses.switch_load_balance_loss(probs, mask, weight=cfg.load_balance_weight,
                                             valid=valid)
    metrics = {"switch_loss": switch,
               "avg_k": common.valid_mean(jnp.sum(mask, axis=-1, dtype=jnp.float32), valid)}
    return base.RouterOutput(weights=weights, mask=mask, probs=probs, aux_loss=switch,
                             metrics=metrics), state


def max_assignments(cfg: Config) -> int:
    """At most `max_k` (default E) experts per token."""
    return cfg.max_k or cfg.num_experts
