"""Checkpoints of a training run: one orbax `CheckpointManager` under `workdir/checkpoints`.

Every checkpoint `workdir/checkpoints/<step>/` holds three items:

  state   params, router/model state, optimizer state, step and the root RNG key data
          (`ocp.args.StandardSave`; the key is stored as its `uint32` key data)
  data    the training iterator's `get_state()` (a JSON-able dict; grain iterators give one)
  config  the run's config as JSON: `{"model": ..., "train": ..., "data": ...}`

Guarantees (each has a test in `tests/reliability/` or `tests/train/`):

* **Atomic saves.** Orbax writes a checkpoint into `<step>.orbax-checkpoint-tmp` and renames it
  to `<step>` when every item is complete, so a `kill -9` at any moment, in the middle of a save
  included, loses at most the steps since the last checkpoint and never leaves a half-written one
  that a rerun would read. Temporary directories of interrupted saves are never listed as
  checkpoints and are deleted when the next run opens the directory (read-only use leaves
  them).
* **Write errors fail loudly and keep the past.** A save that cannot be written (full disk,
  read-only or vanished directory, file-size limit) raises `CheckpointWriteError` (an `OSError`)
  naming the step, the directory and the cause, and saying which earlier checkpoint is kept.
  Saves are asynchronous, so the error may surface at the next `save`, `wait_until_finished` or
  `close`; it always names the step whose save failed. Old checkpoints are only deleted (to keep
  the newest `keep`) after a newer one is complete.
* **Damaged checkpoints are set aside, never deleted.** `restore_latest` tries the checkpoints
  newest first. One that cannot be read (a truncated or missing array file, missing metadata, a
  missing item, an unreadable or unusable data position) is reported by step and a one-line cause
  and, once an older checkpoint has restored, moved to `workdir/checkpoints_damaged/<step>` (a
  numeric suffix if that exists), outside orbax's directory, so the run resumes from the newest
  intact checkpoint. When none is intact it raises `ValueError` listing every step and cause, and
  moves nothing.

A rerun with the same workdir compares its config with the saved one (`check_config`): fields
that change the trajectory (model shape and options, optimizer settings, batch, data, seed) must
be equal, or it refuses with a `ValueError` naming each differing field; bookkeeping fields
(`RESUMABLE_TRAIN_FIELDS`: how often to log/evaluate/save, and `steps`, so a finished run can
be extended) may change.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from moejax.validation import ArgumentTypeError, check_int

CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "checkpoints_damaged"
TMP_MARK = ".orbax-checkpoint-tmp"  # in the names of orbax's unfinished saves

# `TrainConfig` fields that may differ between a saved run and the one resuming it.
RESUMABLE_TRAIN_FIELDS = frozenset(
    {"steps", "log_every", "eval_every", "eval_batches", "ckpt_every", "keep_checkpoints", "mesh"}
)


def config_to_json(obj: Any) -> Any:
    """A JSON-able copy of a (nested) dataclass / mapping / sequence config.

    Tuples become lists and non-JSON leaves (dtypes, enums) their `str`, so the result compares
    equal to what `json.loads` reads back from a checkpoint.

    Args:
      obj: a dataclass instance, dict, list/tuple or scalar.

    Returns:
      plain dicts, lists, str, int, float, bool and None.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): config_to_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [config_to_json(v) for v in obj]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    return json.loads(json.dumps(obj, default=str))


# Fields added to the configs after runs were saved with them, with the value those runs used:
# a saved config without the key resumes when the new run has that value.
ADDED_FIELDS = {"train.eps": 1e-8}


