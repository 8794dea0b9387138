"""The training loop (DESIGN §9; STYLE §5, §6.15): one loop for every script.

  run              a resumable run in a workdir: restore-or-init, the jitted steps, the loop;
                   checkpoints, metrics, stops cleanly on SIGTERM/SIGINT, survives kills and
                   damaged checkpoints
  fit              the same loop without a workdir or checkpoints, for the cells of a sweep
                   (a state in, the trained state out; learning rates share one compile)
  evaluate         weighted means of the model's metrics over validation batches
  load_checkpoint  a saved run's `TrainState` (for notebooks and sampling)

The pieces: `config.TrainConfig` (hyperparameters), `optim.make_optimizer` (AdamW, warmup +
cosine, clipping; peak lr injected), `steps` (the model contract, `TrainState`, `StepHooks`,
pure `train_step`/`eval_step` and their shared jitted forms), `batches` (first-batch checks),
`checkpoint`, `logging`, `plots`.

Steps count from 1: "step s" is the s-th optimizer update, `state.step == s` after it, and its
randomness is `fold_in(train_key, s - 1)`; with the data iterator's position restored too, a run
resumed from a checkpoint computes exactly what the uninterrupted run would have.

Parallelism: every array lives on a `('data', 'fsdp', 'expert')` mesh (`moejax.parallel.mesh`;
`TrainConfig.mesh` or `mesh=`). Batch rows are split over `('data', 'fsdp')` (unless the model
says otherwise); params and optimizer state are placed by the rule of `moejax.parallel.sharding`
(expert banks over `'expert'`, large matrices over `'fsdp'`), the model state replicated; the
model's `place` (the LM: expert parallelism) adapts its config to the mesh. By default `run`'s
mesh spans all devices on `'data'`; `fit` (small sweep cells) uses one device unless given one.

Several processes (`moejax.parallel.distributed.initialize` first): every process runs the same
`run`; its `train_data` / `val_data` yield only this process's rows of each global batch
(`process_batch_shard`), `fit`'s and `evaluate`'s batches are global (each process keeps its
rows). Only process 0 writes metrics, TensorBoard and plots; every process takes part in the
checkpoints. A checkpoint restores onto any mesh and process count.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh

from moejax.parallel import distributed
from moejax.parallel import mesh as mesh_lib
from moejax.parallel import sharding as sharding_lib
from moejax.parallel.mesh import single_device_mesh
from moejax.train import checkpoint as ckpt_lib
from moejax.train import legacy, plots
from moejax.train import logging as log_lib
from moejax.train.batches import check_first_batch, next_batch
from moejax.train.config import TrainConfig
from moejax.train.optim import make_optimizer, make_schedule, with_learning_rate
from moejax.train.steps import (
    DATA_AXIS,
    NO_HOOKS,
    CompiledSteps,
    Model,
    StepHooks,
    TrainState,
    compiled_steps,
    device_batch,
    init_train_state,
)
from moejax.validation import ArgumentTypeError, check_int

Array = jax.Array
PyTree = Any
Batches = Callable[[], Iterable[Any]]
# What `run` and `fit` call at the end of a run that was not preempted: `(workdir) -> paths`.
EndOfRun = Callable[[Path], Sequence[Path]]


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What `run` leaves behind.

    Attributes:
      state: the final `TrainState` (replicated on the mesh).
      step: its step.
      metrics_path: `workdir/metrics.jsonl`.
      plot_paths: the files the end-of-run steps wrote (by default the PNG plots; none when
        preempted).
      preempted: the run stopped early on SIGTERM/SIGINT, after checkpointing `step`; rerunning
        with the same workdir continues it exactly.
    """

    state: TrainState
    step: int
    metrics_path: Path
    plot_paths: list[Path]
    preempted: bool = False


@dataclasses.dataclass(frozen=True)
class FitResult:
    """What `fit` returns: the final state and every record it logged (`log_every` steps, the
    first and last, and the evaluations), as written to its writer if it had one."""

    state: TrainState
    records: list[dict[str, Any]]


def default_mesh(batch_size: int) -> Mesh:
    """All devices on the `"data"` axis, or the first device alone if B does not divide evenly
    (with one process)."""
    devices = jax.devices()
    if batch_size % len(devices) and jax.process_count() == 1:
        devices = devices[:1]
    return mesh_lib.make_mesh(len(devices), devices=devices)


