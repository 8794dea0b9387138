"""Top-k token-choice router with the Switch load-balance loss and the router z-loss.

Each token picks the `k` experts of largest `probs = softmax(x W_g^T)` (Shazeer et al. 2017,
"Outrageously Large Neural Networks"; k=1 is Switch, Fedus et al. 2021). Axis letters: N tokens,
d model width, E experts.

Example:
  >>> cfg = Config(d_model=16, num_experts=4, top_k=2)
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
from moejax.validation import check_bool, check_range

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(base.RouterConfig):
    """Top-k router options (plus `d_model`, `num_experts`, `top_k` of `RouterConfig`).

    Attributes:
      renormalize: rescale the k selected probabilities to sum to 1 per token.
      load_balance_weight: α of the Switch loss `α·E·Σ_e f_e P_e` (≥ 0; 0 disables).
      z_loss_weight: β of the z-loss `β·mean(logsumexp(logits)²)` (≥ 0; 0 disables).
    """

    renormalize: bool = False
    load_balance_weight: float = 1e-2
    z_loss_weight: float = 1e-3

    def __post_init__(self):
        super().__post_init__()
        check_bool("renormalize", self.renormalize)
        for name in ("load_balance_weight", "z_loss_weight"):
            check_range(name, getattr(self, name), 0.0, float("inf"), lo_open=False,
                        hi_open=True)


def init(key: Array, cfg: Config) -> tuple[dict, dict]:
    """Returns `({"w_g": <float32>[E, d]}, {})`."""
    return {"w_g": common.init_gate(key, cfg)}, {}


def route_from_logits(logits: Array, *, cfg: Config, valid: Array | None = None
                      ) -> base.RouterOutput:
    """Top-k selection, weights and losses from `<float32>[N, E]` logits (inactive slots -inf).

    Shared with `noisy_topk`, which routes on perturbed logits. If fewer than `top_k` slots are
    active, only the active ones are selected. Tokens outside `valid` (`<bool>[N]`, default all)
    select nothing and count in no loss.
    """
    probs = jax.nn.softmax(logits, axis=-1)
    mask = common.topk_mask(probs, cfg.top_k) & jnp.isfinite(logits)
    if valid is not None:
        mask = mask & valid[:, None]
    weights = common.masked_weights(probs, mask, renormalize=cfg.renormalize)
    switch = losses.switch_load_balance_loss(probs, mask, weight=cfg.load_balance_weight,
                                             valid=valid)
    z = losses.router_z_loss(logits, weight=cfg.z_loss_weight, valid=valid)
    return base.RouterOutput(
        weights=weights, mask=mask, probs=probs, aux_loss=switch + z,
        metrics={"switch_loss": switch, "z_loss": z},
    )


def route(params: dict, state: dict, x: Array, *, cfg: Config, train: bool,
          rng: Array | None = None) -> tuple[base.RouterOutput, dict]:
    """Routes `x: [N, d]` to the top-k experts; deterministic, stateless.

    Args:
      params: `{"w_g": [E, d]}`.
      state: dict, returned unchanged (may hold `"active": <bool>[E]`).
      x: `[N, d]` tokens, any float dtype (routing runs in float32); rows with NaN/Inf are
        routed nowhere and left out of the losses.
      cfg: `Config`.
      train: unused (top-k behaves the same at train and eval).
      rng: unused.

    Returns:
      `(RouterOutput, state)`; `aux_loss = switch_loss + z_loss`.
    """
    del train, rng
    base.check_input(x, cfg)
    x, valid = common.finite_tokens(x)
    logits = common.mask_inactive(common.gate_logits(params, x), state)
    return route_from_logits(logits, cfg=cfg, valid=valid), state


def max_assignments(cfg: Config) -> int:
    """Each token selects at most `top_k` experts."""
    return cfg.top_k
