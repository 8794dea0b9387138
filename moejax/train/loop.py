"""Training loop (DESIGN §9; STYLE §5, §6.15): config, optimizer, pure steps and the driver.

  TrainConfig      frozen, validated hyperparameters of a run
  make_optimizer   AdamW, linear warmup + cosine decay, global-norm clipping (optax)
  TrainState       params, model (router) state, optimizer state, step: one pytree
  train_step       `(state, batch, step_rng) -> (state, metrics)`, pure; jitted with donation
  eval_step        `(params, model_state, batch, rng) -> metrics`, pure
  run              the driver: data, optimizer, state, restore, writers, jit, loop; stops
                   cleanly on SIGTERM/SIGINT and survives kills and damaged checkpoints
  load_checkpoint  a saved run's `TrainState` (for notebooks and sampling)

Model contract (`moejax.models.lm` by default, or any object with the same functions):

  params, state = model.init(key, cfg)
  loss, (new_state, metrics) = model.loss_fn(params, state, batch, *, cfg, train, rng)

`batch = {"inputs": <int32>[B, T], "targets": <int32>[B, T], "loss_mask": [B, T] (optional)}`;
`metrics` holds scalars (at least `ce`, cross-entropy in nats/token) and, for MoE models, `load`
as `[L, E]`. The model state (router state: aux-free biases, STAR statistics, ...) is updated
inside the jitted step.

Steps count from 1: "step s" is the s-th optimizer update, `state.step == s` after it, and its
randomness is `fold_in(train_key, s - 1)`; with the data iterator's position restored too, a run
resumed from a checkpoint computes exactly what the uninterrupted run would have.

Parallelism: every array lives on a `jax.sharding.Mesh` with a `"data"` axis. Batches are sharded
over it (`P("data")`); params, optimizer and model state are replicated (`P()`), so XLA averages
gradients across the axis. By default the mesh spans all devices (one device on a laptop); the
same `run` call is data parallel on a multi-device host without any change to the caller.

Axis letters: B batch, T sequence length, L layers, E experts.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from moejax.train import checkpoint as ckpt_lib
from moejax.train import logging as log_lib
from moejax.train import plots
from moejax.validation import ArgumentTypeError, check_int, check_range

Array = jax.Array
PyTree = Any
DATA_AXIS = "data"


# ---------------------------------------------------------------------------------------------
# Config and optimizer.


# `TrainConfig`'s integer fields with their lower bounds, and its real fields with their intervals
# `(lo, hi, lo_open, hi_open)`.
_INT_FIELDS = (("steps", 1), ("warmup_steps", 0), ("batch_size", 1), ("seq_len", 1),
               ("log_every", 1), ("eval_every", 0), ("eval_batches", 1), ("ckpt_every", 0),
               ("keep_checkpoints", 1), ("seed", 0))
_FLOAT_FIELDS = (("lr", 0.0, math.inf, True, True), ("min_lr_ratio", 0.0, 1.0, False, False),
                 ("weight_decay", 0.0, math.inf, False, True), ("b1", 0.0, 1.0, False, True),
                 ("b2", 0.0, 1.0, False, True))


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
      clip_norm: clip gradients to this global norm; None disables clipping.
      batch_size: B, sequences per step (global, over all devices), > 0.
      seq_len: T, tokens per sequence, > 0.
      log_every: write a metrics line every this many steps (and at steps 1 and `steps`), > 0.
      eval_every: validate every this many steps (and at `steps`); 0 = only at `steps`.
      eval_batches: validation batches per evaluation, > 0.
      ckpt_every: checkpoint every this many steps (and at `steps`); 0 = only at `steps`.
      keep_checkpoints: how many of the newest checkpoints to keep, > 0.
      seed: seeds init and per-step randomness (the data pipeline takes its own seed), >= 0.
    """

    steps: int = 1000
    lr: float = 3e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    clip_norm: float | None = 1.0
    batch_size: int = 16
    seq_len: int = 256
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 8
    ckpt_every: int = 200
    keep_checkpoints: int = 3
    seed: int = 0

    def __post_init__(self):
        for name, lo in _INT_FIELDS:
            check_int(name, getattr(self, name), lo=lo)
        for name, lo, hi, lo_open, hi_open in _FLOAT_FIELDS:
            check_range(name, getattr(self, name), lo, hi, lo_open=lo_open, hi_open=hi_open)
        if self.clip_norm is not None:
            check_range("clip_norm", self.clip_norm, 0.0, math.inf, lo_open=True, hi_open=True)
        # NumPy scalars become Python ones, so the saved JSON config holds numbers, not strings.
        for name, _ in _INT_FIELDS:
            object.__setattr__(self, name, int(getattr(self, name)))
        for name, *_ in _FLOAT_FIELDS + ((("clip_norm",),) if self.clip_norm is not None else ()):
            object.__setattr__(self, name, float(getattr(self, name)))

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with `changes` applied (and validated)."""
        return dataclasses.replace(self, **changes)


def make_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Learning rate per step: linear warmup 0 → `lr`, then cosine decay to `lr * min_lr_ratio`.

    Example:
      >>> sched = make_schedule(TrainConfig(steps=100, lr=1.0, warmup_steps=10))
      >>> float(sched(10)), round(float(sched(100)), 6)
      (1.0, 0.1)
    """
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.steps, cfg.warmup_steps + 1),
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


