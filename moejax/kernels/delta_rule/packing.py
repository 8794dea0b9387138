"""Packed sequences (`cu_seqlens`) moved onto chunk boundaries, for every chunkwise impl.

A row of B = 1 holds N sequences back to back, `0 = cu[0] < … < cu[N] = T`. The chunk path
(`chunk.py`) and the Pallas kernels (`ops.py`) both run them the same way: each sequence is
moved to start on a chunk boundary (a static bound of `NC = (T + N(C − 1)) // C` chunks holds
them all; the gaps are steps with β = 0 and zero decay, which leave the state as it is), the
state is restarted at each sequence's first chunk from its initial state, and its final state is
the state after its last chunk. `layout` computes where everything goes; `spread` moves a packed
`[1, T, ...]` array into the `[1, NC·C, ...]` layout (zeros in the gaps), and `o[:, pos]` moves
outputs back.

Axis letters: T packed steps, N sequences, NC chunks, C chunk length.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from moejax.kernels.delta_rule.reference import sequence_index

Array = jax.Array


def check_cu_seqlens(cu_seqlens, B: int, T: int, *, name: str = "q") -> int:
    """`cu_seqlens` is `[N + 1]` integers for a row (`name` has B = 1) of T steps; its values
    (when concrete, not traced) start at 0, increase strictly and end at T. Returns N.

    Raises:
      ValueError naming `cu_seqlens` (or `name`, for B != 1) and what was expected.
    """
    if cu_seqlens.ndim != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must be [N + 1] (1-D, N >= 1 sequences), got shape "
                         f"{tuple(cu_seqlens.shape)}")
    if not jnp.issubdtype(cu_seqlens.dtype, jnp.integer):
        raise ValueError(f"cu_seqlens must be an integer array, got dtype {cu_seqlens.dtype}")
    if B != 1:
        raise ValueError(f"cu_seqlens packs sequences into one row: {name} must have B = 1, "
                         f"got B={B}")
    if not isinstance(cu_seqlens, jax.core.Tracer):
        cu = np.asarray(cu_seqlens)
        if cu[0] != 0 or cu[-1] != T or not np.all(np.diff(cu) > 0):
            raise ValueError(f"cu_seqlens must start at 0, increase strictly and end at T={T}, "
                             f"got {cu.tolist()}")
    return cu_seqlens.shape[0] - 1


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the packed steps and sequences go in the chunk-aligned row.

    Attributes:
      NC: the static number of chunks of the aligned row.
      pos: `[T]` int32, the aligned position of each packed step.
      first: `[N]` int32, each sequence's first chunk.
      last: `[N]` int32, each sequence's last chunk.
      chunk_seq: `[NC]` int32, the sequence each chunk belongs to (chunks after the last
        sequence's count as the last sequence; they are all gap).
      restart: `[NC]` bool, the chunk starts a sequence.
    """

    NC: int
    pos: Array
    first: Array
    last: Array
    chunk_seq: Array
    restart: Array


def layout(cu_seqlens, T: int, C: int) -> Layout:
    """The chunk-aligned layout of a packed row of T steps for chunks of C steps."""
    N = cu_seqlens.shape[0] - 1
    NC = (T + N * (C - 1)) // C  # chunks enough for every sequence to start on a boundary
    cu = cu_seqlens.astype(jnp.int32)
    nchunks = (cu[1:] - cu[:-1] + C - 1) // C
    first = jnp.cumsum(nchunks) - nchunks
    seq, _, _ = sequence_index(cu, T)
    pos = first[seq] * C + jnp.arange(T, dtype=jnp.int32) - cu[seq]
    chunk = jnp.arange(NC, dtype=jnp.int32)
    chunk_seq = jnp.clip(jnp.searchsorted(first, chunk, side="right") - 1, 0, N - 1)
    chunk_seq = chunk_seq.astype(jnp.int32)
    return Layout(NC, pos, first, first + nchunks - 1, chunk_seq, chunk == first[chunk_seq])


def spread(a, lay: Layout, C: int):
    """`[1, T, ...]` packed → `[1, NC·C, ...]` aligned, zeros in the gaps (None stays None)."""
    if a is None:
        return None
    return jnp.zeros((1, lay.NC * C, *a.shape[2:]), a.dtype).at[:, lay.pos].set(a)