def _one_device(batch_size: int) -> Mesh:
    """`fit`'s default mesh: the first device alone."""
    del batch_size
    return single_device_mesh()


def resolve_mesh(train_cfg: TrainConfig, mesh: Mesh | None,
                 default: Callable[[int], Mesh] = default_mesh) -> Mesh:
    """The run's mesh: `mesh` if given, else the one `train_cfg.mesh` describes, else
    `default(batch_size)`.

    Raises:
      ValueError: `train_cfg.mesh` does not fit the devices, or disagrees with `mesh`.
    """
    if mesh is not None and not isinstance(mesh, Mesh):
        raise ArgumentTypeError(f"mesh must be a jax.sharding.Mesh or None, got "
                                f"{type(mesh).__name__}")
    if train_cfg.mesh is None:
        return default(train_cfg.batch_size) if mesh is None else mesh
    if mesh is None:
        return mesh_lib.mesh_from_spec(train_cfg.mesh, name="mesh")
    if mesh_lib.format_mesh_spec(mesh) != train_cfg.mesh:
        raise ValueError(f"mesh= {dict(mesh.shape)} disagrees with train_cfg.mesh="
                         f"{train_cfg.mesh!r}; give one of them")
    return mesh


def process_batch_shard(model: Model, model_cfg: Any, train_cfg: TrainConfig,
                        mesh: Mesh | None = None) -> tuple[int, int]:
    """`(index, count)`: the share of every global batch this process must read for `run`
    on `mesh` (default as `run` resolves it): rows `[index·B/count, (index+1)·B/count)`.
    `(0, 1)` with one process. Build the data pipeline with `batch_size = B / count` and
    `grain.sharding.ShardOptions(index, count)` (`moejax.data.iterator`)."""
    mesh = resolve_mesh(train_cfg, mesh)
    steps = compiled_steps(model, model_cfg, train_cfg, mesh)
    return sharding_lib.batch_shard(steps.batch, train_cfg.batch_size)