def make_optimizer(cfg: TrainConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with the run's schedule, after global-norm clipping.

    Weight decay skips vectors and scalars (norm scales, biases, router biases).

    Args:
      cfg: the run's config.

    Returns:
      `(optimizer, schedule)`; `schedule(step)` is the learning rate of update `step + 1`.
    """
    schedule = make_schedule(cfg)
    adamw = optax.adamw(
        schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
        mask=lambda params: jax.tree.map(lambda p: jnp.ndim(p) >= 2, params),
    )
    if cfg.clip_norm is None:
        return adamw, schedule
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw), schedule


# ---------------------------------------------------------------------------------------------
# State and pure steps.


class Model(Protocol):
    """What the loop needs from a model module (see the module docstring)."""

    def init(self, key: Array, cfg: Any) -> tuple[PyTree, PyTree]: ...

    def loss_fn(self, params: PyTree, state: PyTree, batch: Mapping[str, Array], *, cfg: Any,
                train: bool, rng: Array) -> tuple[Array, tuple[PyTree, dict]]: ...


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a step updates.

    Attributes:
      params: model parameters.
      model_state: the model's non-gradient state (router states); may be `{}`.
      opt_state: optimizer state.
      step: `<int32>[]` optimizer updates applied so far.
    """

    params: PyTree
    model_state: PyTree
    opt_state: PyTree
    step: Array


def init_train_state(model: Model, model_cfg: Any, optimizer: optax.GradientTransformation,
                     key: Array) -> TrainState:
    """A fresh `TrainState` (step 0) from `model.init(key, model_cfg)`."""
    params, model_state = model.init(key, model_cfg)
    return TrainState(params=params, model_state=model_state,
                      opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))


def train_step(state: TrainState, batch: Mapping[str, Array], step_rng: Array, *, model: Model,
               model_cfg: Any, optimizer: optax.GradientTransformation
               ) -> tuple[TrainState, dict[str, Array]]:
    """One optimizer update. Pure: jit it with `donate_argnums=0` (as `run` does).

    Args:
      state: the current state.
      batch: `{"inputs": <int32>[B, T], "targets": <int32>[B, T], "loss_mask"?: [B, T]}`.
      step_rng: this step's key, `fold_in(train_key, state.step)`.
      model: the model module.
      model_cfg: its config (static).
      optimizer: from `make_optimizer`.

    Returns:
      `(new_state, metrics)`: the model's metrics plus `loss` (the objective, including aux
      losses) and `grad_norm` (global norm before clipping).
    """

    def objective(params):
        return model.loss_fn(params, state.model_state, batch, cfg=model_cfg, train=True,
                             rng=step_rng)

    (loss, (model_state, metrics)), grads = jax.value_and_grad(objective, has_aux=True)(
        state.params
    )
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32)))
                             for g in jax.tree.leaves(grads)))
    metrics = {**metrics, "loss": loss, "grad_norm": grad_norm}
    new_state = TrainState(params=params, model_state=model_state, opt_state=opt_state,
                           step=state.step + 1)
    return new_state, metrics