def config_differences(saved: Any, new: Any, *, prefix: str = "") -> list[str]:
    """Dotted paths where two JSON configs differ, each as `path: saved != new`.

    Args:
      saved: the JSON config stored in a checkpoint.
      new: the JSON config of the run about to start.
      prefix: path of `saved`/`new` inside the whole config (for recursion).

    Returns:
      one line per differing leaf. A key present on one side only counts as differing, except
      a key absent from `saved` whose new value is None: a field added to a config class after
      the run was saved, left at its default (None means "not set" in every config here), or
      equal to what the old runs used (`ADDED_FIELDS`).
    """
    if isinstance(saved, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(saved) | set(new)):
            path = f"{prefix}.{key}" if prefix else key
            if key not in saved:
                if new[key] is not None and ADDED_FIELDS.get(path, ...) != new[key]:
                    out.append(f"{path}: (absent) != {new[key]!r}")
            elif key not in new:
                out.append(f"{path}: {saved[key]!r} != (absent)")
            else:
                out.extend(config_differences(saved[key], new[key], prefix=path))
        return out
    return [] if saved == new else [f"{prefix}: {saved!r} != {new!r}"]


def check_config(saved: Mapping[str, Any], new: Mapping[str, Any], *, where: str) -> list[str]:
    """Refuses to resume a run whose config differs in a field that matters.

    Args:
      saved: `{"model", "train", "data"}` JSON config of the checkpoint.
      new: the same for the run about to start.
      where: the checkpoint directory, for the message.

    Returns:
      the differences in `RESUMABLE_TRAIN_FIELDS` that were allowed (for a log line).

    Raises:
      ValueError: listing every differing field outside `RESUMABLE_TRAIN_FIELDS`.
    """
    diffs = config_differences(dict(saved), dict(new))
    resumable = {f"train.{name}" for name in RESUMABLE_TRAIN_FIELDS}
    allowed = [d for d in diffs if d.split(":")[0] in resumable]
    refused = [d for d in diffs if d not in allowed]
    if refused:
        lines = "\n  ".join(refused)
        raise ValueError(
            f"{where} holds a run with an incompatible config (saved != new):\n  {lines}\n"
            "Refusing to overwrite it: use another workdir, or rerun with the saved settings."
        )
    return allowed


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the earlier ones are untouched.

    Attributes:
      step: the checkpoint whose save failed (None if unknown).
      kept_step: the newest complete checkpoint, kept as it was (None if there is none).
      errno: the operating system's error number when the cause carries one (e.g. 28, ENOSPC).
    """

    def __init__(self, message: str, *, step: int | None, kept_step: int | None,
                 errno: int | None = None):
        super().__init__(message)
        self.step, self.kept_step, self.errno = step, kept_step, errno


class CheckpointReadError(ValueError):
    """Checkpoint `step` cannot be restored; `cause` says why in one line."""

    def __init__(self, step: int, cause: str, directory: Path):
        super().__init__(f"checkpoint {step} in {directory} cannot be restored: {cause}")
        self.step, self.cause = step, cause


@dataclasses.dataclass(frozen=True)
class Damaged:
    """A checkpoint `restore_latest` skipped: its step, why, and where it now is (None when the
    `Checkpointer` is read-only and left it in place)."""

    step: int
    cause: str
    moved_to: Path | None

    def message(self) -> str:
        """One line for the log."""
        where = (f"moved to {self.moved_to}" if self.moved_to is not None
                 else "left in place (read-only)")
        return (f"Checkpoint {self.step} is damaged ({self.cause}); {where}, nothing deleted. "
                "Using an older checkpoint.")


@dataclasses.dataclass(frozen=True)
class Restored:
    """What `restore_latest` read.

    Attributes:
      step: the checkpoint's step.
      tree: the restored `state` item (like the target).
      data_state: the `data` item (the iterator position).
      config: the `config` item.
      notes: the allowed config differences (`check_config`), for a log line.
      damaged: the newer checkpoints that could not be read, newest first.
    """

    step: int
    tree: Any
    data_state: Any
    config: dict[str, Any]
    notes: list[str]
    damaged: list[Damaged]


def check_workdir(workdir: Any, *, name: str = "workdir") -> Path:
    """`workdir` as an absolute `Path`, refused unless it is (or can become) a directory.

    Raises:
      ArgumentTypeError: `workdir` is not a str or `os.PathLike`.
      ValueError: it is empty, or it (or its nearest existing parent) is not a directory.
    """
    if not isinstance(workdir, str | os.PathLike) or isinstance(os.fspath(workdir), bytes):
        raise ArgumentTypeError(f"{name} must be a path (str or os.PathLike), got "
                                f"{workdir!r} ({type(workdir).__name__})")
    if os.fspath(workdir) == "":
        raise ValueError(f"{name} must be a directory path, got ''")
    path = Path(workdir).absolute()
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                what = "" if p == path else f": {p} is a file"
                raise ValueError(f"{name}={os.fspath(workdir)!r} is not a directory{what}; pass a "
                                 "directory (it is created if missing)")
            break
    return path


def describe_error(exc: BaseException, *, limit: int = 400) -> str:
    """An exception as one line: the innermost cause's type and first line of text.

    Storage errors arrive wrapped (orbax re-raises tensorstore's, whose text carries the whole
    tensorstore spec); the innermost says what happened ("byte range not valid", "No such file").
    Long text keeps its start and end (where the operating system's reason is).
    """
    inner, seen = exc, {id(exc)}
    while (nxt := inner.__cause__ or inner.__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        inner = nxt
    text = inner.args[0] if isinstance(inner, KeyError) and inner.args else inner
    lines = str(text).strip().splitlines() or [""]
    text = re.split(r" \[tensorstore_spec| See full TensorStore details", lines[0])[0]
    if len(text) > limit:
        text = text[: limit // 2] + " ... " + text[-limit // 2:]
    return f"{type(inner).__name__}: {text}" if text else type(inner).__name__


def _errno_of(exc: BaseException) -> int | None:
    """The OS error number in `exc`'s chain (an `OSError`'s, or tensorstore's `os_error_code`)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno:
            return exc.errno
        if m := re.search(r"os_error_code='?(\d+)", str(exc)):
            return int(m.group(1))
        exc = exc.__cause__ or exc.__context__
    return None


class Checkpointer:
    """Saves and restores a run's checkpoints in `workdir/checkpoints` (see the module docstring).

    Args:
      workdir: the run's directory (need not exist; must not be a file).
      keep: how many of the newest checkpoints to keep (>= 1).
      read_only: open without creating directories, deleting old checkpoints or moving damaged
        ones.

    Raises:
      ValueError / ArgumentTypeError: `workdir`, `workdir/checkpoints` or `keep` is unusable.

    Example:
      >>> ckpt = Checkpointer("/tmp/run", keep=3)           # doctest: +SKIP
      >>> ckpt.save(10, tree, data_state={"next_index": 10}, config=cfg_json)  # doctest: +SKIP
      >>> tree, data_state = ckpt.restore(10, abstract_tree)  # doctest: +SKIP
    """

    def __init__(self, workdir: str | Path, *, keep: int, read_only: bool = False):
        self.workdir = check_workdir(workdir)
        check_int("keep", keep, lo=1)
        self.directory = self.workdir / CHECKPOINT_DIR
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(f"{self.directory} is a file, but workdir/{CHECKPOINT_DIR} must be "
                             "the checkpoint directory; move the file away")
        self.read_only = bool(read_only)
        if not read_only:
            self._remove_interrupted_saves()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=not read_only, read_only=read_only
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._pending: int | None = None  # the step whose asynchronous save is in flight
        self._kept: int | None = self._manager.latest_step()  # the newest complete checkpoint

    def latest_step(self) -> int | None:
        """The newest checkpoint's step (complete, maybe damaged), or None when there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """The steps of the checkpoints on disk, oldest first."""
        return sorted(self._manager.all_steps())

    def saved_config(self, step: int) -> dict[str, Any]:
        """The JSON config stored with checkpoint `step`.

        Raises:
          CheckpointReadError: the item is missing or unreadable.
        """
        self._check_items(step, ("config",))
        try:
            out = self._manager.restore(
                step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        except Exception as e:  # orbax/tensorstore/JSON errors of every kind
            raise CheckpointReadError(step, describe_error(e), self.directory) from e
        if not isinstance(out["config"], Mapping):
            raise CheckpointReadError(step, "its config item is not a JSON object",
                                      self.directory)
        return dict(out["config"])

    def save(self, step: int, tree: Any, *, data_state: Any, config: Mapping[str, Any]) -> None:
        """Writes checkpoint `step` (asynchronously; arrays are copied to host before return).

        Args:
          step: the number of optimizer steps taken.
          tree: pytree of arrays (params, optimizer state, ...).
          data_state: the training iterator's `get_state()`, JSON-able.
          config: the run's JSON config.

        Raises:
          CheckpointWriteError: this save, or the previous one still in flight, failed.
        """
        self._finish_pending()
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(tree),
                    data=ocp.args.JsonSave(data_state),
                    config=ocp.args.JsonSave(dict(config)),
                ),
                force=True,
            )
        except Exception as e:
            raise self._write_error(step, e) from e
        self._pending = step

    def restore(self, step: int, target: Any) -> tuple[Any, Any]:
        """Reads checkpoint `step`.

        Args:
          step: which checkpoint.
          target: pytree like the saved `tree`, of arrays or `jax.ShapeDtypeStruct`s; their
            shardings say where the restored arrays go.

        Returns:
          `(tree, data_state)`.

        Raises:
          CheckpointReadError: an item is missing or cannot be read (the cause in one line).
        """
        self._check_items(step, ("state", "data"))
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        try:
            out = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()
                ),
            )
        except Exception as e:  # tensorstore raises bare `Exception`s for truncated files
            raise CheckpointReadError(step, describe_error(e), self.directory) from e
        return out["state"], out["data"]

    def restore_latest(self, target: Any, *,
                       check: Callable[[dict[str, Any]], list[str]] | None = None,
                       set_data_state: Callable[[Any], None] | None = None) -> Restored | None:
        """Restores the newest intact checkpoint, setting damaged newer ones aside.

        Checkpoints are tried newest first. One whose config, state or data item cannot be read
        (or whose data position `set_data_state` rejects) is skipped; once an older one restores,
        every skipped one is moved to `workdir/checkpoints_damaged/` (left in place when
        read-only) and listed in `Restored.damaged`. If none restores, nothing is moved: a fault
        that is not the checkpoints' own (e.g. a bug in `set_data_state`) touches nothing.

        Args:
          target: as for `restore`, or a function from the candidate's saved config to it.
          check: called with each candidate's saved config before its state is read (e.g.
            `check_config` against the new run's); returns notes for the log, and a `ValueError`
            it raises refuses the run (it is not taken for damage).
          set_data_state: called with the candidate's data position (e.g. the iterator's
            `set_state`); an exception counts as damage of that checkpoint.

        Returns:
          a `Restored`, or None when there is no checkpoint at all.

        Raises:
          ValueError: no checkpoint is intact (the message lists each step and cause; nothing is
            moved), or `check` refused.
        """
        failed: list[CheckpointReadError] = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                saved = self.saved_config(step)
            except CheckpointReadError as e:
                failed.append(e)
                continue
            notes = [] if check is None else check(saved)
            try:
                tree, data_state = self.restore(step, self._target(step, target, saved))
                if set_data_state is not None:
                    try:
                        set_data_state(data_state)
                    except Exception as e:
                        raise CheckpointReadError(
                            step, "its data position does not fit the data iterator: "
                            + describe_error(e), self.directory) from e
            except CheckpointReadError as e:
                failed.append(e)
                continue
            # An older checkpoint restored, so the newer failures are the checkpoints' own.
            damaged = [self._set_aside(e.step, e.cause) for e in failed]
            self._kept = step
            return Restored(step=step, tree=tree, data_state=data_state, config=saved,
                            notes=notes, damaged=damaged)
        if not failed:
            return None
        lines = "\n  ".join(f"step {e.step}: {e.cause}" for e in failed)
        raise ValueError(
            f"no checkpoint in {self.directory} can be restored:\n  {lines}\nNothing was moved "
            f"or deleted. If they are damaged, move {self.directory} aside to start afresh "
            "(or use another workdir); otherwise fix the cause above and rerun."
        )

    def _target(self, step: int, target: Any, saved: dict[str, Any]) -> Any:
        """`target`, or `target(saved)` when it is a function (its failure: a bad config)."""
        if not callable(target):
            return target
        try:
            return target(saved)
        except Exception as e:
            raise CheckpointReadError(step, "its config does not describe a state: "
                                      + describe_error(e), self.directory) from e

    def wait_until_finished(self) -> None:
        """Blocks until pending asynchronous saves are committed.

        Raises:
          CheckpointWriteError: the pending save failed.
        """
        self._finish_pending()

    def close(self, *, quiet: bool = False) -> None:
        """Waits for pending saves and releases the manager.

        Args:
          quiet: log a failed pending save instead of raising (for cleanup while another
            exception propagates).

        Raises:
          CheckpointWriteError: the pending save failed (unless `quiet`).
        """
        try:
            self._finish_pending()
        except CheckpointWriteError as e:
            if not quiet:
                raise
            logging.error("%s", e)
        finally:
            try:
                self._manager.close()
            except Exception as e:  # the failed save again: it was reported above
                logging.warning("closing %s: %s", self.directory, describe_error(e))

    def _remove_interrupted_saves(self) -> None:
        """Deletes the temporary directories of saves a kill interrupted. They never hold a
        checkpoint: orbax renames one to `<step>` only once it is complete. (Done here, before
        the manager exists, rather than by orbax's `cleanup_tmp_directories`, which runs in a
        background thread. Multi-process: process 0 deletes, the others wait for it.)"""
        if self.directory.is_dir() and jax.process_index() == 0:
            for path in self.directory.iterdir():
                if TMP_MARK in path.name and path.is_dir():
                    logging.info("removing %s, left by an interrupted save", path)
                    shutil.rmtree(path, ignore_errors=True)
        _barrier("moejax_checkpoint_cleanup")

    def _check_items(self, step: int, items: tuple[str, ...]) -> None:
        """Raises `CheckpointReadError` unless checkpoint `step` has each of `items`."""
        path = self.directory / str(step)
        if not path.is_dir():
            known = self.all_steps()
            raise CheckpointReadError(step, f"there is no checkpoint {step} (steps: {known})",
                                      self.directory)
        missing = [name for name in items if not (path / name).is_dir()]
        if missing:
            have = sorted(p.name for p in path.iterdir())
            raise CheckpointReadError(
                step, f"item {', '.join(map(repr, missing))} is missing from {path} "
                f"(it holds {have})", self.directory)

    def _finish_pending(self) -> None:
        """Waits for the save in flight; on failure raises naming its step."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            step, self._pending = self._pending, None
            raise self._write_error(step, e) from e
        if self._pending is not None:
            self._kept, self._pending = self._pending, None

    def _write_error(self, step: int | None, exc: BaseException) -> CheckpointWriteError:
        if self._kept is not None:
            kept = (f"The previous checkpoint, step {self._kept}, is kept in "
                    f"{self.directory / str(self._kept)}; free space or fix the directory, then "
                    "rerun to resume from it.")
        else:
            kept = "No earlier checkpoint exists; free space or fix the directory and rerun."
        what = f"checkpoint {step}" if step is not None else "a checkpoint"
        where = self.directory / str(step) if step is not None else self.directory
        return CheckpointWriteError(
            f"could not write {what} to {where}: {describe_error(exc)}. {kept}",
            step=step, kept_step=self._kept, errno=_errno_of(exc))

    def _set_aside(self, step: int, cause: str) -> Damaged:
        """Moves damaged checkpoint `step` out of orbax's directory (never deletes it).

        Multi-process: every process found the same damage (they read the same files); process
        0 moves it, and every process reloads the step list after it did (a barrier).
        """
        if self.read_only:
            return Damaged(step, cause, None)
        root = self.workdir / DAMAGED_DIR
        dest, n = root / str(step), 0
        while dest.exists():
            n += 1
            dest = root / f"{step}.{n}"
        _barrier(f"moejax_set_aside_{step}_before")  # every process has chosen `dest`
        if jax.process_index() == 0:
            root.mkdir(exist_ok=True)
            (self.directory / str(step)).rename(dest)  # same filesystem: nothing copied
        _barrier(f"moejax_set_aside_{step}")
        self._manager.reload()  # orbax caches its step list
        return Damaged(step, cause, dest)