def run_config(model_cfg: Any, train_cfg: TrainConfig,
               data_info: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The run's JSON config, as saved with every checkpoint and compared on resume (with the
    checkpoint layout it is saved in: `moejax.train.legacy`)."""
    return ckpt_lib.config_to_json(
        {"model": model_cfg, "train": train_cfg, "data": dict(data_info or {}),
         legacy.LAYOUT_KEY: legacy.LAYOUT})


def _without_layout(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k != legacy.LAYOUT_KEY}


def _saved_as_now(saved: Mapping[str, Any], model_cfg: Any) -> dict[str, Any]:
    """A checkpoint's config without its layout key and with its model config read by the
    config class's `from_dict` and written again, so a config saved in an older layout of the
    class (e.g. `LMConfig`'s flat MoE fields) compares equal to the same model now. When
    `from_dict` refuses it, the saved JSON is compared as it is (the differences are listed)."""
    saved = _without_layout(saved)
    from_dict = getattr(type(model_cfg), "from_dict", None)
    if from_dict is not None and isinstance(saved.get("model"), dict):
        try:
            saved["model"] = ckpt_lib.config_to_json(from_dict(saved["model"]))
        except (TypeError, ValueError):
            pass
    return saved


def run(
    model_cfg: Any,
    train_cfg: TrainConfig,
    workdir: str | Path,
    *,
    model: Model,
    train_data: Iterator[Any],
    val_data: Batches | None = None,
    data_info: Mapping[str, Any] | None = None,
    mesh: Mesh | None = None,
    progress: bool = True,
    init_params: tuple[PyTree, PyTree] | None = None,
    hooks: StepHooks = NO_HOOKS,
    bytes_per_token: float | None = None,
    val_metrics: Sequence[str] = (),
    callback: Callable[[int, TrainState, dict | None], None] | None = None,
    end_of_run: Sequence[EndOfRun] = (plots.write_plots,),
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
      model: the model (`moejax.models.lm`, or any object with the contract of
        `moejax.train.steps`).
      train_data: iterator of numpy batches (for token models `[B, T]`, B = `batch_size`,
        T = `seq_len`) with `get_state()`/`set_state(state)` (a grain `DatasetIterator`); it is
        moved to the saved position on resume.
      val_data: builds a fresh validation iterable (called at every evaluation; the first
        `eval_batches` batches are used). None: no validation.
        With several processes: this process's rows of each global batch only (its
        `process_batch_shard`; `batch_size / count` rows).
      data_info: JSON-able description of the data (glob, pipeline seed, ...), saved and compared
        on resume like the configs.
      mesh: the device mesh (`moejax.parallel.make_mesh`); default the one `train_cfg.mesh`
        describes, else `default_mesh(batch_size)`. A run resumes on any mesh.
      progress: show the tqdm bar.
      init_params: `(params, model_state)` to start a fresh run from (fine-tuning, e.g. a model
        converted by `experiments.convert_hf`) instead of `model.init`; must have `model.init`'s
        structure and shapes. Ignored when resuming (the checkpoint holds the trained params);
        record where they came from in `data_info` so a resume checks it.
      hooks: step hooks (`moejax.train.steps.StepHooks`); their state is checkpointed.
      bytes_per_token: with it, evaluations also report `val_bpb` = val_loss / ln 2 /
        bytes_per_token (1 for byte-level text).
      val_metrics: model metrics recorded at evaluations as `val_<name>` (beside `val_loss`,
        the model's `ce`).
      callback: `callback(step, state, metrics)` before the first step (metrics None) and after
        every step (the step's device metrics); process 0 and others alike. The next step
        donates `state`: copy what you keep (`jax.device_get`).
      end_of_run: steps run on process 0 at the end of a run that was not preempted, each
        `(workdir) -> written paths`; by default the PNG plots of `moejax.train.plots`.

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
    mesh = _check_loop_args(model, model_cfg, train_cfg, mesh, val_data, hooks)
    workdir = ckpt_lib.check_workdir(workdir)
    if not all(callable(getattr(train_data, name, None))
               for name in ("__next__", "get_state", "set_state")):
        raise ArgumentTypeError(
            "train_data must be an iterator with get_state()/set_state() (e.g. a grain "
            f"DatasetIterator, as moejax.data builds), got {type(train_data).__name__}")
    workdir.mkdir(parents=True, exist_ok=True)
    # From here on SIGTERM/SIGINT only ask to stop; the loop looks between steps.
    with _StopSignals() as stop:
        return _run(model_cfg, train_cfg, workdir, model=model, train_data=train_data,
                    val_data=val_data, data_info=data_info, mesh=mesh, progress=progress,
                    init_params=init_params, hooks=hooks, stop=stop,
                    loop_options=dict(bytes_per_token=bytes_per_token, val_metrics=val_metrics,
                                      callback=callback), end_of_run=end_of_run)


def _check_loop_args(model: Any, model_cfg: Any, train_cfg: TrainConfig, mesh: Mesh | None,
                     val_data: Any, hooks: Any, *,
                     default_mesh: Callable[[int], Mesh] = default_mesh) -> Mesh:
    """What `run` and `fit` refuse before any work, naming the argument; returns the mesh
    (`resolve_mesh`)."""
    if not isinstance(train_cfg, TrainConfig):
        raise ArgumentTypeError(f"train_cfg must be a TrainConfig, got {type(train_cfg).__name__}")
    mesh = resolve_mesh(train_cfg, mesh, default_mesh)
    if not all(callable(getattr(model, name, None)) for name in ("init", "loss_fn")):
        raise ArgumentTypeError("model must have init(key, cfg) and loss_fn(params, state, "
                                f"batch, *, cfg, train, rng), got {type(model).__name__}")
    if val_data is not None and not callable(val_data):
        raise ArgumentTypeError("val_data must be a function returning a fresh iterable, or "
                                f"None; got {type(val_data).__name__}")
    if not isinstance(hooks, StepHooks):
        raise ArgumentTypeError(f"hooks must be a StepHooks, got {type(hooks).__name__}")
    max_len = getattr(model_cfg, "max_seq_len", None)
    if max_len is not None and train_cfg.seq_len > max_len:
        raise ValueError(f"seq_len={train_cfg.seq_len} exceeds the model's max_seq_len={max_len}")
    if DATA_AXIS not in mesh.axis_names:
        raise ValueError(f"mesh needs a {DATA_AXIS!r} axis, got axes {mesh.axis_names}")
    axes = mesh_lib.batch_axes(mesh)
    if (getattr(model, "batch_spec", None) is None
            and train_cfg.batch_size % mesh_lib.num_batch_shards(mesh)):
        sizes = "×".join(str(mesh_lib.axis_size(mesh, a)) for a in axes)
        raise ValueError(f"batch_size={train_cfg.batch_size} is not divisible by the mesh's "
                         f"{'×'.join(axes)} = {sizes} = {mesh_lib.num_batch_shards(mesh)} "
                         "(batch rows are split over them)")
    return mesh


def _run(model_cfg: Any, train_cfg: TrainConfig, workdir: Path, *, model: Model,
         train_data: Iterator[Any], val_data: Batches | None,
         data_info: Mapping[str, Any] | None, mesh: Mesh, progress: bool,
         init_params: tuple[PyTree, PyTree] | None, hooks: StepHooks, stop: _StopSignals,
         loop_options: dict[str, Any], end_of_run: Sequence[EndOfRun]) -> RunResult:
    """`run` after its argument checks: restore or init, the jitted steps, the loop."""
    config = run_config(model_cfg, train_cfg, data_info)
    distributed.check_same_on_every_process(_fields(config), what="run setting")
    is_main = jax.process_index() == 0
    steps = compiled_steps(model, model_cfg, train_cfg, mesh, hooks)
    shard_index, shard_count = sharding_lib.batch_shard(steps.batch, train_cfg.batch_size)
    local_cfg = train_cfg.replace(batch_size=train_cfg.batch_size // shard_count)
    ckpt = ckpt_lib.Checkpointer(workdir, keep=train_cfg.keep_checkpoints)
    try:
        state, root_key, restored, first_batch = _restore_or_init(
            steps, model, model_cfg, train_cfg, ckpt, config, train_data, init_params,
            local_cfg=local_cfg)
    except BaseException:
        ckpt.close(quiet=True)
        raise
    start = int(state.step)
    _, train_key, eval_key = jax.random.split(root_key, 3)

    writer = log_lib.MetricsWriter(workdir, start_step=start, total_steps=train_cfg.steps,
                                   enabled=is_main, progress=progress)
    writer.write_config(config)
    writer.message(describe_placement(steps, mesh, state, batch_share=(shard_index, shard_count)))
    for damaged in restored.damaged if restored is not None else ():
        writer.message(damaged.message())
    if start:
        writer.message(f"Resuming from step {start} ({ckpt.directory / str(start)}).")
        for note in restored.notes:
            writer.message(f"  changed since the checkpoint: {note}")
    if start >= train_cfg.steps:
        writer.message(f"Nothing to train: the run is at step {start} >= steps={train_cfg.steps}.")

    saved = {"step": start}

    def save(step: int, state: TrainState) -> None:
        ckpt.save(step, _checkpoint_tree(state, root_key, steps.replicated),
                  data_state=train_data.get_state(),
                  config=config)
        saved["step"] = step

    try:
        state, stopped_by, _ = _loop(
            state, steps, train_data, first_batch=first_batch, train_cfg=train_cfg,
            train_key=train_key, eval_key=eval_key, val_data=val_data, writer=writer,
            local_rows=local_cfg.batch_size,
            stop=lambda: _stop_agreed(stop.received), checkpoint=save,
            nan_note=lambda: _kept_note(ckpt), **loop_options)
        if stopped_by is not None:
            step = int(state.step)
            if step > saved["step"]:
                save(step, state)
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
    written = ([p for end in end_of_run for p in end(workdir)] if is_main and not preempted
               else [])
    return RunResult(state=state, step=int(state.step), metrics_path=writer.path,
                     plot_paths=list(written), preempted=preempted)


def _fields(config: Mapping[str, Any]) -> dict[str, Any]:
    """A run config's fields by dotted name ("train.lr", "model.moe", ...), to compare across
    processes."""
    return {f"{part}.{k}" if isinstance(fields, Mapping) else part: v
            for part, fields in config.items()
            for k, v in (fields.items() if isinstance(fields, Mapping) else [(None, fields)])}


def describe_placement(steps: CompiledSteps, mesh: Mesh, state: TrainState, *,
                       batch_share: tuple[int, int] = (0, 1)) -> str:
    """One log line: processes, mesh, this process's share of each batch, and the bytes of
    params + optimizer state per device (beside their replicated size)."""
    held = {"params": state.params, "opt_state": state.opt_state}
    per_device = sharding_lib.bytes_per_device(held)
    replicated = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(held))
    index, count = batch_share
    return (f"{jax.process_count()} process(es), {mesh.devices.size} devices, mesh "
            f"{mesh_lib.format_mesh_spec(mesh)}; this process reads share {index} of {count} of "
            f"each batch; params + optimizer state {per_device / 2**20:.2f} MiB per device "
            f"({replicated / 2**20:.2f} MiB replicated)")


def _restore_or_init(steps: CompiledSteps, model: Model, model_cfg: Any,
                     train_cfg: TrainConfig, ckpt: ckpt_lib.Checkpointer,
                     config: dict[str, Any], train_data: Iterator[Any],
                     init_params: tuple[PyTree, PyTree] | None, *, local_cfg: TrainConfig
                     ) -> tuple[TrainState, Array, ckpt_lib.Restored | None, Any]:
    """The newest intact checkpoint of a compatible run in this workdir (its state, root key and
    data position), else a fresh state; and the first batch to train on (checked before
    anything is compiled or written; None when the run is already done; `local_cfg` is
    `train_cfg` with this process's share of the batch). Restoring needs only the shapes, and
    puts every array straight into its sharding on this run's mesh (whatever mesh saved it)."""
    root_key = jax.random.key(train_cfg.seed)
    restored = first_batch = None
    if ckpt.all_steps():
        target = _checkpoint_tree(jax.tree.map(
            lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
            jax.eval_shape(steps.init, root_key), steps.state), root_key, steps.replicated)
        restored = ckpt.restore_latest(
            functools.partial(_target_of_layout, target), set_data_state=train_data.set_state,
            check=lambda saved: ckpt_lib.check_config(
                _saved_as_now(saved, model_cfg), _without_layout(config),
                where=str(ckpt.directory)))
        if restored is not None and legacy.layout_of(restored.config) == 1:
            restored = dataclasses.replace(
                restored, tree=legacy.from_legacy(restored.tree, target, train_cfg.lr))
    start = restored.step if restored is not None else 0
    if start < train_cfg.steps:
        first_batch = next_batch(train_data, start + 1)
        check_first_batch(model, first_batch, cfg=model_cfg, train_cfg=local_cfg)
    if restored is not None:
        return (restored.tree["state"], jax.random.wrap_key_data(restored.tree["rng"]), restored,
                first_batch)
    init_key = jax.random.split(root_key, 3)[0]
    state = fresh_state(steps, train_cfg, init_key)
    if init_params is not None:
        optimizer, _ = make_optimizer(train_cfg)
        state = _start_from(state, init_params, optimizer, steps.state)
    return state, root_key, None, first_batch


def _target_of_layout(target: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
    """The restore target for a checkpoint saved with `saved` config (its layout's)."""
    return target if legacy.layout_of(saved) == legacy.LAYOUT else legacy.legacy_target(target)


def fresh_state(steps: CompiledSteps, train_cfg: TrainConfig, key: Array) -> TrainState:
    """`steps.init(key)` (model init, optimizer init, hooks' init; one compiled call) with the
    peak learning rate of `train_cfg`."""
    state = steps.init(key)
    return dataclasses.replace(state, opt_state=with_learning_rate(state.opt_state, train_cfg.lr))


def init_state(model: Model, model_cfg: Any, train_cfg: TrainConfig, key: Array, *,
               hooks: StepHooks = NO_HOOKS, mesh: Mesh | None = None) -> TrainState:
    """A fresh `TrainState` for `fit` (init key `key`), on `mesh` (default one device); the
    compiled init is shared like the steps."""
    mesh = resolve_mesh(train_cfg, mesh, _one_device)
    return fresh_state(compiled_steps(model, model_cfg, train_cfg, mesh, hooks), train_cfg, key)


def fit(state: TrainState, train_data: Iterable[Any], *, model: Model, model_cfg: Any,
        train_cfg: TrainConfig, rng: Array, hooks: StepHooks = NO_HOOKS,
        val_data: Batches | None = None, val_metrics: Sequence[str] = (),
        writer: log_lib.MetricsWriter | None = None, mesh: Mesh | None = None,
        callback: Callable[[int, TrainState, dict | None], None] | None = None,
        bytes_per_token: float | None = None) -> FitResult:
    """`run`'s loop without a workdir: trains `state` from its step to `train_cfg.steps` on
    `train_data`, with no checkpoints and no signal handling (a sweep cell, rerun from its
    start if interrupted).

    Every run with the same model, config, optimizer settings (all but `lr`), hooks and mesh
    shares one compiled step, so the cells of a learning-rate or seed sweep compile once
    (`init_state` builds their states).

    Args:
      state: where to start (`init_state(...)`, or a trained state to continue); donated to
        the first step (its arrays are deleted): pass copies of arrays you still need.
      train_data: the batches, one per step, in order (an iterator or an iterable).
      model, model_cfg: the model and its config.
      train_cfg: the hyperparameters (`steps`, the optimizer's, `log_every`, `eval_every`,
        `eval_batches`, `batch_size` and `seq_len` for token batches); its `lr` must be the one
        in `state` (`init_state` puts it there).
      rng: the train key: step s uses `fold_in(rng, s - 1)`.
      hooks: step hooks.
      val_data, val_metrics: as for `run`.
      writer: where the records go (`MetricsWriter`), or None to only return them.
      mesh: default one device.
      callback: as for `run`.
      bytes_per_token: as for `run`.

    Returns:
      a `FitResult`.

    Raises:
      FloatingPointError: the loss became non-finite (naming the step).
    """
    mesh = _check_loop_args(model, model_cfg, train_cfg, mesh, val_data, hooks,
                            default_mesh=_one_device)
    steps = compiled_steps(model, model_cfg, train_cfg, mesh, hooks)
    state = _placed(state, steps)
    batches = iter(train_data)
    first_batch = None
    if int(state.step) < train_cfg.steps:
        first_batch = next_batch(batches, int(state.step) + 1)
        check_first_batch(model, first_batch, cfg=model_cfg, train_cfg=train_cfg)
    state, _, records = _loop(state, steps, batches, first_batch=first_batch,
                              train_cfg=train_cfg, train_key=rng,
                              eval_key=jax.random.fold_in(rng, 2**31 - 1), val_data=val_data,
                              writer=writer, callback=callback, val_metrics=val_metrics,
                              bytes_per_token=bytes_per_token)
    return FitResult(state=state, records=records)


def _loop(state: TrainState, steps: CompiledSteps, batches: Iterator[Any], *, first_batch: Any,
          train_cfg: TrainConfig, train_key: Array, eval_key: Array, val_data: Batches | None,
          writer: log_lib.MetricsWriter | None, bytes_per_token: float | None = None,
          val_metrics: Sequence[str] = (),
          callback: Callable[[int, TrainState, dict | None], None] | None = None,
          stop: Callable[[], str | None] = lambda: None,
          checkpoint: Callable[[int, TrainState], None] | None = None,
          nan_note: Callable[[], str] = lambda: "no checkpoint is kept (fit)",
          local_rows: int | None = None,
          ) -> tuple[TrainState, str | None, list[dict[str, Any]]]:
    """The loop of `run` and `fit`, from `state.step + 1` to `train_cfg.steps`. A stop request
    (`stop()` returns the signal's name) is looked at between steps: the step in progress always
    finishes. `local_rows`: the batches are this process's share, of that many rows (`run`);
    None: they are global batches (`fit`). Returns `(state, stopped_by, records)`."""
    start = int(state.step)
    schedule = make_schedule(train_cfg)
    tokens_per_step = train_cfg.batch_size * train_cfg.seq_len
    throughput = log_lib.Throughput()
    records: list[dict[str, Any]] = []
    if callback is not None:
        callback(start, state, None)
    for step in range(start + 1, train_cfg.steps + 1):
        stopped_by = stop()
        if stopped_by is not None:
            return state, stopped_by, records
        t0 = time.perf_counter()
        host_batch = first_batch if step == start + 1 else next_batch(batches, step)
        batch = device_batch(_check_shape(host_batch, train_cfg, local_rows), steps.batch,
                             process_local=local_rows is not None)
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            state, metrics = steps.train(state, batch, jax.random.fold_in(train_key, step - 1))
        loss = float(metrics["loss"])  # waits for the step: it is also the NaN guard
        throughput.add(tokens_per_step, time.perf_counter() - t0, warmup=step == start + 1)
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"non-finite loss ({loss}) at step {step}; training stopped, {nan_note()}. "
                "Lower --lr, raise warmup or check the data near this step.")
        last_step = step == train_cfg.steps
        record: dict[str, Any] = {}
        if step == 1 or step % train_cfg.log_every == 0 or last_step:
            record = {"step": step, "loss": loss, "lr": float(schedule(step - 1)),
                      "tokens_per_s": throughput.rate(),
                      **log_lib.to_record(step, jax.device_get(metrics))}
        if val_data is not None and (last_step or _every(step, train_cfg.eval_every)):
            ev = _evaluate(steps, state, val_data(), eval_key, train_cfg.eval_batches,
                           process_local=local_rows is not None)
            record = {"step": step, **record, **_val_record(ev, bytes_per_token, val_metrics)}
        if record:
            records.append(record)
            if writer is not None:
                writer.write(record)
        if writer is not None:
            writer.progress(step, loss=loss, tokens_per_s=record.get("tokens_per_s"))
        if callback is not None:
            callback(step, state, metrics)
        if checkpoint is not None and (last_step or _every(step, train_cfg.ckpt_every)):
            checkpoint(step, state)
    return state, None, records


def _check_shape(batch: Any, cfg: TrainConfig, local_rows: int | None = None) -> Any:
    """A token batch (a dict with `inputs`) must be `(batch_size, seq_len)` at every step (this
    process's `local_rows` of them when given)."""
    if isinstance(batch, Mapping) and "inputs" in batch:
        shape = np.shape(batch["inputs"])
        rows = cfg.batch_size if local_rows is None else local_rows
        if shape != (rows, cfg.seq_len):
            share = ("" if local_rows is None or local_rows == cfg.batch_size
                     else f" (this process's share of batch_size={cfg.batch_size})")
            raise ValueError(f"batch['inputs'] has shape {shape}, expected "
                             f"(batch_size, seq_len) = ({rows}, {cfg.seq_len}){share}")
    return batch


def _val_record(ev: Mapping[str, float], bytes_per_token: float | None,
                val_metrics: Sequence[str]) -> dict[str, float]:
    record = {"val_loss": ev["ce"]}
    if bytes_per_token is not None:
        record["val_bpb"] = ev["ce"] / math.log(2) / bytes_per_token
    for name in val_metrics:
        if name not in ev:
            raise ValueError(f"val_metrics: the model reports no scalar metric {name!r}; it "
                             f"reports {sorted(ev)}")
        record[f"val_{name}"] = ev[name]
    return record


def evaluate(state: TrainState, batches: Iterable[Any], *, model: Model, model_cfg: Any,
             train_cfg: TrainConfig, mesh: Mesh | None = None, rng: Array | None = None,
             max_batches: int | None = None, hooks: StepHooks = NO_HOOKS) -> dict[str, float]:
    """Weighted means (`moejax.train.steps.batch_weight`) over `batches` (global batches) of
    every scalar metric of `model.loss_fn(..., train=False)` (`ce`, `loss`, the model's own),
    with the jitted eval step the loop uses (default mesh: one device; `rng` default key 0;
    `hooks`: those the state was trained with, whose `init` may have added model state)."""
    mesh = resolve_mesh(train_cfg, mesh, _one_device)
    steps = compiled_steps(model, model_cfg, train_cfg, mesh, hooks)
    rng = jax.random.key(0) if rng is None else rng
    state = _placed(state, steps, fields=("params", "model_state"))  # what eval reads
    return _evaluate(steps, state, batches, rng, max_batches)


def _placed(state: TrainState, steps: CompiledSteps,
            fields: Sequence[str] = ("params", "model_state", "opt_state", "step", "extra")
            ) -> TrainState:
    """`state` with `fields` on the steps' shardings (moved there if they live elsewhere: built
    on another mesh, restored onto one device, params swapped in from the host), so the
    compiled steps take them as they are (no recompile, no layout error).

    Raises:
      ValueError: `state` is not shaped as the steps' fresh state (e.g. trained with hooks that
        are not given, or with another model config).
    """
    try:
        return dataclasses.replace(state, **{
            f: jax.device_put(getattr(state, f), getattr(steps.state, f)) for f in fields})
    except (ValueError, TypeError) as e:
        raise ValueError("the state does not have the structure of the model's fresh state "
                         "(the same model config and step hooks, whose init may add state): "
                         f"{' '.join(str(e).split())[:400]}") from None


def _evaluate(steps: CompiledSteps, state: TrainState, batches: Iterable[Any], key: Array,
              max_batches: int | None, *, process_local: bool = False) -> dict[str, float]:
    sums: dict[str, float] = {}
    weight_sum = 0.0
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        out = jax.device_get(steps.eval(state.params, state.model_state,
                                        device_batch(batch, steps.batch,
                                                     process_local=process_local), key))
        w = float(out.pop("weight"))
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v) * w
        weight_sum += w
    if weight_sum == 0:
        raise ValueError("the validation data gave no batch (or only batches of weight 0)")
    return {k: v / weight_sum for k, v in sums.items()}


def load_checkpoint(workdir: str | Path, model_cfg: Any, *, model: Model,
                    step: int | None = None, hooks: StepHooks = NO_HOOKS
                    ) -> tuple[TrainState, dict[str, Any]]:
    """The `TrainState` saved in `workdir` (for sampling, notebooks, or a fresh process).

    Read-only: a damaged checkpoint is skipped with a warning (naming its step and cause) and
    left in place; the next `run` on the workdir moves it aside.

    Args:
      workdir: the run's directory.
      model_cfg: the run's model config (must match the saved one).
      model: the model (e.g. `moejax.models.lm`).
      step: which checkpoint; default the newest intact one.
      hooks: the run's step hooks (their `init` gives the shape of `TrainState.extra`).

    Returns:
      `(state, config)`: the state on the default device and the saved JSON config.

    Raises:
      ValueError: `workdir` is not a directory or holds no checkpoint, checkpoint `step` (or,
        by default, every checkpoint) cannot be read, or `model_cfg` differs from the saved one.
    """
    workdir = ckpt_lib.check_workdir(workdir)
    if step is not None:
        check_int("step", step, lo=0)
    ckpt = ckpt_lib.Checkpointer(workdir, keep=1, read_only=True)
    key = jax.random.key(0)  # only shapes are used; the saved key replaces it
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    want_model = ckpt_lib.config_to_json(model_cfg)

    def check(saved: dict[str, Any]) -> list[str]:
        diffs = ckpt_lib.config_differences(_saved_as_now(saved, model_cfg).get("model"),
                                            want_model, prefix="model")
        if diffs:
            raise ValueError("model_cfg differs from the saved run's:\n  " + "\n  ".join(diffs))
        return []

    def current_target(saved: dict[str, Any]) -> Any:
        optimizer, _ = make_optimizer(TrainConfig(**saved["train"]))
        shapes = jax.eval_shape(
            lambda k: init_train_state(model, model_cfg, optimizer, k, hooks), key)
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                            _checkpoint_tree(shapes, key))

    def target(saved: dict[str, Any]) -> Any:
        return _target_of_layout(current_target(saved), saved)

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
    if legacy.layout_of(saved) != legacy.LAYOUT:
        tree = legacy.from_legacy(tree, current_target(saved), saved["train"]["lr"])
    return tree["state"], _without_layout(saved)


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


