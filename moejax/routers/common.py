"""Gate helpers the routers share: the linear gate, inactive-slot masking, top-k selection,
masked weights and the non-finite-token split (the rules are those of `moejax.routers.base`).

Nothing here is part of the router contract itself (that is `base`); these are the pieces
several routers build their `route` from. Axis letters: N tokens, d model width, E experts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.routers.base import RouterConfig

Array = jax.Array


def init_gate(key: Array, cfg: RouterConfig) -> Array:
    """`<float32>[E, d]` gate matrix, normal with std `d**-0.5` (logits start at O(1) scale)."""
    shape = (cfg.num_experts, cfg.d_model)
    return jax.random.normal(key, shape, jnp.float32) * cfg.d_model**-0.5


def gate_logits(params: dict, x: Array, *, name: str = "w_g") -> Array:
    """`<float32>[N, E]` logits `x W^T` for `W = params[name]` (`[E, d]`), at full f32 precision."""
    w = params[name].astype(jnp.float32)
    return jnp.einsum(
        "nd,ed->ne", x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST
    )


def mask_inactive(logits: Array, state: dict) -> Array:
    """Sets logits of inactive expert slots (`state["active"]` False) to -inf."""
    active = state.get("active") if isinstance(state, dict) else None
    if active is None:
        return logits
    return jnp.where(active[None, :], logits, -jnp.inf)


def topk_mask(scores: Array, k: int) -> Array:
    """`<bool>[N, E]`, True at the k largest entries of each row (ties: lowest index)."""
    _, idx = jax.lax.top_k(scores, k)
    return jnp.any(jax.nn.one_hot(idx, scores.shape[-1], dtype=jnp.bool_), axis=-2)


def masked_weights(scores: Array, mask: Array, *, renormalize: bool) -> Array:
    """`scores` where `mask`, else 0; with `renormalize`, rescaled to sum to 1 per token."""
    weights = jnp.where(mask, scores, 0.0)
    if renormalize:
        weights = weights / jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), 1e-30)
    return weights


def finite_tokens(x: Array) -> tuple[Array, Array]:
    """Splits off the non-finite tokens of `x: [N, d]`.

    Returns:
      `(x_safe, finite)`: `finite` is `<bool>[N]`, True where the row holds no NaN or Inf;
      `x_safe` is `x` with the other rows set to 0 (same dtype). Route on `x_safe` and mask with
      `finite`: the zeroed rows keep NaN out of every sum over tokens and out of the gradients
      (`where` passes a zero cotangent to the bad rows; `0 * NaN` would not).
    """
    finite = jnp.all(jnp.isfinite(x), axis=-1)
    return jnp.where(finite[:, None], x, jnp.zeros((), x.dtype)), finite


def valid_mean(values: Array, valid: Array) -> Array:
    """Mean of `values: [N, ...]` over the tokens where `valid: <bool>[N]` (0 if there are none).

    Returns an array of shape `values.shape[1:]` (float32).
    """
    values = values.astype(jnp.float32)
    keep = valid.reshape(valid.shape + (1,) * (values.ndim - 1))
    total = jnp.sum(jnp.where(keep, values, 0.0), axis=0)
    return total / jnp.maximum(jnp.sum(valid, dtype=jnp.float32), 1.0)
