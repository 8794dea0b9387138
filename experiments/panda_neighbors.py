r"""PANDA vs GCN/GIN on Tree-NeighborsMatch: train-set accuracy against problem depth.

Alon & Yahav (2021) show that GNNs fail to even *fit* NeighborsMatch once the depth r makes the
target's receptive field exponentially large (over-squashing); PANDA (Choi et al., ICML 2025)
claims to keep the accuracy by widening the central nodes. For each (depth, model, seed) cell
this trains a fresh model (r + 1 layers, Adam) on the train split and reports its accuracy on
that same split, as the papers do.

PANDA expands the top-k nodes by degree with k = 2**r - 1, i.e. every non-leaf node of the tree
(internal nodes have degree 3, the target 2, the leaves 1), at `--width_factor` times the width.
Edges point to the root, so messages go low → high (lifted) and high → high only; the models are
built with `no_high_to_low=True` (checked on the host), which skips the unused top-d selection.

The default setting is small (depths 2-4, 1000 steps of 64 trees from 1024 trees per depth, r = 2)
and runs in minutes on a 2-core CPU; `--full` uses the paper-scale setting (depths 2-6, up to 32k
trees, batch 1024, 20k steps, r = 4). Writes `WORKDIR/results.json` after every cell (a rerun
skips the cells already there) and `WORKDIR/panda_neighbors.png` (mean ± std over seeds).

Scale out: --mesh and the multi-process flags of `experiments.mesh_flags` (default: one device);
the graph batches are replicated over the mesh (`gnn.MODEL.batch_spec`), FSDP shards the params;
every process trains every cell, only process 0 writes.

  python -m experiments.panda_neighbors --workdir=runs/panda
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence

import jax
import numpy as np
from absl import app, flags
from jax.sharding import Mesh
from tqdm import tqdm

from experiments import mesh_flags
from experiments.sweep import check_mesh, from_main, write_json
from moejax.data import graphs
from moejax.models import gnn
from moejax.train import loop
from moejax.train.checkpoint import check_workdir

MODELS = ("gcn", "gin", "panda_gcn", "panda_gin")
RESULTS = "results.json"
PLOT = "panda_neighbors.png"

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the script's flags on the global FLAGS; called only when run as a script, so that
    importing this module (tests) never clashes with other experiments' `--workdir`/`--steps`."""
    flags.DEFINE_string("workdir", "runs/panda_neighbors", "Output folder (results.json, PNG).")
    flags.DEFINE_list("depths", None, "Tree depths r (default 2,3,4; --full: 2..6).")
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (model init, data and batch order).")
    flags.DEFINE_integer("steps", None, "Training steps per cell (default 1000; --full: 20000).")
    flags.DEFINE_list("models", list(MODELS), f"Models among {MODELS}.")
    flags.DEFINE_bool("full", False, "Paper-scale setting instead of the small CPU one.")
    flags.DEFINE_integer("max_examples", None, "Cap on train trees per depth (default 1024; "
                         "--full: 32000).")
    flags.DEFINE_integer("hidden", 32, "d, the width of ordinary nodes.")
    flags.DEFINE_integer("width_factor", None, "r of PANDA: central nodes carry r·d "
                         "(default 2; --full: 4).")
    flags.DEFINE_float("lr", 3e-3, "Adam learning rate.")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ExperimentConfig:
    """The sweep. Validated on construction.

    Attributes:
      depths: tree depths in [2, 6].
      models: names in MODELS.
      seeds: ≥ 1 non-negative seeds.
      steps: Adam steps per cell.
      num_examples: train trees per depth, capped at `max_examples`; None = min(1000 · 2**r,
        max_examples) as in the authors' code.
      max_examples: cap on the train set.
      batch_size: trees per step (capped at the train set size).
      hidden, width_factor, lr: model and optimiser.
    """

    depths: tuple[int, ...] = (2, 3, 4)
    models: tuple[str, ...] = MODELS
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 1000
    num_examples: int | None = None
    max_examples: int = 1024
    batch_size: int = 64
    hidden: int = 32
    width_factor: int = 2
    lr: float = 3e-3

    def __post_init__(self):
        for r in self.depths:
            graphs.NeighborsMatchConfig(depth=r)
        if not self.depths:
            raise ValueError("depths must not be empty")
        unknown = [m for m in self.models if m not in MODELS]
        if unknown or not self.models:
            raise ValueError(f"models must be a non-empty subset of {MODELS}, got {self.models}")
        if not self.seeds or any(s < 0 for s in self.seeds):
            raise ValueError(f"seeds must be non-negative and non-empty, got {self.seeds}")
        for name in ("steps", "max_examples", "batch_size", "hidden", "width_factor"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

    def check_mesh(self, mesh: Mesh | None) -> None:
        """Refuses a mesh some model cannot train on (the library's ValueError)."""
        check_mesh(mesh, [(f"{m} depth={r}", gnn.MODEL, model_config(m, r, self),
                           train_config(self)) for r in self.depths for m in self.models])

    def train_size(self, depth: int) -> int:
        n = self.num_examples or 1000 * 2**depth
        return min(n, self.max_examples)


FULL = dict(depths=(2, 3, 4, 5, 6), steps=20000, max_examples=32000, batch_size=1024,
            width_factor=4)


def model_config(name: str, depth: int, cfg: ExperimentConfig) -> gnn.GNNConfig:
    task = graphs.NeighborsMatchConfig(depth=depth)
    return gnn.GNNConfig(in_features=task.num_features, num_classes=task.num_classes,
                         backbone=name.removeprefix("panda_"), hidden=cfg.hidden,
                         num_layers=depth + 1, panda=name.startswith("panda_"),
                         width_factor=cfg.width_factor, no_high_to_low=True)


def _train_set(depth: int, seed: int, cfg: ExperimentConfig) -> list[graphs.GraphBatch]:
    task = graphs.NeighborsMatchConfig(depth=depth)
    n = cfg.train_size(depth)
    bs = graphs.batches(task, seed=seed, num_examples=n, batch_size=min(cfg.batch_size, n))
    bs = [gnn.mark_central(b, k=2**depth - 1) for b in bs]
    if any(gnn.has_high_to_low(b) for b in bs):   # model_config's promise must hold
        raise RuntimeError("an edge goes from an expanded node to an ordinary one")
    return bs


def train_config(cfg: ExperimentConfig) -> loop.TrainConfig:
    """Adam at a constant learning rate (no warmup, decay, weight decay or clipping) in the
    library loop's terms."""
    return loop.TrainConfig(steps=cfg.steps, lr=cfg.lr, warmup_steps=0, min_lr_ratio=1.0,
                            weight_decay=0.0, clip_norm=None, b2=0.999,
                            batch_size=cfg.batch_size, seq_len=1, log_every=cfg.steps)


def _batch_order(data: list[graphs.GraphBatch], seed: int, steps: int):
    """`steps` batches of `data`, in epochs shuffled by `default_rng(seed)`."""
    order = np.random.default_rng(seed)
    perm = order.permutation(len(data))
    for step in range(steps):
        if step and step % len(data) == 0:
            perm = order.permutation(len(data))
        yield data[perm[step % len(data)]]


def train_cell(depth: int, model: str, seed: int, cfg: ExperimentConfig,
               data: list[graphs.GraphBatch], *, mesh: Mesh | None = None) -> dict:
    """Trains one model with the library loop (`loop.fit`; the seeds of a cell share one
    compiled step) on `mesh` (default one device); returns its final train-set accuracy and
    loss."""
    mcfg, tcfg = model_config(model, depth, cfg), train_config(cfg)
    state = loop.init_state(gnn.MODEL, mcfg, tcfg, jax.random.key(seed), mesh=mesh)
    t0 = time.perf_counter()
    fit = loop.fit(state, _batch_order(data, seed, cfg.steps), model=gnn.MODEL, model_cfg=mcfg,
                   train_cfg=tcfg, rng=jax.random.key(seed), mesh=mesh)
    ev = loop.evaluate(fit.state, data, model=gnn.MODEL, model_cfg=mcfg, train_cfg=tcfg,
                       mesh=mesh)
    return {"depth": depth, "model": model, "seed": seed, "train_acc": ev["acc"],
            "train_loss": ev["ce"], "last_batch_loss": fit.records[-1]["loss"],
            "seconds": time.perf_counter() - t0, "steps": cfg.steps,
            "train_size": len(data) * int(data[0].target.shape[0])}


def summarize(cells: Sequence[dict]) -> dict:
    """`{model: {depth: {"mean", "std", "n"}}}` of train accuracy over seeds."""
    out: dict = {}
    for c in cells:
        out.setdefault(c["model"], {}).setdefault(str(c["depth"]), []).append(c["train_acc"])
    return {m: {r: {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)}
                for r, v in sorted(d.items(), key=lambda kv: int(kv[0]))}
            for m, d in out.items()}