def eval_step(params: PyTree, model_state: PyTree, batch: Mapping[str, Array], rng: Array, *,
              model: Model, model_cfg: Any) -> dict[str, Array]:
    """Validation metrics of one batch (`train=False`; the model state is not updated).

    Returns:
      `ce` (nats/token), `loss` (objective) and `weight` (tokens counted: the `loss_mask` sum, or
      B·T), to average over batches weighted by `weight`.
    """
    loss, (_, metrics) = model.loss_fn(params, model_state, batch, cfg=model_cfg, train=False,
                                       rng=rng)
    targets = batch["targets"]
    mask = batch.get("loss_mask")
    weight = jnp.asarray(targets.size if mask is None else jnp.sum(mask), jnp.float32)
    return {"ce": metrics.get("ce", loss), "loss": loss, "weight": weight}


# ---------------------------------------------------------------------------------------------
# Driver.


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What `run` leaves behind.

    Attributes:
      state: the final `TrainState` (replicated on the mesh).
      step: its step.
      metrics_path: `workdir/metrics.jsonl`.
      plot_paths: the PNGs written to the workdir (none when preempted).
      preempted: the run stopped early on SIGTERM/SIGINT, after checkpointing `step`; rerunning
        with the same workdir continues it exactly.
    """

    state: TrainState
    step: int
    metrics_path: Path
    plot_paths: list[Path]
    preempted: bool = False


def default_mesh(batch_size: int) -> Mesh:
    """All devices on a `"data"` axis, or the first device alone if B does not divide evenly."""
    devices = jax.devices()
    if batch_size % len(devices):
        devices = devices[:1]
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def run_config(model_cfg: Any, train_cfg: TrainConfig,
               data_info: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The run's JSON config, as saved with every checkpoint and compared on resume."""
    return ckpt_lib.config_to_json(
        {"model": model_cfg, "train": train_cfg, "data": dict(data_info or {})}
    )


def run(
    model_cfg: Any,
    train_cfg: TrainConfig,
    workdir: str | Path,
    *,
    train_data: Iterator[Mapping[str, np.ndarray]],
    val_data: Callable[[], Iterator[Mapping[str, np.ndarray]]] | None = None,
    data_info: Mapping[str, Any] | None = None,
    model: Model | None = None,
    mesh: Mesh | None = None,
    progress: bool = True,
    init_params: tuple[PyTree, PyTree] | None = None,
) -> RunResult:
    """Trains `model` for `train_cfg.steps` steps in `workdir`, resuming from its checkpoints.

    Faults it survives (see also `moejax.train.checkpoint`):

    * SIGTERM / SIGINT (preemptible VMs send SIGTERM): the current step finishes, a checkpoint
      of it is written and `run` returns normally with `RunResult.preempted` set; rerunning
      continues exactly. The handlers are installed only while `run` runs (in the main thread)
      and the previous ones are restored after; a second signal acts as it would without `run`.
    * `kill -9` at any moment: the rerun resumes from the last complete checkpoint and computes
      the same trajectory (metrics lines past it are dropped and recomputed).
    * A damaged latest checkpoint: reported by step and cause, moved to
      `workdir/checkpoints_damaged/`, and the run resumes from the newest intact one.
    * A checkpoint that cannot be written: `CheckpointWriteError` naming the step, directory and
      the checkpoint kept.

    Args:
      model_cfg: the model config (frozen dataclass; with `max_seq_len` and `vocab_size` if the
        model has them: the first batch's token ids are checked against `vocab_size`).
      train_cfg: the run's hyperparameters.
      workdir: directory for `checkpoints/`, `metrics.jsonl`, `tensorboard/` and plots (created
        if missing; must not be a file).
      train_data: iterator of numpy batches `[B, T]` (B = `batch_size`, T = `seq_len`) with
        `get_state()`/`set_state(state)` (a grain `DatasetIterator`); it is moved to the saved
        position on resume.
      val_data: builds a fresh validation iterator (called at every evaluation; the first
        `eval_batches` batches are used). None: no validation.
      data_info: JSON-able description of the data (glob, pipeline seed, ...), saved and compared
        on resume like the configs.
      model: object with `init`/`loss_fn`; default `moejax.models.lm`.
      mesh: mesh with a `"data"` axis; default `default_mesh(batch_size)`.
      progress: show the tqdm bar.
      init_params: `(params, model_state)` to start a fresh run from (fine-tuning, e.g. a model
        converted by `experiments.convert_hf`) instead of `model.init`; must have `model.init`'s
        structure and shapes. Ignored when resuming (the checkpoint holds the trained params);
        record where they came from in `data_info` so a resume checks it.

    Returns:
      a `RunResult`.

    Raises:
      ValueError / TypeError: bad arguments (naming the argument): `workdir` is a file, the
        first batch has the wrong shape, dtype or out-of-range token ids, `seq_len` exceeds
        `max_seq_len`, ...; `workdir` holds a run whose config differs in a field that matters
        (the message lists them; nothing is overwritten); or no checkpoint in it is intact.
      FloatingPointError: the loss became non-finite; the message names the step, and the
        checkpoints saved before it are kept.
      CheckpointWriteError: a checkpoint could not be written (an `OSError`).
    """
    if not isinstance(train_cfg, TrainConfig):
        raise ArgumentTypeError(f"train_cfg must be a TrainConfig, got {type(train_cfg).__name__}")
    workdir = ckpt_lib.check_workdir(workdir)
    if not all(callable(getattr(train_data, name, None))
               for name in ("__next__", "get_state", "set_state")):
        raise ArgumentTypeError(
            "train_data must be an iterator with get_state()/set_state() (e.g. a grain "
            f"DatasetIterator, as moejax.data builds), got {type(train_data).__name__}")
    if val_data is not None and not callable(val_data):
        raise ArgumentTypeError("val_data must be a function returning a fresh iterator, or "
                                f"None; got {type(val_data).__name__}")
    model = importlib.import_module("moejax.models.lm") if model is None else model
    max_len = getattr(model_cfg, "max_seq_len", None)
    if max_len is not None and train_cfg.seq_len > max_len:
        raise ValueError(f"seq_len={train_cfg.seq_len} exceeds the model's max_seq_len={max_len}")
    mesh = default_mesh(train_cfg.batch_size) if mesh is None else mesh
    if DATA_AXIS not in mesh.axis_names:
        raise ValueError(f"mesh needs a {DATA_AXIS!r} axis, got axes {mesh.axis_names}")
    if train_cfg.batch_size % mesh.shape[DATA_AXIS]:
        raise ValueError(f"batch_size={train_cfg.batch_size} is not divisible by the mesh's "
                         f"{DATA_AXIS!r} axis of size {mesh.shape[DATA_AXIS]}")
    workdir.mkdir(parents=True, exist_ok=True)
    # From here on SIGTERM/SIGINT only ask to stop; the loop looks between steps.
    with _StopSignals() as stop:
        return _run(model_cfg, train_cfg, workdir, train_data=train_data, val_data=val_data,
                    data_info=data_info, model=model, mesh=mesh, progress=progress,
                    init_params=init_params, stop=stop)