def _stop_agreed(local: str | None) -> str | None:
    """The signal to stop on before the next step, or None. Every process must take the same
    decision (they must save the same step), so with several processes the flags are combined
    (any one stops all); with one process its own flag is the decision."""
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray(local is not None, np.int32))
    return (local or "a stop request of another process") if np.max(flags) else None


def _kept_note(ckpt: ckpt_lib.Checkpointer) -> str:
    """'the last good checkpoint, step N, is kept in DIR' (after the pending save finishes)."""
    try:
        ckpt.wait_until_finished()
        last = ckpt.latest_step()
    except ckpt_lib.CheckpointWriteError as e:
        last = e.kept_step
    return (f"the last good checkpoint, step {last}, is kept in {ckpt.directory}" if last
            else "no checkpoint had been saved yet")


def _start_from(fresh: TrainState, init_params: tuple[PyTree, PyTree],
                optimizer: optax.GradientTransformation, shardings: TrainState) -> TrainState:
    """`fresh` with its params and model state replaced by `init_params` (shapes checked),
    placed by `shardings`."""
    params, model_state = init_params
    ckpt_lib.check_same_shapes("init_params: params", fresh.params, params)
    ckpt_lib.check_same_shapes("init_params: model_state", fresh.model_state, model_state)
    params = jax.tree.map(lambda w, g: np.asarray(g, w.dtype), fresh.params, params)
    params = device_batch(params, shardings.params)
    model_state = device_batch(model_state, shardings.model_state)
    opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
    return dataclasses.replace(fresh, params=params, model_state=model_state,
                               opt_state=opt_state)


def _checkpoint_tree(state: TrainState, root_key: Array,
                     sharding: jax.sharding.Sharding | None = None) -> dict[str, Any]:
    """What goes into a checkpoint's `state` item: the train state and the root key's data
    (placed with `sharding`, e.g. replicated on the run's mesh: with several processes orbax
    saves only global arrays)."""
    data = jax.random.key_data(root_key)
    if sharding is not None:
        data = device_batch(data, sharding)
    return {"state": state, "rng": data}


def _every(step: int, every: int) -> bool:
    return every > 0 and step % every == 0
