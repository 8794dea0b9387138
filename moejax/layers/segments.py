"""Packed rows: documents of a row told apart by `segment_ids` `[B, T]` (a run of equal int ids
is one document, MaxText's `inputs_segmentation`); the mixers restart at each document."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.validation import check_array

Array = jax.Array


def document_starts(segment_ids: Array) -> Array:
    """`[B, T]` bool: where a packed row's document id changes (never at step 0, which starts
    or continues the row's sequence)."""
    change = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.concatenate([jnp.zeros_like(change[:, :1]), change], axis=1)


def check_segment_ids(segment_ids, shape) -> None:
    """`segment_ids` must be an integer array of `shape` `(B, T)` (ValueError naming it)."""
    check_array("segment_ids", segment_ids)
    if tuple(segment_ids.shape) != tuple(shape):
        raise ValueError(f"segment_ids must be [B, T] = {list(shape)}, got shape "
                         f"{tuple(segment_ids.shape)}")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise ValueError(f"segment_ids must be an integer array, got dtype {segment_ids.dtype}")
