"""The visit schedule shared by the Pallas gmm kernels (`pallas_common.make_group_metadata`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from moejax.kernels.gmm import pallas_common


def test_metadata_schedule():
    """Every output row is covered by exactly one gmm visit; tgmm visits every group."""
    sizes = (5, 0, 17, 0, 10)
    meta = jax.device_get(pallas_common.make_group_metadata(jnp.asarray(sizes, jnp.int32), m=40,
                                                            tm=16, for_tgmm=False))
    assert meta.tile.shape == (pallas_common.num_visits(40, 16, 5),)
    cover = np.zeros(40, int)
    for t, lo, hi in zip(meta.tile, meta.lo, meta.hi, strict=True):
        rows = np.arange(t * 16, min(t * 16 + 16, 40))
        cover[rows[(rows >= lo) & (rows < hi)]] += 1
    np.testing.assert_array_equal(cover, 1)
    assert np.all(np.diff(meta.tile) >= 0)  # a tile's visits are consecutive
    tmeta = jax.device_get(pallas_common.make_group_metadata(jnp.asarray(sizes, jnp.int32),
                                                             m=40, tm=16, for_tgmm=True))
    assert set(tmeta.group.tolist()) == set(range(5))
    assert int(tmeta.compute.sum()) == 1 + 2 + 1  # group 0: tile 0; group 2: 0-1; group 4: 1-2
    assert int(tmeta.first.sum()) == int(tmeta.last.sum()) == 5  # one store per group
