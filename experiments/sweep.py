"""Resumable sweep results shared by the experiment scripts (`mqar`, `routing_hmm`, ...).

A sweep is a list of cells (one trained model each, a JSON dict) kept in `WORKDIR/results.json`.
The file names the experiment and its fixed settings; reopening the workdir with another
experiment, or with different fixed settings, is refused with the differing fields, so a rerun
never mixes results of two setups. Every `add` rewrites the file atomically (write + rename), so
an interrupted sweep loses at most the cell in flight and a rerun skips the cells already there.

    sweep = ResultsFile(workdir, "mqar", fixed={"steps": 2000, "lrs": [...]})
    for key in todo:
        if key in sweep.done(("mixer", "d_model", "seed")):
            continue
        sweep.add({"mixer": ..., "d_model": ..., "seed": ..., "acc": ...})

Several processes (`experiments.mesh_flags`): every process opens the same `ResultsFile` and
trains every cell (the steps are collectives), but only process 0 reads the workdir (the others
get what it read, so all agree on the cells left to train even without a shared file system)
and only process 0 writes. `from_main` does the same for other files a sweep reads, and
`check_mesh` refuses a mesh some cell cannot use before anything is trained.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import jax
import numpy as np
from jax.sharding import Mesh

from experiments.mesh_flags import is_main
from moejax.train import loop
from moejax.train.checkpoint import check_workdir, config_differences, config_to_json

RESULTS = "results.json"
T = TypeVar("T")


def from_main(read: Callable[[], T]) -> T:
    """What `read()` returns on process 0, on every process (`read` runs on process 0 only; its
    value must be JSON-able and comes back as `json.loads` gives it). With one process: `read()`.

    For what a sweep reads from its workdir (finished cells, a saved model's presence): every
    process then trains the same cells, even when the workdir is not on a shared file system.
    Every process must call it (it is a collective).

    Raises:
      ValueError: `read` raised on process 0 (on the other processes; process 0 re-raises it).
    """
    if jax.process_count() == 1:
        return read()
    from jax.experimental import multihost_utils

    error = None
    payload = b""
    if is_main():
        try:
            payload = json.dumps({"value": read()}).encode()
        except Exception as e:  # noqa: BLE001 - reported to every process below
            error = e
            payload = json.dumps({"error": f"{type(e).__name__}: {e}"}).encode()
    size = int(multihost_utils.broadcast_one_to_all(np.int32(len(payload))))
    buf = np.zeros(size, np.uint8)
    if is_main():
        buf[:] = np.frombuffer(payload, np.uint8)
    out = json.loads(np.asarray(multihost_utils.broadcast_one_to_all(buf)).tobytes())
    if error is not None:
        raise error
    if "error" in out:
        raise ValueError(f"process 0 could not read the workdir: {out['error']}")
    return out["value"]


def write_json(data: Any, path: str) -> None:
    """Atomically writes `data` as JSON to `path`, on process 0 only."""
    if not is_main():
        return
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=2)
    os.replace(path + ".tmp", path)


def check_mesh(mesh: Mesh | None, runs: Iterable[tuple[str, Any, Any, loop.TrainConfig]]
               ) -> None:
    """Refuses, before anything is trained, a mesh that some run of a sweep cannot use.

    Args:
      mesh: the sweep's mesh (`experiments.mesh_flags.setup`); None or one device: nothing to
        check.
      runs: `(what, model, model_cfg, train_cfg)` of every distinct run (and evaluation: its
        batch size as `train_cfg.batch_size`); `what` names it in the message ("" for none).

    Raises:
      ValueError: the library's message (`moejax.train.loop.process_batch_shard`: batch rows
        not divisible by the mesh's data×fsdp, experts not by its `expert` axis, ...), prefixed
        with `what`.
    """
    if mesh is None or mesh.devices.size == 1:
        return
    for what, model, model_cfg, train_cfg in runs:
        try:
            loop.process_batch_shard(model, model_cfg, train_cfg, mesh)
        except ValueError as e:
            raise ValueError(f"{what}: {e}" if what else str(e)) from None


def fixed_settings(cfg: Any, sweep_axes: Iterable[str]) -> dict[str, Any]:
    """The fields of an experiment config (dataclass) but its sweep axes, as JSON — what every
    cell of a workdir shares; the axes (seeds, models, ...) may grow between reruns."""
    axes = set(sweep_axes)
    return config_to_json({f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                           if f.name not in axes})


class ResultsFile:
    """The cells of one sweep in `workdir/results.json`.

    Args:
      workdir: the sweep's folder (created if missing).
      experiment: the script's name, stored in the file and checked on reopening.
      fixed: settings every cell shares (a dataclass or mapping); checked on reopening.

    Raises:
      ValueError: the workdir holds another experiment, a run of another kind (files but no
        results.json), or this experiment with other fixed settings.
    """

    def __init__(self, workdir: str | os.PathLike, experiment: str, fixed: Any):
        self.workdir = check_workdir(workdir, name="--workdir")
        self.path = self.workdir / RESULTS
        self.experiment = experiment
        self.fixed = config_to_json(fixed)
        self.cells: list[dict] = []
        self.summary: Any = None
        saved, foreign = from_main(self._read)  # process 0's view, on every process
        if saved is not None:
            if saved.get("experiment") != experiment:
                raise ValueError(f"{self.workdir} holds results of experiment "
                                 f"{saved.get('experiment')!r}, not {experiment!r}; "
                                 "use another --workdir")
            diffs = config_differences(saved.get("fixed", {}), self.fixed)
            if diffs:
                lines = "\n  ".join(diffs)
                raise ValueError(f"{self.workdir} holds a {experiment} sweep with other settings "
                                 f"(saved != new):\n  {lines}\nuse another --workdir, or rerun "
                                 "with the saved settings")
            self.cells = saved.get("cells", [])
            self.summary = saved.get("summary")
        elif foreign:
            raise ValueError(f"{self.workdir} is not empty and holds no {RESULTS}: it is not a "
                             f"{experiment} sweep; use another --workdir")
        if is_main():
            self.workdir.mkdir(parents=True, exist_ok=True)

    def _read(self) -> tuple[Any, bool]:
        """`(saved results or None, whether the workdir holds other files instead)`."""
        if self.path.exists():
            return json.loads(self.path.read_text()), False
        return None, self.workdir.exists() and any(self.workdir.iterdir())

    def done(self, key_fields: Iterable[str]) -> set[tuple]:
        """The keys (values of `key_fields`, in order) of the cells already in the file."""
        key_fields = tuple(key_fields)
        return {tuple(c[k] for k in key_fields) for c in self.cells}

    def add(self, cell: Mapping[str, Any], *, summary: Any = None) -> None:
        """Appends a cell (and replaces the summary, if given) and rewrites the file."""
        self.cells.append(config_to_json(dict(cell)))
        if summary is not None:
            self.summary = summary
        self.write()

    def write(self, summary: Any = None) -> None:
        """Atomically rewrites `results.json` (replacing the summary if one is given); on
        process 0 only (the others keep the same cells and summary in memory)."""
        if summary is not None:
            self.summary = summary
        if not is_main():
            return
        data = {"experiment": self.experiment, "fixed": self.fixed, "cells": self.cells,
                "summary": config_to_json(self.summary)}
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, self.path)
