"""Auxiliary routing losses. Each returns a float32 scalar and cites its source.

Each takes an optional `valid: <bool>[N]`: the tokens the loss averages over (default all). The
routers pass their finite tokens, so a token with NaN/Inf input counts in no loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.routers.common import valid_mean

Array = jax.Array


def _mean_over_tokens(values: Array, valid: Array | None) -> Array:
    return jnp.mean(values, axis=0) if valid is None else valid_mean(values, valid)


def switch_load_balance_loss(probs: Array, mask: Array, *, weight: float = 1e-2,
                             valid: Array | None = None) -> Array:
    """Switch Transformer load-balancing loss `α·E·Σ_e f_e P_e` (Fedus et al. 2021, eq. 4).

    Args:
      probs: `[N, E]` routing probabilities.
      mask: `[N, E]` bool, selected experts.
      weight: α.
      valid: optional `<bool>[N]`, the tokens that count (their mask rows should be False
        elsewhere); default all.

    Returns:
      scalar; `f_e` is the fraction of assignments that went to e (sums to 1 over e) and `P_e`
      the mean probability of e over the valid tokens, so a uniform router scores exactly α. A
      weight of 0 returns 0 without computing anything.
    """
    if not weight:
        return jnp.zeros((), jnp.float32)
    probs = probs.astype(jnp.float32)
    mask = mask if valid is None else mask & valid[:, None]
    counts = jnp.sum(mask.astype(jnp.float32), axis=0)
    f = counts / jnp.maximum(jnp.sum(counts), 1.0)
    p = _mean_over_tokens(probs, valid)
    return weight * probs.shape[-1] * jnp.sum(f * p)


def router_z_loss(logits: Array, *, weight: float = 1e-3, valid: Array | None = None) -> Array:
    """Router z-loss `β·mean(logsumexp(logits)²)` (Zoph et al. 2022, ST-MoE eq. 5); 0 if β = 0.

    The mean runs over the `valid` tokens (`<bool>[N]`) if given.
    """
    if not weight:
        return jnp.zeros((), jnp.float32)
    lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return weight * _mean_over_tokens(lse**2, valid)
