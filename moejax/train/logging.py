"""What a training run reports: `workdir/metrics.jsonl`, TensorBoard event files, a tqdm bar.

  metrics.jsonl   one JSON object per logged step, in step order: `step`, `loss`, `lr`,
                  `tokens_per_s`, the model's scalar metrics (`ce`, aux losses, ...), at eval
                  steps `val_loss` (and `val_bpb`), and for MoE models `load` (the `[L, E]`
                  per-layer expert load, as nested lists) with its summary `load_cv`,
                  `load_max_vio` (means over layers).
  tensorboard/    the same scalars as TensorBoard event files (tensorboardX).
  progress bar    tqdm on stderr: loss, tokens/s and ETA.

Only process 0 writes (`enabled=False` elsewhere). On resume from step k, lines of steps > k
(written by the interrupted run after its last checkpoint) are dropped before the run recomputes
them, and TensorBoard is told to purge its events after step k, so neither holds duplicates.
A `kill -9` can leave at most a torn last line, which `read_metrics` skips and the resume drops;
`config.json` and the truncated `metrics.jsonl` are replaced atomically (write, then rename).

Axis letters: L layers, E experts.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


def _import_summary_writer() -> type:
    """tensorboardX's `SummaryWriter`, imported without torch. tensorboardX imports torch when
    it is installed (seconds, at every start of a run, a restart after preemption included) only
    to accept torch tensors; moejax logs Python floats."""
    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError while tensorboardX loads
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


SummaryWriter = _import_summary_writer()

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a `metrics.jsonl`, skipping a torn last line left by a killed process.

    Args:
      path: the file (a workdir is accepted too).

    Returns:
      the records in file order; `[]` if the file does not exist.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_metrics(path: str | Path, *, last_step: int) -> None:
    """Keeps only the records with `step <= last_step` (atomically rewrites the file).

    Args:
      path: the `metrics.jsonl` file; nothing happens if it does not exist.
      last_step: the step the run resumes from (0 for a fresh start).
    """
    path = Path(path)
    if not path.exists():
        return
    kept = [r for r in read_metrics(path) if r.get("step", math.inf) <= last_step]
    _write_atomically(path, "".join(json.dumps(r) + "\n" for r in kept))


def _write_atomically(path: Path, text: str) -> None:
    """Replaces `path` by `text` all at once: a kill leaves the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_summary(load: np.ndarray) -> dict[str, float]:
    """Balance summary of per-layer expert loads.

    Args:
      load: `[L, E]` (or `[E]`) share of assignments per expert, each row summing to 1.

    Returns:
      `load_cv` (std / mean over experts) and `load_max_vio` (max / mean − 1), averaged over L.
    """
    load = np.asarray(load, np.float64).reshape(-1, np.shape(load)[-1])
    mean = np.maximum(load.mean(axis=-1), 1e-12)
    cv = load.std(axis=-1) / mean
    max_vio = load.max(axis=-1) / mean - 1.0
    return {"load_cv": float(cv.mean()), "load_max_vio": float(max_vio.mean())}


def to_record(step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """One JSONL record from host metrics: scalars as floats, `load` as nested lists + summary.

    Args:
      step: the logged step.
      metrics: name → scalar or array (numpy or jax). Non-scalar entries other than `load` are
        left out.

    Returns:
      a JSON-able dict starting with `step`.
    """
    record: dict[str, Any] = {"step": int(step)}
    for name, value in metrics.items():
        if value is None:
            continue
        arr = np.asarray(value)
        if name == "load" and arr.ndim >= 1:
            record["load"] = np.round(arr.astype(np.float64), 6).tolist()
            record.update(load_summary(arr))
        elif arr.size == 1:
            record[name] = float(arr.reshape(()))
    return record


class Throughput:
    """Tokens per second over the steps since the last `rate()` call.

    Steps marked `warmup` (the first step of a process, which compiles) are left out unless a
    window holds nothing else.
    """

    def __init__(self):
        self._timed = [0, 0.0]
        self._warmup = [0, 0.0]

    def add(self, tokens: int, seconds: float, *, warmup: bool = False) -> None:
        """Counts one step of `tokens` tokens that took `seconds`."""
        acc = self._warmup if warmup else self._timed
        acc[0] += tokens
        acc[1] += seconds

    def rate(self) -> float:
        """Tokens/s of the window (0.0 if empty), then starts a new window."""
        tokens, seconds = self._timed if self._timed[1] > 0 else self._warmup
        self._timed, self._warmup = [0, 0.0], [0, 0.0]
        return tokens / seconds if seconds > 0 else 0.0


class MetricsWriter:
    """Writes records to `metrics.jsonl` and TensorBoard, and drives the progress bar.

    Args:
      workdir: the run's directory (created if missing).
      start_step: the step the run starts from (the restored step, 0 when fresh); records of
        later steps already in the file are dropped.
      total_steps: the run's last step (for the bar's ETA).
      enabled: write anything at all (False on processes other than 0).
      progress: show the tqdm bar.
    """

    def __init__(self, workdir: str | Path, *, start_step: int, total_steps: int,
                 enabled: bool = True, progress: bool = True):
        self.workdir = Path(workdir)
        self.path = self.workdir / METRICS_FILE
        self.enabled = enabled
        self._tb = None
        self._bar = None
        self._bar_args = dict(total=total_steps, initial=start_step) if progress else None
        if not enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        truncate_metrics(self.path, last_step=start_step)
        self._file = self.path.open("a")
        # A unique file per writer (the default name has 1 s resolution), and on resume a purge
        # of the events the interrupted run wrote after `start_step`.
        self._tb = SummaryWriter(
            str(self.workdir / TENSORBOARD_DIR),
            purge_step=start_step + 1 if start_step else None,
            filename_suffix=f".{os.getpid()}.{time.time_ns()}",
        )

    def write_config(self, config: Mapping[str, Any]) -> None:
        """Writes the run's JSON config to `workdir/config.json` and TensorBoard (as text)."""
        if not self.enabled:
            return
        text = json.dumps(config, indent=2, sort_keys=True)
        _write_atomically(self.workdir / "config.json", text + "\n")
        self._tb.add_text("config", f"```\n{text}\n```", 0)

    def progress(self, step: int, *, loss: float, tokens_per_s: float | None = None) -> None:
        """Moves the bar (made at the first call) to `step`; shows the loss (and tokens/s)."""
        if not self.enabled or self._bar_args is None:
            return
        if self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(**self._bar_args, unit="step", dynamic_ncols=True, desc="train")
        self._bar.update(step - self._bar.n)
        postfix = {"loss": f"{loss:.4f}"}
        if tokens_per_s is not None:
            postfix["tok/s"] = f"{tokens_per_s:,.0f}"
        self._bar.set_postfix(postfix, refresh=False)

    def message(self, text: str) -> None:
        """Prints a line above the bar (process 0 only)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def write(self, record: Mapping[str, Any]) -> None:
        """Appends a record (with `step`) to the JSONL file, and its scalars to TensorBoard."""
        if not self.enabled:
            return
        self._file.write(json.dumps(dict(record)) + "\n")
        self._file.flush()
        step = int(record["step"])
        for name, value in record.items():
            if name != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                group = "val" if name.startswith("val_") else "train"
                self._tb.add_scalar(f"{group}/{name}", value, step)
        self._tb.flush()

    def close(self) -> None:
        """Flushes and closes the file, TensorBoard writer and bar."""
        if not self.enabled:
            return
        self._file.close()
        self._tb.close()
        if self._bar is not None:
            self._bar.close()
        self._bar = self._bar_args = None
