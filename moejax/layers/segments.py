"""Packed rows: documents of a row told apart by `segment_ids` `[B, T]` (a run of equal int ids
is one document, MaxText's `inputs_segmentation`); the mixers restart at each document. And
packed prompts (`cu_seqlens`, one row) prefilled into a decode cache of one row per prompt."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from moejax.kernels.delta_rule import packing
from moejax.kernels.delta_rule.reference import sequence_index
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


def check_attention_input(x, d_model: int, segment_ids, cache, cu_seqlens=None,
                          cache_key: str = "k") -> None:
    """The shared input checks of the attention mixers: `x` `[B, T, d_model]`, `segment_ids`
    (packed training rows) only without a decode cache, `cu_seqlens` (packed prompts) with a
    fresh cache of N rows (`check_packed_cache`) or none."""
    check_array("x", x)
    if x.ndim != 3 or x.shape[-1] != d_model:
        raise ValueError(f"x must be [B, T, d_model] with d_model={d_model}, got {x.shape}")
    if segment_ids is not None:
        check_segment_ids(segment_ids, x.shape[:2])
        if cache is not None:
            raise ValueError("segment_ids is for packed training rows, not with a decode cache")
    if cu_seqlens is not None:
        n = check_cu_seqlens(cu_seqlens, x.shape, segment_ids)
        if cache is not None:
            check_packed_cache(cache, n, cache_key, cu_seqlens)


def attention_mask(segment_ids: Array | None) -> Array | None:
    """`[B, 1, T, T]` bool, True where query and key are in the same document (None: no mask);
    combine with causality."""
    if segment_ids is None:
        return None
    return segment_ids[:, None, :, None] == segment_ids[:, None, None, :]


# ------------------------------------------------------------------------------------------
# Packed prompts: several sequences in one row (B = 1), told apart by `cu_seqlens` `[N + 1]`,
# prefilled into a decode cache of N rows (`moejax.models.decode.prefill(cu_seqlens=)`).


class Packed(NamedTuple):
    """Where the steps of a packed row go in a decode cache of N rows.

    The caches with positions (softmax attention, MLA) hold prompt n right-aligned: its steps
    at cache positions `[P − len_n, P)`, P the longest prompt, so every row continues at P
    (one position for the whole batch while decoding) and keys before `start_n = P − len_n` are
    masked. Rotary scores depend only on the distance, so each prompt gets what it gets alone.

    Attributes:
      cu_seqlens: `[N + 1]` int32 boundaries, `0 = cu[0] < … < cu[N] = T`.
      seq: `[T]` int32, the prompt of each step.
      offset: `[T]` int32, each step's position within its prompt.
      lengths: `[N]` int32.
      slot: `[T]` int32, each step's cache position, `P − len_seq + offset`.
      P: `[]` int32, the longest prompt: the cache position after the prefill.
    """

    cu_seqlens: Array
    seq: Array
    offset: Array
    lengths: Array
    slot: Array
    P: Array

    @property
    def segment_ids(self) -> Array:
        """`[1, T]`: the prompts as document ids (attention masks)."""
        return self.seq[None]

    @property
    def start(self) -> Array:
        """`[N]`: each row's first cache position holding its prompt."""
        return self.P - self.lengths


def pack(cu_seqlens: Array, T: int) -> Packed:
    """The `Packed` layout of a row of T steps (`cu_seqlens` checked by `check_cu_seqlens`)."""
    cu = cu_seqlens.astype(jnp.int32)
    seq, _, _ = sequence_index(cu, T)
    lengths = cu[1:] - cu[:-1]
    offset = jnp.arange(T, dtype=jnp.int32) - cu[seq]
    P = jnp.max(lengths)
    return Packed(cu, seq, offset, lengths, P - lengths[seq] + offset, P)


def check_cu_seqlens(cu_seqlens, x_shape, segment_ids=None) -> int:
    """`cu_seqlens` `[N + 1]` ints for a row `x` of shape `[1, T, ...]` (`packing.check_cu_seqlens`:
    0 first, strictly increasing, T last, checked when concrete); not together with
    `segment_ids`. Returns N."""
    check_array("cu_seqlens", cu_seqlens)
    if segment_ids is not None:
        raise ValueError("give segment_ids (packed training rows) or cu_seqlens (packed "
                         "prompts), not both")
    return packing.check_cu_seqlens(cu_seqlens, x_shape[0], x_shape[1], name="x")


def check_packed_cache(cache: dict, n: int, name: str, cu_seqlens) -> None:
    """A cache with positions (`pos`) for packed prompts: N rows, fresh (`pos` = 0) and long
    enough for the longest prompt — the values checked when concrete (under `jit`,
    `fresh_or_nan` makes the outputs NaN instead)."""
    rows, S = cache[name].shape[:2]
    if rows != n:
        raise ValueError(f"the cache for {n} packed prompts (cu_seqlens) must have {n} rows, "
                         f"got {rows}")
    pos = cache["pos"]
    if not isinstance(pos, jax.core.Tracer) and int(pos) != 0:
        raise ValueError(f"packed prompts (cu_seqlens) prefill a fresh cache (pos = 0), got "
                         f"pos = {int(pos)}")
    if not isinstance(cu_seqlens, jax.core.Tracer):
        longest = int(np.max(np.diff(np.asarray(cu_seqlens))))
        if longest > S:
            raise ValueError(f"the longest packed prompt ({longest} tokens) does not fit the "
                             f"cache's {S} positions")


def fresh_or_nan(y: Array, cache: dict, packed: Packed, S: int) -> Array:
    """`y`, or NaN if the cache was not fresh or the longest prompt does not fit its S
    positions (under `jit`, where `check_packed_cache` cannot see the values): never a
    silently wrong answer."""
    ok = (cache["pos"] == 0) & (packed.P <= S)
    return jnp.where(ok, y, jnp.asarray(jnp.nan, y.dtype))


def key_mask(start: Array, positions: Array, S: int) -> Array:
    """`[B, 1, T, S]` bool for queries at `positions` `[T]` over a cache of S positions whose
    row b holds keys from `start[b]` on (`[B]`): causal and not before the row's start."""
    s = jnp.arange(S)
    causal = s[None, :] <= positions[:, None]  # [T, S]
    return causal[None, None] & (s[None, None, None, :] >= start[:, None, None, None])


def scatter_rows(rows: int, S: int, a: Array, packed: Packed, dtype) -> Array:
    """`a` `[1, T, ...]` of a packed row → `[rows, S, ...]`, step t at `(seq_t, slot_t)`, zeros
    elsewhere."""
    out = jnp.zeros((rows, S, *a.shape[2:]), dtype)
    return out.at[packed.seq, packed.slot].set(a[0].astype(dtype))
