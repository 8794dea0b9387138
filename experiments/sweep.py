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
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

from moejax.train.checkpoint import check_workdir, config_differences, config_to_json

RESULTS = "results.json"


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
        if self.path.exists():
            saved = json.loads(self.path.read_text())
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
        elif self.workdir.exists() and any(self.workdir.iterdir()):
            raise ValueError(f"{self.workdir} is not empty and holds no {RESULTS}: it is not a "
                             f"{experiment} sweep; use another --workdir")
        self.workdir.mkdir(parents=True, exist_ok=True)

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
        """Atomically rewrites `results.json` (replacing the summary if one is given)."""
        if summary is not None:
            self.summary = summary
        data = {"experiment": self.experiment, "fixed": self.fixed, "cells": self.cells,
                "summary": config_to_json(self.summary)}
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, self.path)
