"""Auxiliary routing losses. Each returns a float32 scalar and cites its source."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def switch_load_balance_loss(probs: Array, mask: Array, *, weight: float = 1e-2) -> Array:
    """Switch Transformer load-balancing loss `α·E·Σ_e f_e P_e` (Fedus et al. 2021, eq. 4).

    Args:
      probs: `[N, E]` routing probabilities.
      mask: `[N, E]` bool, selected experts.
      weight: α.

    Returns:
      scalar; `f_e` is the fraction of assignments that went to e (sums to 1 over e) and `P_e`
      the mean probability of e, so a uniform router scores exactly α. A weight of 0 returns
      0 without computing anything.
    """
    if not weight:
        return jnp.zeros((), jnp.float32)
    probs = probs.astype(jnp.float32)
    counts = jnp.sum(mask.astype(jnp.float32), axis=0)
    f = counts / jnp.maximum(jnp.sum(counts), 1.0)
    p = jnp.mean(probs, axis=0)
    return weight * probs.shape[-1] * jnp.sum(f * p)


def router_z_loss(logits: Array, *, weight: float = 1e-3) -> Array:
    """Router z-loss `β·mean(logsumexp(logits)²)` (Zoph et al. 2022, ST-MoE eq. 5); 0 if β = 0."""
    if not weight:
        return jnp.zeros((), jnp.float32)
    lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return weight * jnp.mean(lse**2)
