"""Checkpoints of a training run: one orbax `CheckpointManager` under `workdir/checkpoints`.

Every checkpoint `workdir/checkpoints/<step>/` holds three items:

  state   params, router/model state, optimizer state, step and the root RNG key data
          (`ocp.args.StandardSave`; the key is stored as its `uint32` key data)
  data    the training iterator's `get_state()` (a JSON-able dict; grain iterators give one)
  config  the run's config as JSON: `{"model": ..., "train": ..., "data": ...}`

Saves are atomic (orbax writes into a temporary directory and renames it when complete), so a
`kill -9` at any moment loses at most the steps since the last checkpoint and never leaves a
half-written one that a restart would read. Only the newest `keep` checkpoints are kept.

A rerun with the same workdir compares its config with the saved one (`check_config`): fields
that change the trajectory (model shape and options, optimizer settings, batch, data, seed) must
be equal, or it refuses with a `ValueError` naming each differing field; bookkeeping fields
(`RESUMABLE_TRAIN_FIELDS`: how often to log/evaluate/save, and `steps`, so a finished run can
be extended) may change.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"

# `TrainConfig` fields that may differ between a saved run and the one resuming it.
RESUMABLE_TRAIN_FIELDS = frozenset(
    {"steps", "log_every", "eval_every", "eval_batches", "ckpt_every", "keep_checkpoints"}
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


def config_differences(saved: Any, new: Any, *, prefix: str = "") -> list[str]:
    """Dotted paths where two JSON configs differ, each as `path: saved != new`.

    Args:
      saved: the JSON config stored in a checkpoint.
      new: the JSON config of the run about to start.
      prefix: path of `saved`/`new` inside the whole config (for recursion).

    Returns:
      one line per differing leaf (a key present on one side only counts as differing).
    """
    if isinstance(saved, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(saved) | set(new)):
            path = f"{prefix}.{key}" if prefix else key
            if key not in saved:
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


class Checkpointer:
    """Saves and restores a run's checkpoints in `workdir/checkpoints` (see the module docstring).

    Args:
      workdir: the run's directory.
      keep: how many of the newest checkpoints to keep (>= 1).
      read_only: open without creating directories or deleting old checkpoints.

    Example:
      >>> ckpt = Checkpointer("/tmp/run", keep=3)           # doctest: +SKIP
      >>> ckpt.save(10, tree, data_state={"next_index": 10}, config=cfg_json)  # doctest: +SKIP
      >>> tree, data_state = ckpt.restore(10, abstract_tree)  # doctest: +SKIP
    """

    def __init__(self, workdir: str | Path, *, keep: int, read_only: bool = False):
        self.directory = Path(workdir).absolute() / CHECKPOINT_DIR
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=not read_only, read_only=read_only
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None when there is none."""
        return self._manager.latest_step()

    def saved_config(self, step: int) -> dict[str, Any]:
        """The JSON config stored with checkpoint `step`."""
        out = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return dict(out["config"])

    def save(self, step: int, tree: Any, *, data_state: Any, config: Mapping[str, Any]) -> None:
        """Writes checkpoint `step` (asynchronously; arrays are copied to host before return).

        Args:
          step: the number of optimizer steps taken.
          tree: pytree of arrays (params, optimizer state, ...).
          data_state: the training iterator's `get_state()`, JSON-able.
          config: the run's JSON config.
        """
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(tree),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(dict(config)),
            ),
            force=True,
        )

    def restore(self, step: int, target: Any) -> tuple[Any, Any]:
        """Reads checkpoint `step`.

        Args:
          step: which checkpoint.
          target: pytree like the saved `tree`, of arrays or `jax.ShapeDtypeStruct`s; their
            shardings say where the restored arrays go.

        Returns:
          `(tree, data_state)`.
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()
            ),
        )
        return out["state"], out["data"]

    def wait_until_finished(self) -> None:
        """Blocks until pending asynchronous saves are committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()


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
    model_cfg = config_cls(**saved["model"])
    params, state = jax.eval_shape(lambda key: init(key, model_cfg), jax.random.key(0))
    with ocp.StandardCheckpointer() as ckptr:
        tree = ckptr.restore(directory / MODEL_PARAMS, {"params": params, "state": state})
    return model_cfg, tree["params"], tree["state"], saved.get("info", {})
