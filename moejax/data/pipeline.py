"""Pipeline pieces shared by the data modules: argument checks and the grain index pipeline.

Synthetic tasks (MQAR, HMM) draw example `i` of a split from
`np.random.default_rng([seed, split_code, i])`, so every example is a pure function of
`(config, seed, split, i)` and an iterator's position is all its checkpoint needs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grain
import numpy as np

from moejax.validation import check_bool, check_choice, check_int  # noqa: F401  (re-exported)

READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)
SYNTHETIC_SPLITS = ("train", "val", "test")

Example = dict[str, np.ndarray]


def check_split(split: Any, valid: tuple[str, ...]) -> None:
    check_choice("split", split, valid)


def check_shuffle(shuffle: Any) -> None:
    """`shuffle` must be True, False or None (None: shuffle the train split only)."""
    if shuffle is not None:
        check_bool("shuffle", shuffle)


def check_num_epochs(num_epochs: Any) -> None:
    """`num_epochs` must be None (forever), -1 (the split's default) or an int ≥ 1."""
    if num_epochs is not None and not (isinstance(num_epochs, int) and num_epochs == -1):
        check_int("num_epochs", num_epochs, lo=1)


def index_pipeline(length: int, fn: Callable[[int], Example], *, seed: int, batch_size: int,
                   num_epochs: int | None, shuffle: bool) -> grain.MapDataset:
    """range(length) → shuffle(seed)? → repeat(num_epochs) → map(fn) → batch(drop_remainder)."""
    ds = grain.MapDataset.range(length)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    return ds.map(fn).batch(batch_size, drop_remainder=True)


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of example `index` of a synthetic split."""
    check_split(split, SYNTHETIC_SPLITS)
    return np.random.default_rng([seed, SYNTHETIC_SPLITS.index(split), int(index)])


def synthetic_dataset(make_example: Callable[[np.random.Generator], Example], *, split: str,
                      seed: int, batch_size: int, num_examples: int, num_epochs: int | None,
                      shuffle: bool | None) -> grain.MapDataset:
    """Batches of `make_example(example_rng(seed, split, i))` for i < num_examples.

    `num_epochs=-1` means endless for "train" and one pass otherwise; `shuffle=None` shuffles
    "train" only.
    """
    check_split(split, SYNTHETIC_SPLITS)
    check_int("seed", seed, lo=0)
    check_int("batch_size", batch_size, lo=1)
    check_int("num_examples", num_examples, lo=1)
    check_num_epochs(num_epochs)
    check_shuffle(shuffle)
    if num_epochs == -1:
        num_epochs = None if split == "train" else 1
    if num_epochs is not None and num_examples * num_epochs < batch_size:
        raise ValueError(
            f"num_examples={num_examples} x num_epochs={num_epochs} is fewer than "
            f"batch_size={batch_size}"
        )
    if shuffle is None:
        shuffle = split == "train"
    return index_pipeline(num_examples, lambda i: make_example(example_rng(seed, split, i)),
                          seed=seed, batch_size=batch_size, num_epochs=num_epochs,
                          shuffle=shuffle)


def to_iterator(ds: grain.MapDataset) -> grain.DatasetIterator:
    """A checkpointable iterator: `get_state()` is JSON-able, `set_state` resumes exactly."""
    return iter(ds.to_iter_dataset(READ_OPTIONS))