def _read_cells(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f).get("cells", [])


def run(cfg: ExperimentConfig, workdir: str, *, mesh: Mesh | None = None) -> dict:
    """Runs the missing cells of the sweep into `workdir` on `mesh` (default one device);
    returns the results dict (files: process 0 only)."""
    cfg.check_mesh(mesh)
    check_workdir(workdir, name="--workdir")
    main = mesh_flags.is_main()
    if main:
        os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, RESULTS)
    results = {"config": dataclasses.asdict(cfg), "cells": []}
    results["cells"] = from_main(lambda: _read_cells(path))  # process 0's, on every process
    done = {(c["depth"], c["model"], c["seed"]) for c in results["cells"]}
    todo = [(r, m, s) for r in cfg.depths for s in cfg.seeds for m in cfg.models
            if (r, m, s) not in done]
    data_key, data = None, None
    for r, m, s in tqdm(todo, desc="panda_neighbors", unit="cell", disable=not main):
        if data_key != (r, s):
            data_key, data = (r, s), _train_set(r, s, cfg)
        results["cells"].append(train_cell(r, m, s, cfg, data, mesh=mesh))
        results["summary"] = summarize(results["cells"])
        write_json(results, path)
    results["summary"] = summarize(results["cells"])
    write_json(results, path)
    if main:
        plot(results["summary"], os.path.join(workdir, PLOT))
    return results