def _run(model_cfg: Any, train_cfg: TrainConfig, workdir: Path, *,
         train_data: Iterator[Mapping[str, np.ndarray]],
         val_data: Callable[[], Iterator[Mapping[str, np.ndarray]]] | None,
         data_info: Mapping[str, Any] | None, model: Model, mesh: Mesh, progress: bool,
         init_params: tuple[PyTree, PyTree] | None, stop: _StopSignals) -> RunResult:
    """`run` after its argument checks (see there)."""
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P(DATA_AXIS))
    config = run_config(model_cfg, train_cfg, data_info)
    is_main = jax.process_index() == 0

    # Optimizer.
    optimizer, schedule = make_optimizer(train_cfg)

    # State and restore: the newest intact checkpoint of a compatible run in this workdir (its
    # state, RNG key and data position), else a fresh state. Restoring needs only the shapes.
    init_fn = functools.partial(init_train_state, model, model_cfg, optimizer)
    root_key = jax.random.key(train_cfg.seed)
    ckpt = ckpt_lib.Checkpointer(workdir, keep=train_cfg.keep_checkpoints)
    restored = first_batch = None
    try:
        if ckpt.all_steps():
            target = jax.tree.map(
                lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                jax.eval_shape(init_fn, root_key),
            )
            restored = ckpt.restore_latest(
                _checkpoint_tree(target, root_key), set_data_state=train_data.set_state,
                check=lambda saved: ckpt_lib.check_config(saved, config,
                                                          where=str(ckpt.directory)))
        start = restored.step if restored is not None else 0
        if start < train_cfg.steps:  # checked before anything is compiled or written
            first_batch = _next_batch(train_data, start + 1)
            _check_first_batch(first_batch, train_cfg, model_cfg)
    except BaseException:
        ckpt.close(quiet=True)
        raise
    if restored is not None:
        state = restored.tree["state"]
        root_key = jax.random.wrap_key_data(restored.tree["rng"])
    init_key, train_key, eval_key = jax.random.split(root_key, 3)
    if restored is None:
        state = jax.jit(init_fn, out_shardings=replicated)(init_key)
        if init_params is not None:
            state = _start_from(state, init_params, optimizer, replicated)

    # Writers.
    writer = log_lib.MetricsWriter(workdir, start_step=start, total_steps=train_cfg.steps,
                                   enabled=is_main, progress=progress)
    writer.write_config(config)
    for damaged in restored.damaged if restored is not None else ():
        writer.message(damaged.message())
    if start:
        writer.message(f"Resuming from step {start} ({ckpt.directory / str(start)}).")
        for note in restored.notes:
            writer.message(f"  changed since the checkpoint: {note}")
    if start >= train_cfg.steps:
        writer.message(f"Nothing to train: the run is at step {start} >= steps={train_cfg.steps}.")

    # Jit: shardings are explicit; the train step donates the old state.
    p_train_step = jax.jit(
        functools.partial(train_step, model=model, model_cfg=model_cfg, optimizer=optimizer),
        in_shardings=(replicated, batch_sharding, replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )
    p_eval_step = jax.jit(
        functools.partial(eval_step, model=model, model_cfg=model_cfg),
        in_shardings=(replicated, replicated, batch_sharding, replicated),
        out_shardings=replicated,
    )

    # Loop. A stop signal is looked at between steps: the step in progress always finishes.
    tokens_per_step = train_cfg.batch_size * train_cfg.seq_len
    throughput = log_lib.Throughput()
    saved_step, stopped_by = start, None
    try:
        for step in range(start + 1, train_cfg.steps + 1):
            if _stop_agreed(stop.received is not None):
                stopped_by = stop.received
                break
            t0 = time.perf_counter()
            host_batch = first_batch if step == start + 1 else _next_batch(train_data, step)
            batch = _device_batch(host_batch, batch_sharding, train_cfg)
            step_rng = jax.random.fold_in(train_key, step - 1)
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, metrics = p_train_step(state, batch, step_rng)
            loss = float(metrics["loss"])  # waits for the step: it is also the NaN guard
            throughput.add(tokens_per_step, time.perf_counter() - t0, warmup=step == start + 1)
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"non-finite loss ({loss}) at step {step}; training stopped, "
                    f"{_kept_note(ckpt)}. Lower --lr, raise warmup or check the data near "
                    "this step."
                )
            last_step = step == train_cfg.steps
            record: dict[str, Any] = {}
            if step == 1 or step % train_cfg.log_every == 0 or last_step:
                record = {"step": step, "loss": loss, "lr": float(schedule(step - 1)),
                          "tokens_per_s": throughput.rate(),
                          **log_lib.to_record(step, jax.device_get(metrics))}
            if val_data is not None and (last_step or _every(step, train_cfg.eval_every)):
                record = {"step": step, **record, **_evaluate(
                    p_eval_step, state, val_data, batch_sharding, eval_key, train_cfg, model_cfg
                )}
            if record:
                writer.write(record)
            writer.progress(step, loss=loss, tokens_per_s=record.get("tokens_per_s"))
            if last_step or _every(step, train_cfg.ckpt_every):
                ckpt.save(step, _checkpoint_tree(state, root_key),
                          data_state=train_data.get_state(), config=config)
                saved_step = step
        if stopped_by is not None:
            step = int(state.step)
            if step > saved_step:
                ckpt.save(step, _checkpoint_tree(state, root_key),
                          data_state=train_data.get_state(), config=config)
            ckpt.wait_until_finished()  # on disk before it is reported
            where = (f"checkpoint {ckpt.directory / str(step)}" if step
                     else "nothing trained yet")
            writer.message(f"Received {stopped_by}: stopped after step {step} of "
                           f"{train_cfg.steps}; {where}. Rerun with the same workdir to resume.")
    except BaseException:
        ckpt.close(quiet=True)  # keep the error in flight, not a secondary one
        writer.close()
        raise
    try:
        ckpt.close()
    finally:
        writer.close()

    preempted = stopped_by is not None
    plot_paths = plots.write_plots(workdir) if is_main and not preempted else []
    return RunResult(state=state, step=int(state.step), metrics_path=writer.path,
                     plot_paths=plot_paths, preempted=preempted)


