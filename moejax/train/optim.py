"""The optimizer of a run: AdamW with linear warmup + cosine decay after global-norm clipping
(optax), its peak learning rate a hyperparameter held in the optimizer state.

`make_optimizer(cfg)` wraps the chain in `optax.inject_hyperparams`, so `learning_rate` (the peak
of the schedule) is an array in `opt_state.hyperparams` rather than a constant of the traced
step: two configs that differ only in `lr` give optimizers whose `update` is the same function
of its inputs, and a jitted step compiled for one serves the other (a learning-rate sweep
compiles once; `moejax.train.steps.compiled_steps` caches on `optimizer_settings`). The update
of step s uses `learning_rate * unit(s)`, where `unit` rises linearly from 0 to 1 over
`warmup_steps` and then follows a cosine down to `min_lr_ratio` at `steps`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from moejax.train.config import TrainConfig


def unit_schedule(cfg: TrainConfig) -> optax.Schedule:
    """The schedule of peak 1: linear warmup 0 → 1, then cosine decay to `min_lr_ratio`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=1.0, warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.steps, cfg.warmup_steps + 1), end_value=cfg.min_lr_ratio)


def make_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Learning rate per step: linear warmup 0 → `lr`, then cosine decay to `lr * min_lr_ratio`.

    Example:
      >>> sched = make_schedule(TrainConfig(steps=100, lr=1.0, warmup_steps=10))
      >>> float(sched(10)), round(float(sched(100)), 6)
      (1.0, 0.1)
    """
    unit = unit_schedule(cfg)
    return lambda count: cfg.lr * unit(count)


def optimizer_settings(cfg: TrainConfig) -> TrainConfig:
    """`cfg` reduced to what shapes `make_optimizer(cfg)`'s update function: its optimizer
    fields, with `lr = 1` and every other field at its default (equal for two configs that
    differ only in `lr`, batch shape, logging, checkpointing or seed)."""
    return TrainConfig(steps=cfg.steps, warmup_steps=cfg.warmup_steps,
                       min_lr_ratio=cfg.min_lr_ratio, weight_decay=cfg.weight_decay, b1=cfg.b1,
                       b2=cfg.b2, eps=cfg.eps, clip_norm=cfg.clip_norm, lr=1.0)


def make_optimizer(cfg: TrainConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (`b1`, `b2`, `eps`, `weight_decay` of `cfg`) with the run's schedule, after
    global-norm clipping; peak lr injected.

    Weight decay skips vectors and scalars (norm scales, biases, router biases).

    Args:
      cfg: the run's config.

    Returns:
      `(optimizer, schedule)`; `schedule(step)` is the learning rate of update `step + 1`, and
      `optimizer.init` puts `cfg.lr` into `opt_state.hyperparams["learning_rate"]`
      (`with_learning_rate` changes it).
    """
    unit = unit_schedule(cfg)

    def chain(learning_rate):
        adamw = optax.adamw(
            lambda count: learning_rate * unit(count), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=lambda params: jax.tree.map(lambda p: jnp.ndim(p) >= 2, params),
        )
        if cfg.clip_norm is None:
            return adamw
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)

    return optax.inject_hyperparams(chain)(learning_rate=cfg.lr), make_schedule(cfg)


def with_learning_rate(opt_state: optax.OptState, lr: float) -> optax.OptState:
    """`opt_state` of `make_optimizer` with its peak learning rate set to `lr` (placed as the old
    value was: on a mesh, every process gives the same `lr`)."""
    hyperparams = dict(opt_state.hyperparams)
    old = hyperparams["learning_rate"]
    value = np.asarray(lr, old.dtype)
    sharding = getattr(old, "sharding", None)
    hyperparams["learning_rate"] = (
        jnp.asarray(value) if not isinstance(old, jax.Array) or sharding is None
        else jax.make_array_from_callback(value.shape, sharding, lambda _: value))
    return opt_state._replace(hyperparams=hyperparams)
