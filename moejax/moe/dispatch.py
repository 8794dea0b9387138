"""Dispatchers: move tokens to experts and back. The router decides; nothing here computes gates.

Axis letters: N tokens, d model width, E experts, C capacity slots per expert, K assignments per
token kept by the dropless dispatcher, M = N·K sorted assignment rows.

Both dispatchers take the router's decision as `weights: [N, E]` (0 off the mask) and
`mask: <bool>[N, E]` and compute `y_n = Σ_{e in mask_n} weights[n, e] · expert_e(x_n)`.

**capacity** (GShard / Switch one-hot einsums): each expert has `C = ⌈cf·N·k/E⌉` slots (capped at
N, which is never exceeded). Slots are filled by priority = token order: the i-th token (in order
of n) routed to e takes slot i. Assignments past C are dropped and counted; a token whose every
assignment was dropped gets zero MoE output (the residual carries it). Memory `O(N·E·C)`.

  plan = capacity_plan(weights, mask, capacity=C)
  xe = capacity_dispatch(plan, x)                     # [E, C, d]
  y = capacity_combine(plan, expert_bank(xe))         # [N, d]

**dropless** (MegaBlocks): per token keep up to K experts of the mask (K = the router's static
`max_assignments`), flatten to M = N·K assignments, sort them by expert id (unused slots get the
sentinel id E and sort to the end, outside `group_sizes`), run the experts as grouped matmuls on
the sorted rows, un-sort and combine with the weights. Memory `O(N·K·d)`, flat in E.

  plan = sort_plan(weights, mask, k=K)
  xs = permute(plan, x)                               # [M, d]
  y = unpermute(plan, grouped_experts(xs, plan.group_sizes))   # [N, d]
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

Array = jax.Array

DISPATCHERS: tuple[str, ...] = ("capacity", "dropless")


def compute_capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float) -> int:
    """Slots per expert `C = min(⌈cf·N·k/E⌉, N)` (≥ 1); an expert never gets more than N tokens."""
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    c = math.ceil(capacity_factor * num_tokens * k / num_experts)
    return max(1, min(c, num_tokens))


def _dropped_stats(mask: Array, kept: Array) -> dict:
    total = jnp.sum(mask, dtype=jnp.float32)
    dropped = total - jnp.sum(kept, dtype=jnp.float32)
    lost_token = jnp.any(mask, axis=-1) & ~jnp.any(kept, axis=-1)
    return {
        "dropped_fraction": dropped / jnp.maximum(total, 1.0),
        "dropped_token_fraction": jnp.mean(lost_token.astype(jnp.float32)),
    }


# ---------------------------------------------------------------------------------- capacity


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CapacityPlan:
    """One-hot dispatch and combine tensors of the capacity dispatcher.

    Attributes:
      dispatch: `<float32>[N, E, C]`, 1 at the slot of each kept assignment.
      combine: `<float32>[N, E, C]`, `dispatch` times the combine weight.
      kept: `<bool>[N, E]`, assignments that got a slot (`mask` minus overflow).
      stats: `{"dropped_fraction", "dropped_token_fraction"}` float32 scalars: share of
        assignments dropped, share of tokens with every assignment dropped.
    """

    dispatch: Array
    combine: Array
    kept: Array
    stats: dict


def capacity_plan(weights: Array, mask: Array, *, capacity: int) -> CapacityPlan:
    """Assigns slots by token order and builds the one-hot dispatch/combine tensors.

    Args:
      weights: `[N, E]` combine weights (0 off the mask).
      mask: `<bool>[N, E]` selected experts.
      capacity: C, slots per expert (see `compute_capacity`).

    Returns:
      `CapacityPlan`.
    """
    mask = mask.astype(jnp.bool_)
    position = jnp.cumsum(mask, axis=0, dtype=jnp.int32) - 1  # [N, E] slot if kept
    kept = mask & (position < capacity)
    dispatch = jax.nn.one_hot(jnp.where(kept, position, capacity), capacity, dtype=jnp.float32)
    combine = dispatch * jnp.where(kept, weights, 0.0).astype(jnp.float32)[..., None]
    return CapacityPlan(dispatch=dispatch, combine=combine, kept=kept,
                        stats=_dropped_stats(mask, kept))


def capacity_dispatch(plan: CapacityPlan, x: Array) -> Array:
    """`x: [N, d]` -> `[E, C, d]` expert inputs (empty slots are zero)."""
    return jnp.einsum("NEC,Nd->ECd", plan.dispatch.astype(x.dtype), x)


def capacity_combine(plan: CapacityPlan, ye: Array) -> Array:
    """`ye: [E, C, d]` expert outputs -> `[N, d]` weighted sum per token (float32 accumulation)."""
    return jnp.einsum("NEC,ECd->Nd", plan.combine, ye.astype(jnp.float32))


# ---------------------------------------------------------------------------------- dropless


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SortPlan:
    """Sorted-assignment layout of the dropless dispatcher.

    Attributes:
      token: `<int32>[M]` source token of each sorted row (M = N·K).
      inverse: `<int32>[M]` sorted row of assignment `n·K + j` (inverse permutation).
      group_sizes: `<int32>[E]` rows per expert; rows past their sum are unused slots.
      weights: `<float32>[N, K]` combine weight of each token's j-th kept expert (0 if unused).
      expert: `<int32>[N, K]` expert of each slot, E where unused.
      stats: as in `CapacityPlan` (nonzero only if a mask row holds more than K experts,
        which breaks the router's `max_assignments` contract).
    """

    token: Array
    inverse: Array
    group_sizes: Array
    weights: Array
    expert: Array
    stats: dict


def sort_plan(weights: Array, mask: Array, *, k: int) -> SortPlan:
    """Keeps up to `k` experts per token (largest weights first) and sorts assignments by expert.

    Args:
      weights: `[N, E]` combine weights (0 off the mask).
      mask: `<bool>[N, E]` selected experts.
      k: K, static bound on experts per token (the router's `max_assignments`).

    Returns:
      `SortPlan`.
    """
    n, e = mask.shape
    k = min(k, e)
    mask = mask.astype(jnp.bool_)
    weights = weights.astype(jnp.float32)
    _, idx = jax.lax.top_k(jnp.where(mask, weights, -jnp.inf), k)  # [N, K]
    valid = jnp.take_along_axis(mask, idx, axis=-1)
    slot_w = jnp.where(valid, jnp.take_along_axis(weights, idx, axis=-1), 0.0)
    expert = jnp.where(valid, idx, e).astype(jnp.int32)  # [N, K]; sentinel E sorts last
    flat = expert.reshape(-1)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)  # [M]
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(n * k, dtype=jnp.int32))
    group_sizes = jnp.bincount(flat, length=e + 1)[:e].astype(jnp.int32)
    kept = jnp.zeros_like(mask).at[jnp.arange(n)[:, None], idx].set(valid)
    return SortPlan(token=order // k, inverse=inverse, group_sizes=group_sizes,
                    weights=slot_w, expert=expert, stats=_dropped_stats(mask, kept))


def permute(plan: SortPlan, x: Array) -> Array:
    """`x: [N, d]` -> `[M, d]` rows in expert order (unused slots repeat some token)."""
    return jnp.take(x, plan.token, axis=0)


def unpermute(plan: SortPlan, ys: Array) -> Array:
    """`ys: [M, d]` sorted expert outputs -> `[N, d]` weighted sum per token (float32)."""
    n, k = plan.weights.shape
    per_slot = jnp.take(ys, plan.inverse, axis=0).reshape(n, k, -1).astype(jnp.float32)
    return jnp.einsum("NK,NKd->Nd", plan.weights, per_slot)