def load_checkpoint(workdir: str | Path, model_cfg: Any, *, model: Model | None = None,
                    step: int | None = None) -> tuple[TrainState, dict[str, Any]]:
    """The `TrainState` saved in `workdir` (for sampling, notebooks, or a fresh process).

    Read-only: a damaged checkpoint is skipped with a warning (naming its step and cause) and
    left in place; the next `run` on the workdir moves it aside.

    Args:
      workdir: the run's directory.
      model_cfg: the run's model config (must match the saved one).
      model: the model module; default `moejax.models.lm`.
      step: which checkpoint; default the newest intact one.

    Returns:
      `(state, config)`: the state on the default device and the saved JSON config.

    Raises:
      ValueError: `workdir` is not a directory or holds no checkpoint, checkpoint `step` (or,
        by default, every checkpoint) cannot be read, or `model_cfg` differs from the saved one.
    """
    workdir = ckpt_lib.check_workdir(workdir)
    if step is not None:
        check_int("step", step, lo=0)
    model = importlib.import_module("moejax.models.lm") if model is None else model
    ckpt = ckpt_lib.Checkpointer(workdir, keep=1, read_only=True)
    key = jax.random.key(0)  # only shapes are used; the saved key replaces it
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    want_model = ckpt_lib.config_to_json(model_cfg)

    def check(saved: dict[str, Any]) -> list[str]:
        diffs = ckpt_lib.config_differences(saved.get("model"), want_model, prefix="model")
        if diffs:
            raise ValueError("model_cfg differs from the saved run's:\n  " + "\n  ".join(diffs))
        return []

    def target(saved: dict[str, Any]) -> Any:
        optimizer, _ = make_optimizer(TrainConfig(**saved["train"]))
        shapes = jax.eval_shape(
            functools.partial(init_train_state, model, model_cfg, optimizer), key)
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                            _checkpoint_tree(shapes, key))

    try:
        if not ckpt.all_steps():
            raise ValueError(f"no checkpoint in {ckpt.directory}")
        if step is not None:
            saved = ckpt.saved_config(step)
            check(saved)
            tree, _ = ckpt.restore(step, target(saved))
        else:
            restored = ckpt.restore_latest(target, check=check)
            for damaged in restored.damaged:
                logging.warning("%s", damaged.message())
            tree, saved = restored.tree, restored.config
    finally:
        ckpt.close(quiet=True)
    return tree["state"], saved


