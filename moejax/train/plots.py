"""PNG plots of a run, drawn from its `metrics.jsonl` (so they can be redrawn at any time).

  loss_curves.png   train loss (the model's `ce` when logged, else `loss`) and `val_loss` per step
  expert_load.png   heatmap of the last logged `load` (layers × experts), MoE runs only

Uses matplotlib's object API (`Figure`, Agg canvas): no pyplot state, no display needed.

Axis letters: L layers, E experts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from moejax.train.logging import read_metrics

LOSS_PLOT = "loss_curves.png"
LOAD_PLOT = "expert_load.png"


def plot_loss_curves(records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Train and validation loss against step.

    Args:
      records: `metrics.jsonl` records (dicts with `step` and some of `ce`, `loss`, `val_loss`).
      path: the PNG to write.

    Returns:
      `path`.
    """
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    train_key = "ce" if any("ce" in r for r in records) else "loss"
    for key, label, style in ((train_key, f"train {train_key}", "-"),
                              ("val_loss", "val loss", "o-")):
        pts = [(r["step"], r[key]) for r in records if key in r]
        if pts:
            steps, values = zip(*pts, strict=True)
            ax.plot(steps, values, style, label=label, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.savefig(path, dpi=110)
    return Path(path)


def plot_expert_load(load: Any, path: str | Path, *, step: int | None = None) -> Path:
    """Heatmap of the share of assignments per expert in each layer.

    Args:
      load: `[L, E]` (or `[E]`) loads, rows summing to 1.
      path: the PNG to write.
      step: shown in the title.

    Returns:
      `path`.
    """
    load = np.asarray(load, np.float64)
    load = load.reshape(-1, load.shape[-1])
    num_layers, num_experts = load.shape
    fig = Figure(figsize=(min(3 + 0.35 * num_experts, 16), 1.5 + 0.4 * num_layers),
                 layout="constrained")
    ax = fig.add_subplot()
    # Colour is load relative to uniform (1 / E): 1 = balanced.
    im = ax.imshow(load * num_experts, aspect="auto", cmap="viridis", vmin=0.0)
    fig.colorbar(im, ax=ax, label="load × E (1 = uniform)")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(num_layers))
    title = "expert load" + (f" at step {step}" if step is not None else "")
    ax.set_title(title)
    fig.savefig(path, dpi=110)
    return Path(path)


def write_plots(workdir: str | Path) -> list[Path]:
    """Draws every plot the run's metrics support into `workdir`.

    Args:
      workdir: the run's directory (holding `metrics.jsonl`).

    Returns:
      the PNG paths written (none if there are no metrics yet).
    """
    workdir = Path(workdir)
    records = read_metrics(workdir)
    if not records:
        return []
    paths = [plot_loss_curves(records, workdir / LOSS_PLOT)]
    with_load = [r for r in records if "load" in r]
    if with_load:
        last = with_load[-1]
        paths.append(plot_expert_load(last["load"], workdir / LOAD_PLOT, step=last["step"]))
    return paths
