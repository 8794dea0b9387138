"""Pipeline pieces shared by the data modules: argument checks and the grain index pipeline.

Synthetic tasks (MQAR, HMM) draw example `i` of a split from
`np.random.default_rng([seed, split_code, i])`, so every example is a pure function of
`(config, seed, split, i)` and an iterator's position is all its checkpoint needs.

`iterator(dataset, shard=...)` is the one way to read any `make_*_dataset` (exported as
`moejax.data.iterator`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grain
import numpy as np

from moejax import validation
from moejax.validation import check_bool, check_choice, check_int

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
    if num_epochs is None:
        return
    check_int("num_epochs", num_epochs)
    if num_epochs != -1:
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


def shard_batches(ds: grain.MapDataset, shard: grain.sharding.ShardOptions) -> grain.MapDataset:
    """Every `shard_count`-th batch of `ds`, from batch `shard_index` (grain's `ds[i::n]`).

    With `shard.drop_remainder` a finite `ds` is first cut to a multiple of `shard_count`
    batches, so every shard has the same number of batches.
    """
    count = shard.shard_count
    if shard.drop_remainder and count > 1:
        ds = ds[: len(ds) // count * count]
    return ds if count == 1 else ds[shard.shard_index :: count]


def iterator(dataset: grain.MapDataset, *,
             shard: grain.sharding.ShardOptions | None = None) -> grain.DatasetIterator:
    """A checkpointable iterator over the batches of a `make_*_dataset(...)` `MapDataset`.

    Args:
      dataset: a grain `MapDataset` of batches (`make_corpus_dataset`, `make_mqar_dataset`,
        `make_hmm_dataset`, or any other `MapDataset`).
      shard: read only this process's share of the batches (e.g.
        `grain.sharding.ShardByJaxProcess(drop_remainder=True)`): shard `i` of `n` gets batches
        `i, i + n, i + 2n, ...`. `batch_size` is then the per-process batch, and the global batch
        of step `s` (the shards' step-`s` batches concatenated in shard order) is batch `s` of
        the same dataset built with `batch_size · n`, so the global stream does not depend on
        the number of processes. `drop_remainder=True` gives every shard the same number of
        batches of a finite dataset. None (default): every batch.

    Returns:
      a grain `DatasetIterator`. `get_state()` is a JSON-able dict (`{"next_index": k}`) and
      `set_state(state)` on a fresh iterator over the same dataset (same arguments, same shard)
      resumes with the identical next batches; `grain.checkpoint.CheckpointSave(it)` /
      `CheckpointRestore(it)` store it in an orbax checkpoint.

    Raises:
      ArgumentTypeError: `dataset` is not a `grain.MapDataset` or `shard` not a `ShardOptions`.

    Example:
      >>> from moejax import data
      >>> ds = data.make_mqar_dataset(data.MQARConfig(seq_len=64, num_kv_pairs=4),
      ...                             split="train", seed=0, batch_size=8)
      >>> it = data.iterator(ds)
      >>> next(it)["inputs"].shape
      (8, 64)
    """
    if not isinstance(dataset, grain.MapDataset):
        raise validation.ArgumentTypeError(
            f"dataset must be a grain.MapDataset (a make_*_dataset result), got "
            f"{type(dataset).__name__}")
    if shard is not None:
        if not isinstance(shard, grain.sharding.ShardOptions):
            raise validation.ArgumentTypeError(
                f"shard must be a grain.sharding.ShardOptions or None, got "
                f"{type(shard).__name__}")
        dataset = shard_batches(dataset, shard)
    return to_iterator(dataset)