class _StopSignals:
    """While entered (in the main thread), SIGTERM and SIGINT set `received` (the signal's name)
    instead of ending the process. The first one puts that signal's previous handler back, so a
    second acts as it would without `run` (SIGTERM ends the process, SIGINT raises
    KeyboardInterrupt); leaving restores every previous handler. Outside the main thread
    (where Python cannot install handlers) nothing is installed."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        if self.received is None:
            self.received = signal.Signals(signum).name
        signal.signal(signum, self._restorable(signum))

    def _restorable(self, signum: int) -> Any:
        previous = self._previous.get(signum)
        return signal.SIG_DFL if previous is None else previous  # None: set outside Python

    def __exit__(self, *exc: Any) -> None:
        for sig in self._previous:
            signal.signal(sig, self._restorable(sig))


def _stop_agreed(local: bool) -> bool:
    """Whether to stop before the next step. Every process must take the same decision (they
    must save the same step), so with several processes the flags are combined (any one stops
    all); with one process its own flag is the decision."""
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    return bool(np.max(multihost_utils.process_allgather(np.asarray(local, np.int32))))


def _kept_note(ckpt: ckpt_lib.Checkpointer) -> str:
    """'the last good checkpoint, step N, is kept in DIR' (after the pending save finishes)."""
    try:
        ckpt.wait_until_finished()
        last = ckpt.latest_step()
    except ckpt_lib.CheckpointWriteError as e:
        last = e.kept_step
    return (f"the last good checkpoint, step {last}, is kept in {ckpt.directory}" if last
            else "no checkpoint had been saved yet")


def _next_batch(train_data: Iterator[Mapping[str, np.ndarray]], step: int) -> Any:
    """The batch of `step`, or a ValueError when the iterator has run dry."""
    try:
        return next(train_data)
    except StopIteration:
        raise ValueError(f"train_data ran out of batches at step {step}; pass an iterator that "
                         "repeats (moejax.data's iterators do)") from None


def _check_first_batch(batch: Any, cfg: TrainConfig, model_cfg: Any) -> None:
    """Refuses a first training batch that is not `{"inputs", "targets"}` of integer token ids
    of shape `(batch_size, seq_len)` within `[0, model_cfg.vocab_size)` (targets only where
    `loss_mask` is nonzero). Host-side, once per run: a bad pipeline fails before compiling."""
    if not isinstance(batch, Mapping):
        raise ArgumentTypeError("train_data must yield dicts with 'inputs' and 'targets', got a "
                                f"{type(batch).__name__}")
    for key in ("inputs", "targets"):
        if key not in batch:
            raise ValueError(f"train_data's batches need {key!r}; the first has keys "
                             f"{sorted(batch)}")
        ids = np.asarray(batch[key])
        if not np.issubdtype(ids.dtype, np.integer):
            raise ArgumentTypeError(f"batch[{key!r}] must hold integer token ids, got dtype "
                                    f"{ids.dtype}")
        if ids.shape != (cfg.batch_size, cfg.seq_len):
            raise ValueError(f"batch[{key!r}] has shape {ids.shape}, expected "
                             f"(batch_size, seq_len) = ({cfg.batch_size}, {cfg.seq_len})")
    vocab = getattr(model_cfg, "vocab_size", None)
    if not isinstance(vocab, int | np.integer):
        return
    for key in ("inputs", "targets"):
        ids = np.asarray(batch[key])
        if key == "targets" and batch.get("loss_mask") is not None:
            ids = ids[np.asarray(batch["loss_mask"]) != 0]
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
            raise ValueError(f"batch[{key!r}] holds token id {bad}, outside the valid range "
                             f"[0, {vocab}) of the model's vocab_size={vocab}; check the data "
                             "or the model's vocab_size")


def _start_from(fresh: TrainState, init_params: tuple[PyTree, PyTree],
                optimizer: optax.GradientTransformation, sharding: NamedSharding) -> TrainState:
    """`fresh` with its params and model state replaced by `init_params` (shapes checked)."""
    params, model_state = init_params
    ckpt_lib.check_same_shapes("init_params: params", fresh.params, params)
    ckpt_lib.check_same_shapes("init_params: model_state", fresh.model_state, model_state)
    params = jax.tree.map(lambda w, g: jnp.asarray(g, w.dtype), fresh.params, params)
    params, model_state = jax.device_put((params, model_state), sharding)
    return dataclasses.replace(fresh, params=params, model_state=model_state,
                               opt_state=jax.jit(optimizer.init, out_shardings=sharding)(params))


def _checkpoint_tree(state: TrainState, root_key: Array) -> dict[str, Any]:
    """What goes into a checkpoint's `state` item: the train state and the root key's data."""
    return {"state": state, "rng": jax.random.key_data(root_key)}


def _every(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def _device_batch(batch: Mapping[str, Any], sharding: NamedSharding,
                  cfg: TrainConfig) -> dict[str, Array]:
    """A host batch as global arrays sharded over the data axis (shape checked)."""
    shape = np.shape(batch["inputs"])
    if shape != (cfg.batch_size, cfg.seq_len):
        raise ValueError(f"batch['inputs'] has shape {shape}, expected "
                         f"(batch_size, seq_len) = ({cfg.batch_size}, {cfg.seq_len})")
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}


def _evaluate(p_eval_step: Callable, state: TrainState, val_data: Callable[[], Iterator],
              sharding: NamedSharding, key: Array, train_cfg: TrainConfig,
              model_cfg: Any) -> dict[str, float]:
    """`val_loss` (CE, nats/token) over up to `eval_batches` batches, plus `val_bpb` (bits per
    byte = CE / ln 2) for byte-level vocabularies (<= 257 ids)."""
    ce_sum = weight_sum = 0.0
    it = val_data()
    for _, batch in zip(range(train_cfg.eval_batches), it, strict=False):
        out = jax.device_get(p_eval_step(state.params, state.model_state,
                                         _device_batch(batch, sharding, train_cfg), key))
        ce_sum += float(out["ce"]) * float(out["weight"])
        weight_sum += float(out["weight"])
    if weight_sum == 0:
        raise ValueError("the validation data gave no batch of (batch_size, seq_len)")
    ce = ce_sum / weight_sum
    record = {"val_loss": ce}
    if getattr(model_cfg, "vocab_size", math.inf) <= 257:
        record["val_bpb"] = ce / math.log(2)
    return record
