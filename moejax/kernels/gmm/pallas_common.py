"""What the Pallas gmm backends share: the tile→group visit schedule, block helpers, costs.

Backend-neutral (no backend import): `pallas_gpu.py` (Triton) and `pallas_tpu.py` (Mosaic)
import this file, never each other.

Axis letters: M rows of `lhs` (grouped contiguously by `group_sizes`), K contracting width,
N output width, G groups, tm rows per tile, V visits (the static length of the schedule).

The rows are cut into `⌈M/tm⌉` tiles. A *visit* is one (row tile, group) pair: a group touches
every tile its rows overlap, so a tile that straddles a group boundary is visited once per group
it touches (megablox's `make_group_metadata`, rewritten as one cumsum + searchsorted). Visits are
in row order, so the visits of one tile (gmm) or one group (tgmm) are consecutive.

Two flavours:

* `gmm` adds a *tail group* `G` for rows `[sum(group_sizes), M)`: every row of the output then
  belongs to exactly one visit, and the tail's visits write zeros without a matmul (so the
  kernels never leave output rows unwritten). Empty groups get no visit.
* `tgmm` gives every empty group one visit (its output block must be written with zeros) and
  ignores rows past the sum.

NOTE: for G real groups the number of visits is at most `⌈M/tm⌉ + G` in both flavours (a group
boundary inside a tile adds one visit; an empty tgmm group adds one), which is the static V.
Visits past the real count ("padding") repeat the last real visit with an empty row range and
`compute = 0`: they change nothing, and on TPU their block indices equal the previous visit's,
so the pipeline issues no DMA for them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from moejax.kernels import gpu_compile

Array = jax.Array

# Input dtypes whose Triton kernels the sm_90a compile check covers (tests/gpu_compile).
GPU_KERNEL_DTYPES = tuple(jnp.dtype(d) for d in gpu_compile.COVERED_DTYPES)


class GroupMetadata(NamedTuple):
    """Per-visit schedule; every field is `<int32>[V]`."""

    tile: Array  # row tile of the visit (rows [tile*tm, tile*tm + tm)).
    group: Array  # group whose rhs / output block is used, clamped to [0, G-1].
    lo: Array  # first row of the visited group (global row index, clipped to [0, M]).
    hi: Array  # one past its last row; lo == hi for padding visits.
    compute: Array  # 1 if the visit multiplies (non-empty real group), else 0.
    first: Array  # 1 on the first visit of its output block (gmm: tile, tgmm: group).
    last: Array  # 1 on the last visit of its output block.


def num_visits(m: int, tm: int, num_groups: int) -> int:
    """Static schedule length V = ⌈M/tm⌉ + G."""
    return -(-m // tm) + num_groups


def make_group_metadata(group_sizes: Array, *, m: int, tm: int, for_tgmm: bool) -> GroupMetadata:
    """Builds the visit schedule (plain XLA; runs outside the kernels).

    Args:
      group_sizes: `<int32>[G]`, non-negative; rows past `M` are clipped away.
      m: rows of `lhs` (M ≥ 1).
      tm: rows per tile.
      for_tgmm: `False` for gmm (tail group, no visits for empty groups), `True` for tgmm (one
        visit per empty group, no tail).

    Returns:
      `GroupMetadata` of length `num_visits(m, tm, G)`.
    """
    num_groups = group_sizes.shape[0]
    tiles_m = -(-m // tm)
    sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
    ends = jnp.minimum(jnp.cumsum(sizes), m).astype(jnp.int32)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    if not for_tgmm:  # (1) the tail group G covers [sum, M).
        starts = jnp.concatenate([starts, ends[-1:]])
        ends = jnp.concatenate([ends, jnp.full((1,), m, jnp.int32)])
    nonempty = ends > starts
    # (2) Tiles each group touches; an empty tgmm group still gets one visit.
    first_tile = jnp.minimum(starts // tm, tiles_m - 1)
    last_tile = (ends - 1) // tm
    count = jnp.where(nonempty, last_tile - first_tile + 1, 1 if for_tgmm else 0)
    cum = jnp.cumsum(count)
    total = cum[-1]  # ≥ 1: gmm covers M ≥ 1 rows, tgmm visits every group (G ≥ 1).
    # (3) Visit v belongs to the group whose cumulative count first exceeds it. Padding visits
    # (v ≥ total) repeat the last real visit. NOTE: side="right" skips groups with count 0.
    v = jnp.arange(num_visits(m, tm, num_groups), dtype=jnp.int32)
    valid = v < total
    vv = jnp.minimum(v, total - 1)
    grp = jnp.minimum(jnp.searchsorted(cum, vv, side="right"), cum.shape[0] - 1)
    tile = first_tile[grp] + vv - (cum - count)[grp]
    compute = valid & nonempty[grp] & (grp < num_groups)
    lo = jnp.where(valid, starts[grp], 0)
    hi = jnp.where(valid, ends[grp], 0)
    # (4) Output block boundaries: gmm's block is the row tile, tgmm's the group.
    key = grp if for_tgmm else tile
    first = jnp.concatenate([jnp.ones((1,), bool), key[1:] != key[:-1]])
    last = jnp.concatenate([key[1:] != key[:-1], jnp.ones((1,), bool)])
    i32 = lambda x: x.astype(jnp.int32)
    return GroupMetadata(
        tile=i32(tile), group=i32(jnp.minimum(grp, num_groups - 1)), lo=i32(lo), hi=i32(hi),
        compute=i32(compute), first=i32(first), last=i32(last))


def fit_block(dim: int, block: int) -> int:
    """`block`, or the whole `dim` when it is smaller (a full-extent block is always legal)."""
    return dim if dim <= block else block


def pow2_block(dim: int, block: int, *, minimum: int = 16) -> int:
    """Power-of-two block for Triton: `block`, shrunk to the next power of two ≥ `dim`."""
    return max(minimum, min(block, 1 << max(dim - 1, 0).bit_length()))


def cost_estimate(flops: int, *arrays_and_out) -> pl.CostEstimate | None:
    """`pl.CostEstimate` of a kernel reading/writing these arrays (or shape structs)."""
    if not hasattr(pl, "CostEstimate"):
        return None
    nbytes = sum(int(a.size) * jnp.dtype(a.dtype).itemsize for a in arrays_and_out)
    return pl.CostEstimate(flops=int(flops), transcendentals=0, bytes_accessed=int(nbytes))
