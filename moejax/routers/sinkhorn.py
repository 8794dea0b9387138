"""Sinkhorn-balanced top-k routing (S-BASE; Clark et al. 2022, "Unified Scaling Laws for Routed
Language Models", §2.2 / App. A).

A few Sinkhorn iterations turn `exp(logits)` into an approximately doubly-stochastic assignment
(every token mass 1, every expert the same mass); each token then takes the top-k experts of the
*balanced* matrix, but is weighted by the *unbalanced* `probs = softmax(logits)`. Balancing runs
under `stop_gradient` (selection is discrete anyway); gradients reach `W_g` through the weights.
Iterations run in log space (row then column normalisation, as Megatron-LM's `sinkhorn`), so
`-inf` logits of inactive slots give empty columns without dividing by zero.

A token with NaN/Inf input gets a row of `-inf` before balancing, so it takes no mass from any
column (as if absent), and it selects nothing.

At eval the balancing is off by default (`balance_at_eval=False`): it couples the tokens of a
batch, and with a single token (decoding) it would erase all preference. Axis letters: N tokens,
d model width, E experts.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from moejax.routers import base, common
from moejax.validation import check_bool, check_int

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(base.RouterConfig):
    """Sinkhorn router options (plus `d_model`, `num_experts`, `top_k` of `RouterConfig`).

    Attributes:
      num_iters: Sinkhorn iterations (≥ 1; each normalises rows then columns).
      renormalize: rescale the k selected probabilities to sum to 1 per token.
      balance_at_eval: also select on the balanced matrix when `train=False`.
    """

    num_iters: int = 3
    renormalize: bool = False
    balance_at_eval: bool = False

    def __post_init__(self):
        super().__post_init__()
        check_int("num_iters", self.num_iters, lo=1)
        for name in ("renormalize", "balance_at_eval"):
            check_bool(name, getattr(self, name))


def init(key: Array, cfg: Config) -> tuple[dict, dict]:
    """Returns `({"w_g": <float32>[E, d]}, {})`."""
    return {"w_g": common.init_gate(key, cfg)}, {}


def _finite_lse(a: Array, axis: int) -> Array:
    """logsumexp over `axis`, 0 where the slice is all -inf (so empty rows/columns stay -inf)."""
    lse = jax.nn.logsumexp(a, axis=axis, keepdims=True)
    return jnp.where(jnp.isfinite(lse), lse, 0.0)


def sinkhorn_log(logits: Array, num_iters: int) -> Array:
    """`[N, E]` log of `exp(logits)` after `num_iters` row-then-column normalisations.

    After the last step every non-empty column sums to 1 and rows are close to equal mass; the
    result carries no gradient.
    """

    def step(_, log_p):
        log_p = log_p - _finite_lse(log_p, axis=1)
        return log_p - _finite_lse(log_p, axis=0)

    return jax.lax.fori_loop(0, num_iters, step, jax.lax.stop_gradient(logits))


def route(params: dict, state: dict, x: Array, *, cfg: Config, train: bool,
          rng: Array | None = None) -> tuple[base.RouterOutput, dict]:
    """Routes `x: [N, d]` to the top-k experts of the Sinkhorn-balanced scores.

    Args:
      params: `{"w_g": [E, d]}`.
      state: dict, returned unchanged (may hold `"active": <bool>[E]`).
      x: `[N, d]` tokens, any float dtype (routing runs in float32); rows with NaN/Inf are
        routed nowhere and left out of the balancing.
      cfg: `Config`.
      train: balance the batch (always, or only here unless `cfg.balance_at_eval`).
      rng: unused.

    Returns:
      `(RouterOutput, state)`; no auxiliary loss (0), no metrics.
    """
    del rng
    base.check_input(x, cfg)
    x, valid = common.finite_tokens(x)
    logits = common.mask_inactive(common.gate_logits(params, x), state)
    probs = jax.nn.softmax(logits, axis=-1)
    if train or cfg.balance_at_eval:
        scores = sinkhorn_log(jnp.where(valid[:, None], logits, -jnp.inf), cfg.num_iters)
    else:
        scores = logits
    mask = common.topk_mask(scores, cfg.top_k) & jnp.isfinite(logits) & valid[:, None]
    weights = common.masked_weights(probs, mask, renormalize=cfg.renormalize)
    return base.RouterOutput(weights=weights, mask=mask, probs=probs,
                             aux_loss=jnp.zeros((), jnp.float32), metrics={}), state


def max_assignments(cfg: Config) -> int:
    """Each token selects at most `top_k` experts."""
    return cfg.top_k
