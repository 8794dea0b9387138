"""Routing metrics, one suite for every router (DESIGN §6).

Axis letters: N tokens, E experts, L latent labels.

  load_e          share of assignments that went to expert e (sums to 1 over e)
  cv              std / mean of the load over active experts
  max_vio         max_e load_e / mean load − 1 (0 when perfectly balanced)
  load_entropy    H(load) / log E_active, in [0, 1] (1 = uniform)
  dead_experts    number of active experts with load 0
  avg_k           assignments per (finite) token
  dropped_*       from the dispatcher (share of assignments / tokens dropped)
  nonfinite_tokens  from the layer: number of tokens whose input held NaN/Inf (routed nowhere,
                  left out of every other metric)
  mutual_information(top1, labels)   I(expert; latent) in nats from the joint count table
  flip_rate(prev_top1, top1)         share of probe tokens whose top-1 expert changed

The per-batch suite takes the router mask; to measure over an eval set (dead experts "over the
eval set"), sum `assignment_counts` over batches and call `load_metrics_from_counts` once.
Inactive slots (MASS expansion, `active` False) are left out of E_active, CV, MaxVio, entropy and
dead experts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def assignment_counts(mask: Array) -> Array:
    """`<float32>[E]` number of tokens assigned to each expert, from `mask: <bool>[N, E]`."""
    return jnp.sum(mask, axis=0, dtype=jnp.float32)


def load_metrics_from_counts(counts: Array, *, num_tokens: Array | int,
                             active: Array | None = None) -> tuple[Array, dict]:
    """The load part of the suite from assignment counts.

    Args:
      counts: `<float>[E]` assignments per expert (possibly summed over batches).
      num_tokens: tokens those counts came from (for avg_k).
      active: optional `<bool>[E]` active slots; default all.

    Returns:
      `(load [E], metrics)` where metrics holds float32 scalars `cv`, `max_vio`,
      `load_entropy`, `dead_experts`, `avg_k`, `active_experts`.
    """
    counts = counts.astype(jnp.float32)
    act = jnp.ones(counts.shape, jnp.bool_) if active is None else active.astype(jnp.bool_)
    counts = jnp.where(act, counts, 0.0)
    total = jnp.sum(counts)
    load = counts / jnp.maximum(total, 1.0)
    n_act = jnp.maximum(jnp.sum(act, dtype=jnp.float32), 1.0)
    mean = 1.0 / n_act
    var = jnp.sum(jnp.where(act, (load - mean) ** 2, 0.0)) / n_act
    plogp = jnp.where(load > 0, load * jnp.log(jnp.where(load > 0, load, 1.0)), 0.0)
    log_e = jnp.log(n_act)
    entropy = jnp.where(log_e > 0, -jnp.sum(plogp) / jnp.where(log_e > 0, log_e, 1.0), 1.0)
    has_load = total > 0
    metrics = {
        "cv": jnp.where(has_load, jnp.sqrt(var) / mean, 0.0),
        "max_vio": jnp.where(has_load, jnp.max(load) / mean - 1.0, 0.0),
        "load_entropy": jnp.where(has_load, entropy, 0.0),
        "dead_experts": jnp.sum(act & (counts == 0), dtype=jnp.float32),
        "avg_k": total / jnp.maximum(jnp.asarray(num_tokens, jnp.float32), 1.0),
        "active_experts": jnp.sum(act, dtype=jnp.float32),
    }
    return load, metrics


def load_metrics(mask: Array, *, active: Array | None = None,
                 valid: Array | None = None) -> tuple[Array, dict]:
    """The load part of the suite for one batch: `mask: <bool>[N, E]` -> `(load [E], metrics)`.

    `valid` (`<bool>[N]`, default all) says which tokens count: the others' mask rows are
    ignored and they are left out of the token count of `avg_k`.
    """
    if valid is None:
        return load_metrics_from_counts(assignment_counts(mask), num_tokens=mask.shape[0],
                                        active=active)
    return load_metrics_from_counts(assignment_counts(mask & valid[:, None]),
                                    num_tokens=jnp.sum(valid, dtype=jnp.float32), active=active)


def top1_expert(weights: Array, mask: Array, probs: Array) -> Array:
    """`<int32>[N]` the selected expert with the largest weight; arg-max of `probs` if none.

    (Expert-choice routing can leave a token unselected; it still gets a top-1 for MI/flips.)
    """
    chosen = jnp.argmax(jnp.where(mask, weights, -jnp.inf), axis=-1)
    return jnp.where(jnp.any(mask, axis=-1), chosen, jnp.argmax(probs, axis=-1)).astype(jnp.int32)


def joint_counts(top1: Array, labels: Array, num_experts: int, num_labels: int) -> Array:
    """`<float32>[E, L]` joint counts of top-1 expert and latent label (add them over batches)."""
    table = jnp.zeros((num_experts, num_labels), jnp.float32)
    return table.at[top1.reshape(-1), labels.reshape(-1)].add(1.0)


def mutual_information_from_counts(table: Array) -> Array:
    """I(expert; label) in nats from a `[E, L]` joint count table (0·log 0 = 0)."""
    table = table.astype(jnp.float32)
    p = table / jnp.maximum(jnp.sum(table), 1.0)
    pe = jnp.sum(p, axis=1, keepdims=True)
    pl = jnp.sum(p, axis=0, keepdims=True)
    ratio = jnp.where(p > 0, p / jnp.where(p > 0, pe * pl, 1.0), 1.0)
    return jnp.sum(jnp.where(p > 0, p * jnp.log(ratio), 0.0))


def mutual_information(top1: Array, labels: Array, num_experts: int, num_labels: int) -> Array:
    """I(top-1 expert; latent label) in nats.

    Args:
      top1: `<int>[N]` top-1 expert per token (values in [0, E)).
      labels: `<int>[N]` latent label per token (values in [0, L)).
      num_experts: E. num_labels: L.

    Returns:
      float32 scalar in [0, min(log E, log L)].

    Example:
      >>> mi = mutual_information(jnp.array([0, 1, 0, 1]), jnp.array([1, 0, 1, 0]), 2, 2)
      >>> round(float(mi), 4)  # log 2: the expert determines the label
      0.6931
    """
    return mutual_information_from_counts(joint_counts(top1, labels, num_experts, num_labels))


def flip_rate(prev_top1: Array, top1: Array) -> Array:
    """Share of probe tokens whose top-1 expert changed: `mean(prev_top1 != top1)`."""
    return jnp.mean((prev_top1 != top1).astype(jnp.float32))
