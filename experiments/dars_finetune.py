r"""DARS vs full / random-channel / top-score sparse fine-tuning under a domain shift.

DARS is reconstructed from its abstract (see `moejax/finetune/dars.py`). A `tiny` byte-level LM
(dense SwiGLU FFN) is pretrained on the *source* domain — the standard library's top-level
modules (`<stdlib>/*.py`) — then fine-tuned on the *target* domain — the `email` and `xml`
packages (`<stdlib>/email/**/*.py` + `<stdlib>/xml/**/*.py`, disjoint from the source). Each cell
fine-tunes the same pretrained weights with one method:

  full     every parameter
  random   `budget` of each selected weight's output channels, uniformly at random
  top      the channels with the largest gradient projection on the source principal subspace
  dars     top (1−ρ)·m plus ρ·m random, ρ ∈ {0.1, 0.3}

at budgets {1%, 5%, 10%} (selected weights: every block's mixer and FFN input projections; all
other parameters frozen for the sparse methods). Budgets are per weight, m = max(1, round(b·C)),
so on the tiny model's small weights the realised share is larger than b (1% gives one channel
per weight, ≈ 2.5% of all channels, and ρ·m rounds to 0 so DARS equals top-score there); each
cell records `selected`, `channels` and `channel_fraction`. Reported per cell: target-domain
validation loss (nats/byte) and forgetting = source validation loss after − before fine-tuning.

Writes `WORKDIR/pretrained_<settings hash>.npz` (reused on rerun), `WORKDIR/results.json` after
every cell (a rerun skips finished cells; other non-sweep settings in the same workdir are refused)
and `WORKDIR/dars_finetune.png` (budget vs loss). The default setting runs in about 2-3 minutes on
a 2-core CPU; `--full` trains longer on more data.

Scale out: --mesh and the multi-process flags of `experiments.mesh_flags` (default: one device;
the batch size must divide over the mesh's data×fsdp); every process trains every cell, only
process 0 writes (and reads the saved pretrained weights, which it sends to the others).

  python -m experiments.dars_finetune --workdir=runs/dars
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sysconfig
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from experiments import mesh_flags
from experiments.sweep import check_mesh, from_main, write_json
from moejax.data import corpus
from moejax.finetune import dars
from moejax.models import lm
from moejax.train import loop
from moejax.train.checkpoint import check_workdir
from moejax.train.steps import device_batch

RESULTS = "results.json"
PLOT = "dars_finetune.png"
PRETRAINED = "pretrained.npz"
SOURCE_GLOBS = ("*.py",)
TARGET_GLOBS = ("email/**/*.py", "xml/**/*.py")
METHODS = ("full", "random", "top", "dars")
SWEEP_FIELDS = ("methods", "budgets", "rhos")  # may change between reruns of one workdir

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the flags on the global FLAGS (only when run as a script; see panda_neighbors)."""
    flags.DEFINE_string("workdir", "runs/dars_finetune", "Output folder.")
    flags.DEFINE_bool("full", False, "Longer runs on more data instead of the small CPU setting.")
    flags.DEFINE_list("methods", list(METHODS), f"Methods among {METHODS}.")
    flags.DEFINE_list("budgets", ["0.01", "0.05", "0.1"], "Channel budgets (fractions).")
    flags.DEFINE_list("rhos", ["0.1", "0.3"], "ρ values of DARS.")
    flags.DEFINE_integer("pretrain_steps", None, "Pretraining steps (default 1000; --full 5000).")
    flags.DEFINE_integer("finetune_steps", None, "Fine-tuning steps (default 200; --full 1000).")
    flags.DEFINE_integer("rank", 8, "r, principal subspace dimension.")
    flags.DEFINE_integer("seed", 0, "Seed (init, data, random channels).")
    flags.DEFINE_float("lr", 1e-2, "Fine-tuning peak learning rate (all methods).")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ExperimentConfig:
    """The sweep. Validated on construction (budget/ρ/rank through `DarsConfig`)."""

    methods: tuple[str, ...] = METHODS
    budgets: tuple[float, ...] = (0.01, 0.05, 0.1)
    rhos: tuple[float, ...] = (0.1, 0.3)
    pretrain_steps: int = 1000
    finetune_steps: int = 200
    pretrain_lr: float = 3e-3
    lr: float = 1e-2
    batch_size: int = 16
    seq_len: int = 64
    max_bytes: int = 2**20
    act_batches: int = 4
    grad_batches: int = 4
    eval_batches: int = 8
    rank: int = 8
    seed: int = 0

    def __post_init__(self):
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {self.methods}")
        for b in self.budgets:
            dars.DarsConfig(budget=b)
        for r in self.rhos:
            dars.DarsConfig(rho=r)
        dars.DarsConfig(rank=self.rank, seed=self.seed)
        for name in ("pretrain_steps", "finetune_steps", "batch_size", "seq_len", "max_bytes",
                     "act_batches", "grad_batches", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def check_mesh(self, mesh: Mesh | None) -> None:
        """Refuses a mesh the pretraining or fine-tuning cannot use (the library's ValueError:
        e.g. `batch_size` not divisible by the mesh's data×fsdp)."""
        check_mesh(mesh, [(what, lm, model_config(), train_config(steps, lr, self))
                          for what, steps, lr in
                          (("pretraining", self.pretrain_steps, self.pretrain_lr),
                           ("fine-tuning", self.finetune_steps, self.lr))])

    def cells(self) -> list[tuple[str, float | None, float | None]]:
        out = []
        for m in self.methods:
            if m == "full":
                out.append(("full", None, None))
            elif m == "dars":
                out += [("dars", b, r) for b in self.budgets for r in self.rhos]
            else:
                out += [(m, b, None) for b in self.budgets]
        return out


FULL = dict(pretrain_steps=5000, finetune_steps=1000, batch_size=32, seq_len=128,
            max_bytes=8 * 2**20)


def model_config() -> lm.LMConfig:
    return lm.get_preset("tiny", ffn="dense")


def _tokens(globs, split: str, max_bytes: int) -> np.ndarray:
    root = sysconfig.get_paths()["stdlib"]
    parts = [corpus.load_corpus_tokens(
        corpus.CorpusConfig(data_glob=os.path.join(root, g), max_bytes=max_bytes,
                            val_fraction=0.1), split) for g in globs]
    return np.concatenate(parts)


class Domain:
    """Random training windows and fixed validation windows of one domain (deterministic)."""

    def __init__(self, globs, cfg: ExperimentConfig):
        self.train = _tokens(globs, "train", cfg.max_bytes)
        self.val = _tokens(globs, "val", cfg.max_bytes)
        self.cfg = cfg

    def batches(self, seed: int, n: int, split: str = "train") -> list[dict]:
        toks = self.train if split == "train" else self.val
        T, B = self.cfg.seq_len, self.cfg.batch_size
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(n):
            starts = rng.integers(0, toks.size - T - 1, size=B)
            w = np.stack([toks[s:s + T + 1] for s in starts]).astype(np.int32)
            out.append({"inputs": w[:, :-1], "targets": w[:, 1:]})
        return out


def train_config(steps: int, lr: float, cfg: ExperimentConfig) -> loop.TrainConfig:
    return loop.TrainConfig(steps=steps, lr=lr, warmup_steps=max(1, steps // 10),
                            batch_size=cfg.batch_size, seq_len=cfg.seq_len, log_every=steps)


def _placed_like(tree, like):
    """Copies of `tree`'s arrays placed as `like`'s are (the loop's placement: arrays placed
    otherwise, e.g. host arrays or a fresh `lm.init`, would compile its step once more). Host
    arrays must be the same on every process."""
    def put(x, ref):
        if isinstance(x, jax.Array) and (jax.process_count() == 1 or not x.is_fully_addressable):
            return jax.device_put(x, ref.sharding, may_alias=False)
        return device_batch(x, ref.sharding)

    return jax.tree.map(put, tree, like)


def train(params, state, batches, mcfg, tcfg: loop.TrainConfig, mask=None, *,
          mesh: Mesh | None = None):
    """`params` trained for `tcfg.steps` steps on `batches` (cycled) with the library loop on
    `mesh` (default one device); `mask` (a `dars` channel mask, None = every entry) freezes the
    rest (`dars.MASK_HOOKS`: every mask and learning rate shares one compiled step)."""
    start = loop.init_state(lm, mcfg, tcfg, jax.random.key(0), hooks=dars.MASK_HOOKS, mesh=mesh)
    # Copies (fit donates its state), placed as the loop places the state.
    params, state, mask = _placed_like(
        (params, state, dars.with_mask(start, mask).extra["mask"]),
        (start.params, start.model_state, start.extra["mask"]))
    start = dars.with_mask(dataclasses.replace(start, params=params, model_state=state), mask)
    data = (batches[i % len(batches)] for i in range(tcfg.steps))
    fit = loop.fit(start, data, model=lm, model_cfg=mcfg, train_cfg=tcfg,
                   rng=jax.random.key(0), hooks=dars.MASK_HOOKS, mesh=mesh)
    return fit.state.params


def evaluate(params, state, batches, mcfg, tcfg: loop.TrainConfig, *,
             mesh: Mesh | None = None) -> float:
    ts = loop.TrainState(params=params, model_state=state, opt_state=None, step=0)
    return loop.evaluate(ts, batches, model=lm, model_cfg=mcfg, train_cfg=tcfg, mesh=mesh)["ce"]


def _host(tree):
    """`tree`'s arrays as numpy, on every process (a collective with several)."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def pretrain(cfg: ExperimentConfig, source: Domain, workdir: str, *,
             mesh: Mesh | None = None):
    """The pretrained `(params, state)`: loaded from the workdir if saved there with these
    settings (by process 0, which sends them to the others), else trained on `mesh` and saved."""
    mcfg = model_config()
    params, state = lm.init(jax.random.key(cfg.seed), mcfg)
    # The file name carries the settings, so a checkpoint of other settings is never reused.
    key = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in SWEEP_FIELDS}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    path = os.path.join(workdir, PRETRAINED.replace(".npz", f"_{digest}.npz"))
    leaves, treedef = jax.tree.flatten(params)
    if from_main(lambda: os.path.exists(path)):
        if mesh is None:
            with np.load(path) as z:
                return jax.tree.unflatten(treedef, [jnp.asarray(z[f"a{i}"])
                                                    for i in range(len(leaves))]), state
        saved = [np.zeros(np.shape(x), x.dtype) for x in leaves]
        if mesh_flags.is_main():
            with np.load(path) as z:
                saved = [z[f"a{i}"] for i in range(len(leaves))]
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            saved = multihost_utils.broadcast_one_to_all(saved)
        return _on_mesh(jax.tree.unflatten(treedef, saved), state, mcfg, cfg, mesh)
    batches = source.batches(cfg.seed, cfg.pretrain_steps)
    params = train(params, state, batches, mcfg,
                   train_config(cfg.pretrain_steps, cfg.pretrain_lr, cfg), mesh=mesh)
    host = _host(params)  # every process joins the gather; process 0 writes
    if mesh_flags.is_main():
        np.savez(path + ".tmp.npz", **{f"a{i}": np.asarray(x)
                                       for i, x in enumerate(jax.tree.leaves(host))})
        os.replace(path + ".tmp.npz", path)
    return params, (state if mesh is None else _on_mesh(params, state, mcfg, cfg, mesh)[1])


def _on_mesh(params, state, mcfg, cfg: ExperimentConfig, mesh: Mesh):
    """`(params, state)` placed on `mesh` as the loop places them."""
    like = loop.init_state(lm, mcfg, train_config(cfg.finetune_steps, cfg.lr, cfg),
                           jax.random.key(0), hooks=dars.MASK_HOOKS, mesh=mesh)
    return _placed_like((params, state), (like.params, like.model_state))


def cell_key(c: dict) -> tuple:
    return (c["method"], c["budget"], c["rho"])


def _read_json(path: str):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def run(cfg: ExperimentConfig, workdir: str, *, mesh: Mesh | None = None) -> dict:
    """Runs the missing cells into `workdir` on `mesh` (default one device); returns the
    results dict (files: process 0 only).

    Raises:
      ValueError: `workdir` holds a run with other settings, or `mesh` does not fit the batch.
    """
    cfg.check_mesh(mesh)
    check_workdir(workdir, name="--workdir")
    main = mesh_flags.is_main()
    if main:
        os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, RESULTS)
    results = {"config": dataclasses.asdict(cfg), "cells": []}
    old = from_main(lambda: _read_json(path))  # process 0's file, on every process
    if old is not None:
        stored = old.get("config", {})
        differ = [k for k, v in results["config"].items()
                  if k not in SWEEP_FIELDS and stored.get(k) != (list(v) if isinstance(v, tuple)
                                                                 else v)]
        if differ:
            raise ValueError(f"{path} holds a run with different settings {differ}; use another "
                             "--workdir")
        results = {**old, "config": results["config"]}
    done = {cell_key(c) for c in results["cells"]}
    todo = [c for c in cfg.cells() if c not in done]
    mcfg = model_config()
    source, target = Domain(SOURCE_GLOBS, cfg), Domain(TARGET_GLOBS, cfg)
    src_val = source.batches(cfg.seed + 1, cfg.eval_batches, "val")
    tgt_val = target.batches(cfg.seed + 1, cfg.eval_batches, "val")
    params, state = pretrain(cfg, source, workdir, mesh=mesh)
    ft_cfg = train_config(cfg.finetune_steps, cfg.lr, cfg)
    if "pretrained" not in results:
        results["pretrained"] = {
            "source_loss": evaluate(params, state, src_val, mcfg, ft_cfg, mesh=mesh),
            "target_loss": evaluate(params, state, tgt_val, mcfg, ft_cfg, mesh=mesh)}
    base = results["pretrained"]
    ft_batches = target.batches(cfg.seed + 2, cfg.finetune_steps)
    acts = grads = None
    if any(m in ("top", "dars") for m, _, _ in todo):
        # In-distribution (source) activations; gradients on the fine-tuning (target) data. On
        # a mesh: the batches replicated on it, the results too (readable on every process).
        rep = None if mesh is None else NamedSharding(mesh, P())
        out = {} if rep is None else {"out_shardings": rep}
        put = (lambda x: x) if rep is None else (lambda x: device_batch(x, rep))
        block_inputs = jax.jit(lambda p, s, t: dars.lm_block_inputs(p, s, t, cfg=mcfg), **out)
        acts = dars.collect_activations(
            lambda t: block_inputs(params, state, put(t)),
            [b["inputs"] for b in source.batches(cfg.seed + 3, cfg.act_batches)])
        gradf = jax.jit(jax.grad(lambda p, s, b: lm.loss_fn(p, s, b, cfg=mcfg, train=False)[0]),
                        **out)
        gs = [gradf(params, state, jax.tree.map(put, b)) for b in ft_batches[:cfg.grad_batches]]
        grads = jax.tree.map(lambda *x: np.mean(np.stack(x), axis=0), *gs)
    targets = dars.lm_targets(params)
    for method, budget, rho in tqdm(todo, desc="dars_finetune", unit="cell", disable=not main):
        t0 = time.perf_counter()
        dcfg = dars.DarsConfig(budget=budget or 1.0, rho=0.0 if rho is None else rho,
                               rank=cfg.rank, seed=cfg.seed)
        mask, info = dars.select(method, params, targets, dcfg, acts=acts, grads=grads)
        p = train(params, state, ft_batches, mcfg, ft_cfg, mask, mesh=mesh)
        src, tgt = (evaluate(p, state, src_val, mcfg, ft_cfg, mesh=mesh),
                    evaluate(p, state, tgt_val, mcfg, ft_cfg, mesh=mesh))
        results["cells"].append({
            "method": method, "budget": budget, "rho": rho, **info,
            "channel_fraction": None if info["channels"] is None
            else info["selected"] / info["channels"],
            "target_loss": tgt, "source_loss": src,
            "forgetting": src - base["source_loss"], "seconds": time.perf_counter() - t0})
        write_json(results, path)
    write_json(results, path)
    if main:
        plot(results, os.path.join(workdir, PLOT))
    return results


def _label(c: dict) -> str:
    return c["method"] if c["rho"] is None else f"dars ρ={c['rho']}"


def plot(results: dict, path: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    series: dict = {}
    for c in results["cells"]:
        series.setdefault(_label(c), []).append(c)
    for ax, key, title in ((axes[0], "target_loss", "target-domain loss (email+xml)"),
                           (axes[1], "forgetting", "forgetting: source loss increase")):
        for name, cs in series.items():
            if name == "full":
                ax.axhline(cs[0][key], color="k", linestyle="--", label="full FT")
                continue
            cs = sorted(cs, key=lambda c: c["budget"])
            ax.plot([100 * c["budget"] for c in cs], [c[key] for c in cs], marker="o",
                    label=name)
        if key == "target_loss":
            ax.axhline(results["pretrained"]["target_loss"], color="gray", linestyle=":",
                       label="pretrained")
        ax.set_xscale("log")
        ax.set_xlabel("budget (% of channels of the selected weights)")
        ax.set_ylabel("nats/byte")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=110)


def config_from_flags() -> ExperimentConfig:
    base = ExperimentConfig(**FULL) if FLAGS.full else ExperimentConfig()
    over = {"methods": tuple(FLAGS.methods), "budgets": tuple(float(b) for b in FLAGS.budgets),
            "rhos": tuple(float(r) for r in FLAGS.rhos), "rank": FLAGS.rank,
            "seed": FLAGS.seed, "lr": FLAGS.lr}
    if FLAGS.pretrain_steps is not None:
        over["pretrain_steps"] = FLAGS.pretrain_steps
    if FLAGS.finetune_steps is not None:
        over["finetune_steps"] = FLAGS.finetune_steps
    return dataclasses.replace(base, **over)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    mesh, cfg = mesh_flags.setup_sweep(config_from_flags)  # a bad flag: UsageError, here
    results = run(cfg, FLAGS.workdir, mesh=mesh)
    if not mesh_flags.is_main():
        return
    pre = results["pretrained"]
    print(f"pretrained: source {pre['source_loss']:.3f}  target {pre['target_loss']:.3f}")
    for c in results["cells"]:
        b = "-" if c["budget"] is None else f"{100 * c['budget']:g}%"
        print(f"  {_label(c):12s} budget {b:>4s}  target {c['target_loss']:.3f}  "
              f"forgetting {c['forgetting']:+.3f}  params {c['params']}")
    print(f"wrote {os.path.join(FLAGS.workdir, RESULTS)} and {PLOT}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
