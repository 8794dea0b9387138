"""Host-side batch handling of the loop: drawing the next batch and refusing a bad first one
(before anything is compiled), by the model's own check or the token-batch default."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from moejax.train.config import TrainConfig
from moejax.validation import ArgumentTypeError


def next_batch(batches: Iterator[Any], step: int) -> Any:
    """The batch of `step`, or a ValueError when the iterator has run dry."""
    try:
        return next(batches)
    except StopIteration:
        raise ValueError(f"train_data ran out of batches at step {step}; pass an iterator that "
                         "repeats (moejax.data's iterators do)") from None


def check_first_batch(model: Any, batch: Any, *, cfg: Any, train_cfg: TrainConfig) -> None:
    """`model.check_batch(batch, cfg=..., train_cfg=...)` if the model has one, else
    `check_token_batch`."""
    check = getattr(model, "check_batch", None)
    (check_token_batch if check is None else check)(batch, cfg=cfg, train_cfg=train_cfg)


def check_token_batch(batch: Any, *, cfg: Any, train_cfg: TrainConfig) -> None:
    """Refuses a batch that is not `{"inputs", "targets"}` of integer token ids of shape
    `(batch_size, seq_len)` within `[0, cfg.vocab_size)` (targets only where `loss_mask` is
    nonzero)."""
    if not isinstance(batch, Mapping):
        raise ArgumentTypeError("train_data must yield dicts with 'inputs' and 'targets', got a "
                                f"{type(batch).__name__}")
    for key in ("inputs", "targets"):
        if key not in batch:
            raise ValueError(f"train_data's batches need {key!r}; the first has keys "
                             f"{sorted(batch)}")
        check_token_ids(key, batch[key], cfg=cfg, train_cfg=train_cfg,
                        mask=batch.get("loss_mask") if key == "targets" else None)


def check_token_ids(key: str, ids: Any, *, cfg: Any, train_cfg: TrainConfig,
                    mask: Any = None) -> None:
    """`batch[key]` must be integer ids of shape `(batch_size, seq_len)` in
    `[0, cfg.vocab_size)` where `mask` (if given) is nonzero."""
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ArgumentTypeError(f"batch[{key!r}] must hold integer token ids, got dtype "
                                f"{ids.dtype}")
    if ids.shape != (train_cfg.batch_size, train_cfg.seq_len):
        raise ValueError(f"batch[{key!r}] has shape {ids.shape}, expected (batch_size, seq_len)"
                         f" = ({train_cfg.batch_size}, {train_cfg.seq_len})")
    vocab = getattr(cfg, "vocab_size", None)
    if not isinstance(vocab, int | np.integer):
        return
    if mask is not None:
        ids = ids[np.asarray(mask) != 0]
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise ValueError(f"batch[{key!r}] holds token id {bad}, outside the valid range "
                         f"[0, {vocab}) of the model's vocab_size={vocab}; check the data or "
                         "the model's vocab_size")
