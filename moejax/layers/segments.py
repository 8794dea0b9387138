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


def check_attention_input(x, d_model: int, segment_ids, cache) -> None:
    """The shared input checks of the attention mixers: `x` `[B, T, d_model]`, and
    `segment_ids` (packed training rows) only without a decode cache."""
    check_array("x", x)
    if x.ndim != 3 or x.shape[-1] != d_model:
        raise ValueError(f"x must be [B, T, d_model] with d_model={d_model}, got {x.shape}")
    if segment_ids is not None:
        check_segment_ids(segment_ids, x.shape[:2])
        if cache is not None:
            raise ValueError("segment_ids is for packed training rows, not with a decode cache")


def attention_mask(segment_ids: Array | None) -> Array | None:
    """`[B, 1, T, T]` bool, True where query and key are in the same document (None: no mask);
    combine with causality."""
    if segment_ids is None:
        return None
    return segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
