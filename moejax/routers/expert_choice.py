"""Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing").

Experts pick tokens instead of tokens picking experts: with `probs = softmax(x W_g^T)` over
experts, expert `e` takes the `C` tokens with the largest `probs[:, e]`, where
`C = ceil(capacity_factor · N · k / E)` clipped to `[1, N]` (`k = top_k`, the average number of
experts per token). Load is perfectly balanced by construction, so there is no auxiliary loss; a
token may be taken by 0 … E experts. A token with NaN/Inf input is no candidate for any expert
(it ranks below every finite token), so the others compete as if it were absent (C stays that of
N, a static shape). Axis letters: N tokens, d model width, E experts, C capacity.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from moejax.routers import base, common
from moejax.validation import check_range

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(base.RouterConfig):
    """Expert-choice options (plus `d_model`, `num_experts`, `top_k` of `RouterConfig`).

    Attributes:
      capacity_factor: tokens per expert relative to the balanced share `N·k/E` (> 0).
    """

    capacity_factor: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        check_range("capacity_factor", self.capacity_factor, 0.0, float("inf"),
                    hi_open=True)


def capacity(num_tokens: int, cfg: Config) -> int:
    """`C = ceil(capacity_factor · N · top_k / E)`, clipped to `[1, N]` (static).

    `E` counts every slot, inactive MASS slots included, so that C stays a static shape.
    """
    c = math.ceil(cfg.capacity_factor * num_tokens * cfg.top_k / cfg.num_experts)
    return max(1, min(c, num_tokens))


def init(key: Array, cfg: Config) -> tuple[dict, dict]:
    """Returns `({"w_g": <float32>[E, d]}, {})`."""
    return {"w_g": common.init_gate(key, cfg)}, {}


def route(params: dict, state: dict, x: Array, *, cfg: Config, train: bool,
          rng: Array | None = None) -> tuple[base.RouterOutput, dict]:
    """Each expert selects its top-C tokens of `x: [N, d]`.

    Args:
      params: `{"w_g": [E, d]}`.
      state: dict, returned unchanged; inactive slots (`state["active"]` False) take no tokens.
      x: `[N, d]` tokens, any float dtype (routing runs in float32); rows with NaN/Inf are
        routed nowhere and left out of every loss, metric and statistic.
      cfg: `Config`.
      train: unused (same behaviour at train and eval; note it depends on the whole batch).
      rng: unused.

    Returns:
      `(RouterOutput, state)`; `weights[n, e] = probs[n, e]` where expert e took token n; every
      column of `mask` holds exactly C Trues for active experts (fewer if fewer than C tokens
      are finite) and none for inactive ones. Metrics: `capacity` (C) and `unrouted_fraction`
      (share of the finite tokens that no expert took).
    """
    del train, rng
    base.check_input(x, cfg)
    n, e = x.shape[0], cfg.num_experts
    c = capacity(n, cfg)
    x, valid = common.finite_tokens(x)
    logits = common.mask_inactive(common.gate_logits(params, x), state)
    probs = jax.nn.softmax(logits, axis=-1)
    scores = jnp.where(valid[:, None], probs, -1.0)  # probs >= 0: bad tokens rank last
    _, idx = jax.lax.top_k(scores.T, c)  # [E, C] token indices per expert
    taken = jnp.zeros((e, n), jnp.bool_).at[jnp.arange(e)[:, None], idx].set(True)
    mask = taken.T & jnp.isfinite(logits) & valid[:, None]
    weights = jnp.where(mask, probs, 0.0)
    unrouted = common.valid_mean(jnp.logical_not(jnp.any(mask, axis=-1)), valid)
    metrics = {"capacity": jnp.asarray(c, jnp.float32), "unrouted_fraction": unrouted}
    return base.RouterOutput(weights=weights, mask=mask, probs=probs,
                             aux_loss=jnp.zeros((), jnp.float32), metrics=metrics), state


def max_assignments(cfg: Config) -> int:
    """A token can be taken by every expert."""
    return cfg.num_experts