def _barrier(name: str) -> None:
    """Waits until every process got here (nothing to do with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def check_same_shapes(name: str, want: Any, got: Any) -> None:
    """Raises ValueError unless `got` has `want`'s tree structure and leaf shapes (`name`
    prefixes the message, e.g. "init_params: params")."""
    if jax.tree.structure(want) != jax.tree.structure(got):
        raise ValueError(f"{name} do not have the model's tree structure")
    for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got),
                            strict=True):
        if tuple(w.shape) != tuple(g.shape):
            raise ValueError(f"{name}{jax.tree_util.keystr(path)} has shape {tuple(g.shape)}, "
                             f"the model needs {tuple(w.shape)}")


MODEL_CONFIG = "model_config.json"
MODEL_PARAMS = "model"


def save_model(directory: str | Path, model_cfg: Any, params: Any, model_state: Any, *,
               info: Mapping[str, Any] | None = None) -> Path:
    """Writes a model directory: `model_config.json` (config + `info`) and the orbax tree
    `{"params", "state"}` under `model/`. What `train_lm --init_from=DIR` and `load_model` read.

    The tree is written by orbax (temporary directory, renamed when complete), and the config
    last, so a directory with a config always holds a complete model.

    Raises:
      ValueError: `directory` already holds a model.
    """
    directory = Path(directory).absolute()
    if (directory / MODEL_CONFIG).exists() or (directory / MODEL_PARAMS).exists():
        raise ValueError(f"{directory} already holds a model; use another directory")
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / MODEL_PARAMS, {"params": params, "state": model_state})
        ckptr.wait_until_finished()
    text = json.dumps({"model": config_to_json(model_cfg), "info": dict(info or {})}, indent=2)
    tmp = directory / (MODEL_CONFIG + ".tmp")
    tmp.write_text(text + "\n")
    tmp.replace(directory / MODEL_CONFIG)
    return directory


def read_model_config(directory: str | Path) -> dict[str, Any]:
    """`{"model": <config JSON>, "info": {...}}` of a model directory written by `save_model`.

    Raises:
      ValueError: `directory` holds no complete model.
    """
    path = Path(directory).absolute() / MODEL_CONFIG
    if not path.exists():
        raise ValueError(f"{path.parent} holds no model ({MODEL_CONFIG} is missing); write one "
                         "with experiments.convert_hf or moejax.train.checkpoint.save_model")
    return json.loads(path.read_text())


def load_model(directory: str | Path, config_cls: type, init: Any) -> tuple[Any, Any, Any, dict]:
    """Reads a model directory written by `save_model`.

    Args:
      directory: the directory.
      config_cls: the model config class (e.g. `moejax.models.lm.LMConfig`), built from the
        saved JSON.
      init: `init(key, model_cfg) -> (params, model_state)` of the model (only its shapes are
        used, via `jax.eval_shape`, as the restore target).

    Returns:
      `(model_cfg, params, model_state, info)` with arrays on the default device.

    Raises:
      ValueError: `directory` holds no complete model.
    """
    directory = Path(directory).absolute()
    saved = read_model_config(directory)
    from_dict = getattr(config_cls, "from_dict", None)
    model_cfg = (from_dict(saved["model"], source=str(directory / MODEL_CONFIG)) if from_dict
                 else config_cls(**saved["model"]))
    params, state = jax.eval_shape(lambda key: init(key, model_cfg), jax.random.key(0))
    with ocp.StandardCheckpointer() as ckptr:
        tree = ckptr.restore(directory / MODEL_PARAMS, {"params": params, "state": state})
    return model_cfg, tree["params"], tree["state"], saved.get("info", {})
