"""The hyperparameters of a training run: `TrainConfig` (frozen, validated, saved with every
checkpoint and compared on resume)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from moejax.parallel.mesh import format_mesh_spec
from moejax.validation import check_int, check_range

# `TrainConfig`'s integer fields with their lower bounds, and its real fields with their intervals
# `(lo, hi, lo_open, hi_open)`.
_INT_FIELDS = (("steps", 1), ("warmup_steps", 0), ("batch_size", 1), ("seq_len", 1),
               ("log_every", 1), ("eval_every", 0), ("eval_batches", 1), ("ckpt_every", 0),
               ("keep_checkpoints", 1), ("seed", 0))
_FLOAT_FIELDS = (("lr", 0.0, math.inf, True, True), ("min_lr_ratio", 0.0, 1.0, False, False),
                 ("weight_decay", 0.0, math.inf, False, True), ("b1", 0.0, 1.0, False, True),
                 ("b2", 0.0, 1.0, False, True), ("eps", 0.0, math.inf, False, True))


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    """Hyperparameters of a training run. Hashable; validated on construction (a field of the
    wrong kind raises `moejax.validation.ArgumentTypeError`, one out of range `ValueError`,
    each naming the field).

    Attributes:
      steps: total optimizer steps, > 0.
      lr: peak learning rate, > 0.
      warmup_steps: linear warmup from 0 to `lr` over this many steps, >= 0.
      min_lr_ratio: the cosine decay ends at `lr * min_lr_ratio` at step `steps`, in [0, 1].
      weight_decay: AdamW decoupled weight decay, applied to matrices (ndim >= 2) only, >= 0.
      b1: Adam first-moment decay, in [0, 1).
      b2: Adam second-moment decay, in [0, 1).
      eps: Adam's ε in the update denominator `√v̂ + ε`, in [0, ∞). Default 1e-8 (optax's and
        PyTorch's, what moejax always used); the Q-Delta authors train with 1e-15, which
        `OPTIMIZER_PRESETS` (their 340m / 1b runs) set. A tiny ε matters mostly for small
        gradients (late in training, or tiny models), so the default stays 1e-8 for the CPU
        experiments and the paper presets carry the authors' value.
      clip_norm: clip gradients to this global norm; None disables clipping.
      batch_size: B, sequences per step (global, over all devices), > 0.
      seq_len: T, tokens per sequence, > 0.
      log_every: write a metrics line every this many steps (and at steps 1 and `steps`), > 0.
      eval_every: validate every this many steps (and at `steps`); 0 = only at `steps`.
      eval_batches: validation batches per evaluation, > 0.
      ckpt_every: checkpoint every this many steps (and at `steps`); 0 = only at `steps`.
      keep_checkpoints: how many of the newest checkpoints to keep, > 0.
      seed: seeds init and per-step randomness (the data pipeline takes its own seed), >= 0.
      mesh: the device mesh, `"data:D,fsdp:F,expert:X"` (axes left out are 1; the sizes must
        multiply to the global device count; also a mapping or `(axis, size)` pairs, stored in
        that canonical string form); None: all devices on `data` (`moejax.parallel.mesh`).
        A run may resume on another mesh (or process count): it continues the same trajectory.
    """

    steps: int = 1000
    lr: float = 3e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float | None = 1.0
    batch_size: int = 16
    seq_len: int = 256
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 8
    ckpt_every: int = 200
    keep_checkpoints: int = 3
    seed: int = 0
    mesh: str | None = None

    def __post_init__(self):
        for name, lo in _INT_FIELDS:
            check_int(name, getattr(self, name), lo=lo)
        for name, lo, hi, lo_open, hi_open in _FLOAT_FIELDS:
            check_range(name, getattr(self, name), lo, hi, lo_open=lo_open, hi_open=hi_open)
        if self.clip_norm is not None:
            check_range("clip_norm", self.clip_norm, 0.0, math.inf, lo_open=True, hi_open=True)
        if self.mesh is not None:
            object.__setattr__(self, "mesh", format_mesh_spec(self.mesh))
        # NumPy scalars become Python ones, so the saved JSON config holds numbers, not strings.
        for name, _ in _INT_FIELDS:
            object.__setattr__(self, name, int(getattr(self, name)))
        for name, *_ in _FLOAT_FIELDS + ((("clip_norm",),) if self.clip_norm is not None else ()):
            object.__setattr__(self, name, float(getattr(self, name)))

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with `changes` applied (and validated)."""
        return dataclasses.replace(self, **changes)


# The Q-Delta authors' optimiser for their model presets (`moejax.models.lm.PRESETS` "340m" /
# "1b"; psmiz/Q-Delta `scripts/launch_qdelta_340m.sh`, `qdelta_script/launch_qdelta_1b.sh`, run
# with flame): AdamW ε 1e-15, clip 1.0, linear warmup then cosine to 0.1× the peak, and ≈0.5M
# tokens per step (128 sequences of 4096: 65536 tokens × 4 GPUs × 2 accumulation steps for 340M,
# 32768 × 4 × 4 for 1B) for 28600 / 57200 steps (15B / 30B tokens). Weight decay 0.1 and betas
# (0.9, 0.95) are flame's defaults, which the scripts do not change (and TrainConfig's).
OPTIMIZER_PRESETS: dict[str, dict[str, Any]] = {
    "340m": dict(lr=1e-3, warmup_steps=1024, min_lr_ratio=0.1, eps=1e-15, clip_norm=1.0,
                 weight_decay=0.1, b1=0.9, b2=0.95, batch_size=128, seq_len=4096, steps=28600),
    "1b": dict(lr=4e-4, warmup_steps=2048, min_lr_ratio=0.1, eps=1e-15, clip_norm=1.0,
               weight_decay=0.1, b1=0.9, b2=0.95, batch_size=128, seq_len=4096, steps=57200),
}