def plot(summary: dict, path: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    for model, by_depth in summary.items():
        rs = sorted(by_depth, key=int)
        mean = np.array([by_depth[r]["mean"] for r in rs])
        std = np.array([by_depth[r]["std"] for r in rs])
        x = [int(r) for r in rs]
        ax.errorbar(x, mean, yerr=std, marker="o", capsize=3,
                    linestyle="-" if model.startswith("panda") else "--", label=model)
    ax.set_xticks(sorted({int(r) for by_depth in summary.values() for r in by_depth}))
    ax.set_xlabel("problem depth r")
    ax.set_ylabel("train accuracy (mean ± std over seeds)")
    ax.set_ylim(0, 1.05)
    ax.set_title("Tree-NeighborsMatch")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=110)


def config_from_flags() -> ExperimentConfig:
    base = ExperimentConfig(**FULL) if FLAGS.full else ExperimentConfig()
    over = {"seeds": tuple(int(s) for s in FLAGS.seeds), "models": tuple(FLAGS.models),
            "hidden": FLAGS.hidden, "lr": FLAGS.lr}
    if FLAGS.depths:
        over["depths"] = tuple(int(r) for r in FLAGS.depths)
    if FLAGS.steps is not None:
        over["steps"] = FLAGS.steps
    if FLAGS.max_examples is not None:
        over["max_examples"] = FLAGS.max_examples
    if FLAGS.width_factor is not None:
        over["width_factor"] = FLAGS.width_factor
    return dataclasses.replace(base, **over)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    mesh, cfg = mesh_flags.setup_sweep(config_from_flags)  # a bad flag: UsageError, here
    results = run(cfg, FLAGS.workdir, mesh=mesh)
    if not mesh_flags.is_main():
        return
    print("train accuracy (mean ± std over seeds):")
    for model, by_depth in results["summary"].items():
        row = "  ".join(f"r={r}: {v['mean']:.3f}±{v['std']:.3f}" for r, v in by_depth.items())
        print(f"  {model:10s} {row}")
    print(f"wrote {os.path.join(FLAGS.workdir, RESULTS)} and {PLOT}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
