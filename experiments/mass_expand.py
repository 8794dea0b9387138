r"""MASS: how many experts are enough? Fixed-K sweep vs expansion on HMM data with C concepts.

The data (`moejax.data.hmm`) is a mixture of C HMM "concepts" (default C = 8),
so the number of experts a model can use is, in principle, known. For each seed this trains a
small LM (1 softmax-attention layer, a MoE FFN) and measures the validation cross-entropy:

  (a) fixed K ∈ `ks` experts, with `topk` (k = min(top_k, K), renormalisation off, Switch + z
      losses as in DESIGN §4) and `top_p` (confidence mass p, weights not renormalised) routing:
      the loss-vs-K curve and its elbow;
  (b) `mass`: top-p routing on K_max slots of which K_init are active at the start, grown by
      `moejax.moe.expansion` (drift test on ‖∇W_fc1‖, cosine gate, clone + gradient projection +
      redundancy loss, removal of the newest clone when masking it does not raise the loss)
      as step hooks of the library loop (`expansion.mass_hooks`, `loop.fit`). Reports the
      final number of active experts K, the average number of experts per token (avg k) and
      the loss.

Elbow (stated rule): the smallest K of the grid whose mean validation loss has captured at least
`elbow_fraction` (90%) of the drop from the smallest K to the best K,
`L(K) − L_best ≤ (1 − elbow_fraction)·(L(K_min) − L_best)`; computed per router on the seed means.

Claim tested: "MASS lands near the elbow (|log2(K_MASS / K_elbow)| ≤ 0.5, i.e. within a factor
√2 of the top-k elbow) with fewer active experts per token than top-k at equal loss (MASS loss ≤
top-k loss at its elbow + the larger of the two seed stds)". The verdict and all the numbers are in
`results.json["summary"]`.

Scale: the default is small (1 softmax-attention layer, d_model 32, experts of width d_ff = 8 =
S, the states per concept, 400 steps of 16×32 tokens) and runs in minutes on a 2-core CPU. MASS
keeps the spec's T_warm = max(30, 5% of steps) and ω = max(60, 9%) but expands during the first
50% of steps, not 10%: with 400 steps the spec's phase would end at step 40, ten steps after
T_warm, and since a clone restarts the histories of source and copy, each slot could clone at
most once per phase (K at most doubles). |cos(∇W, W)| < δ = 1e-3 is the paper's gate for experts
with millions of weights, where a random direction has |cos| ~ 1e-3; ours have 3·d·f = 768
weights (random |cos| ~ 0.04), so the default δ is 0.05 (`--cos_delta`). `--full` (for a GPU)
uses a larger model and data, 5000 steps, the spec's schedule and δ = 0.01 with expansion over
the first 30% of steps.

Outputs in `--workdir`: `results.json` (`experiments.sweep.ResultsFile`, experiment
"mass_expand"; a rerun skips finished cells, other settings are refused), per-run
`runs/<router>_K<K>_seed<S>/metrics.jsonl` + TensorBoard (`MetricsWriter`), and the plots
`mass_expand_loss.png` (loss and avg k vs K, MASS marked) and `mass_expand_trajectory.png`
(active experts K and avg k over MASS training).

Scale out: --mesh and the multi-process flags of `experiments.mesh_flags` (default: one device;
the batch sizes must divide over the mesh's data×fsdp, every K over its `expert` axis); every
process trains every cell, only process 0 writes.

  python -m experiments.mass_expand --workdir=runs/mass_expand
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import shutil
import time
from collections.abc import Sequence

import jax
import numpy as np
from absl import app, flags
from jax.sharding import Mesh
from tqdm import tqdm

from experiments import mesh_flags
from experiments.sweep import ResultsFile, check_mesh, fixed_settings
from moejax.data import hmm
from moejax.models import lm
from moejax.moe import expansion as ex
from moejax.train import logging as log_lib
from moejax.train import loop
from moejax.train.steps import NO_HOOKS, StepHooks

EXPERIMENT = "mass_expand"
ROUTERS = ("topk", "top_p", "mass")
FIXED_ROUTERS = ("topk", "top_p")
PROJECTIONS = ("always", "expansion")
KEY = ("router", "num_experts", "seed")
PLOT_LOSS = "mass_expand_loss.png"
PLOT_TRAJ = "mass_expand_trajectory.png"
# Sweep axes and summary-only options: everything else must match to reuse a workdir.
NOT_FIXED = ("ks", "routers", "seeds", "elbow_fraction")

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the script's flags on the global FLAGS (only when run as a script)."""
    flags.DEFINE_string("workdir", "runs/mass_expand", "Output folder (results.json, runs/, PNG).")
    flags.DEFINE_list("ks", None, "Fixed numbers of experts K (default 2,4,8,12,16,24).")
    flags.DEFINE_list("routers", list(ROUTERS), f"Among {ROUTERS}; 'mass' = top-p + expansion.")
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (init, data order).")
    flags.DEFINE_integer("steps", None, "Training steps per run (default 300; --full: 5000).")
    flags.DEFINE_integer("k_init", None, "MASS: experts active at the start (default 2).")
    flags.DEFINE_integer("k_max", None, "MASS: expert slots (default 24).")
    flags.DEFINE_integer("num_concepts", None, "C, HMM concepts (default 8).")
    flags.DEFINE_float("cos_delta", None, "MASS δ: clone only if |cos(∇W_e, W_e)| < δ "
                       "(default 0.05; --full: 0.01).")
    flags.DEFINE_integer("warm_steps", None, "MASS T_warm (default: spec, max(30, 5% of steps)).")
    flags.DEFINE_integer("window", None, "MASS ω (default: spec, max(60, 9% of steps)).")
    flags.DEFINE_float("expand_fraction", None, "MASS: expansion during this share of the "
                       "steps (default 0.5; --full: 0.3).")
    flags.DEFINE_bool("removal", True, "MASS: remove the newest clone when masking it does not "
                      "raise the loss (patience 3).")
    flags.DEFINE_enum("projection", "always", PROJECTIONS, "MASS: project a clone source's "
                      "gradient always (library) or only during expansion (ablation).")
    flags.DEFINE_float("elbow_fraction", 0.9, "Elbow: smallest K capturing this share of the "
                       "loss drop from the smallest K to the best K.")
    flags.DEFINE_bool("full", False, "Paper-ish scale (for a GPU) instead of the small CPU one.")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ExperimentConfig:
    """The sweep. Frozen, validated on construction (errors name the field).

    Attributes:
      ks: fixed numbers of experts K (each ≥ 1) for the `topk` / `top_p` curves.
      routers: subset of ROUTERS; "mass" is one run per seed (top-p, K_init → K_max).
      seeds: ≥ 1 non-negative seeds (model init and training-data order; validation data is
        the same for every run).
      steps: optimizer steps per run.
      k_init, k_max: MASS slots active at the start / allocated (1 ≤ k_init ≤ k_max).
      num_concepts, num_states, vocab_size, emission_support, seq_len: HMM data (`HMMConfig`).
      batch_size: training sequences per step; val_batches × val_batch_size validation sequences.
      d_model, d_ff, num_layers, num_heads, head_dim, mixer: the LM (`LMConfig`); d_ff is the
        width of each expert.
      top_k: k of the `topk` router (min(top_k, K) for K < top_k).
      top_p: p of the `top_p` router and of MASS.
      lr, warmup_steps: AdamW peak learning rate and warmup (`loop.make_optimizer`).
      warm_steps, window, p_threshold, cos_delta, expand_fraction, redundancy_weight,
        removal_patience: `ExpansionConfig` of MASS (warm_steps/window None = the spec's
        max(30, 5%) / max(60, 9%)).
      removal: apply `removal_update` (needs a second forward pass per step).
      projection: "always" (the library's rule: a clone source gets only the radial part of
        its gradient for as long as its copy is active) or "expansion" (only while step <
        expand_until; an ablation, not the spec).
      log_every: steps between metrics lines (and K / avg k trajectory points).
      elbow_fraction: in (0, 1], the elbow rule above.
    """

    ks: tuple[int, ...] = (2, 4, 8, 12, 16, 24)
    routers: tuple[str, ...] = ROUTERS
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 400
    k_init: int = 2
    k_max: int = 24
    num_concepts: int = 8
    num_states: int = 8
    vocab_size: int = 64
    emission_support: int = 4
    seq_len: int = 32
    batch_size: int = 16
    val_batches: int = 8
    val_batch_size: int = 32
    d_model: int = 32
    d_ff: int = 8
    num_layers: int = 1
    num_heads: int = 2
    head_dim: int = 16
    mixer: str = "softmax"
    top_k: int = 2
    top_p: float = 0.5
    lr: float = 3e-3
    warmup_steps: int = 30
    warm_steps: int | None = None
    window: int | None = None
    p_threshold: float = 0.01
    cos_delta: float = 0.05
    expand_fraction: float = 0.5
    redundancy_weight: float = 0.01
    removal: bool = True
    removal_patience: int = 3
    projection: str = "always"
    log_every: int = 10
    elbow_fraction: float = 0.9

    def __post_init__(self):
        if not self.ks:
            raise ValueError("ks must not be empty")
        for k in self.ks:
            if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
                raise ValueError(f"ks: every K must be an int >= 1, got {k!r}")
        if len(set(self.ks)) != len(self.ks):
            raise ValueError(f"ks must not repeat values, got {self.ks}")
        unknown = [r for r in self.routers if r not in ROUTERS]
        if unknown or not self.routers:
            raise ValueError(f"routers: unknown router(s) {unknown}; choose a non-empty subset "
                             f"of {ROUTERS}, got {self.routers}")
        if not self.seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0
                                 for s in self.seeds):
            raise ValueError(f"seeds must be non-negative ints and non-empty, got {self.seeds}")
        for name in ("steps", "k_init", "k_max", "batch_size", "val_batches", "val_batch_size",
                     "top_k", "log_every", "warmup_steps"):
            value = getattr(self, name)
            lo = 0 if name == "warmup_steps" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {self.projection!r}")
        if self.k_init > self.k_max:
            raise ValueError(f"k_init={self.k_init} must be <= k_max={self.k_max}")
        if not 0 < self.elbow_fraction <= 1:
            raise ValueError(f"elbow_fraction must be in (0, 1], got {self.elbow_fraction}")
        # The sub-configs validate their own fields (and name them).
        self.hmm_config()
        self.lm_config("topk", max(self.ks))
        self.lm_config("mass", self.k_max)
        self.expansion_config()
        loop.TrainConfig(steps=self.steps, lr=self.lr, warmup_steps=self.warmup_steps)

    def fixed(self) -> dict:
        """The settings every cell of a workdir shares (checked by ResultsFile on reopening)."""
        return fixed_settings(self, NOT_FIXED)

    def check_mesh(self, mesh: Mesh | None) -> None:
        """Refuses a mesh some cell cannot train or evaluate on (the library's ValueError:
        `batch_size` or `val_batch_size` not divisible by the mesh's data×fsdp, a K not by its
        `expert` axis)."""
        tcfg = train_config(self)
        runs = [(f"{router} K={k}", lm, self.lm_config(router, k), tcfg)
                for router, k, _ in todo_cells(dataclasses.replace(self, seeds=self.seeds[:1]))]
        runs.append((f"val_batch_size={self.val_batch_size}", lm, runs[0][2],
                     tcfg.replace(batch_size=self.val_batch_size)))
        check_mesh(mesh, runs)

    def hmm_config(self) -> hmm.HMMConfig:
        return hmm.HMMConfig(num_concepts=self.num_concepts, num_states=self.num_states,
                             vocab_size=self.vocab_size, seq_len=self.seq_len,
                             emission_support=self.emission_support)

    def lm_config(self, router: str, num_experts: int) -> lm.LMConfig:
        """`topk`: k = min(top_k, K); `top_p` and `mass`: p = top_p (MASS on K_max slots)."""
        if router == "topk":
            name, top_k, kwargs = "topk", min(self.top_k, num_experts), ()
        else:
            name, top_k, kwargs = "top_p", 1, (("top_p", self.top_p),)
        return lm.LMConfig(vocab_size=self.vocab_size, d_model=self.d_model,
                           num_layers=self.num_layers, num_heads=self.num_heads,
                           head_dim=self.head_dim, mixer=self.mixer, ffn="moe", d_ff=self.d_ff,
                           moe=dict(num_experts=num_experts, top_k=top_k, router=name,
                                    router_kwargs=kwargs), max_seq_len=self.seq_len)

    def expansion_config(self, layer: int = 0) -> ex.ExpansionConfig:
        return ex.ExpansionConfig(
            total_steps=self.steps, k_init=self.k_init, k_max=self.k_max,
            warm_steps=self.warm_steps, window=self.window, p_threshold=self.p_threshold,
            cos_delta=self.cos_delta, expand_fraction=self.expand_fraction,
            redundancy_weight=self.redundancy_weight, removal_patience=self.removal_patience,
            opt_prefix=("blocks", layer, "ffn"))


FULL = dict(steps=5000, d_model=128, d_ff=128, num_layers=2, num_heads=4, head_dim=32,
            seq_len=128, batch_size=64, num_states=8, vocab_size=256, emission_support=16,
            val_batches=16, val_batch_size=64, lr=1e-3, warmup_steps=250, cos_delta=0.01,
            expand_fraction=0.3, log_every=25)


# ----------------------------------------------------------------------------- data


@functools.lru_cache(maxsize=2)
def train_batches(cfg: ExperimentConfig, seed: int) -> tuple[dict, ...]:
    """`steps` training batches (`inputs`, `targets` `<int32>[B, T]`) for `seed`."""
    ds = hmm.make_hmm_dataset(cfg.hmm_config(), split="train", seed=seed,
                              batch_size=cfg.batch_size,
                              num_examples=max(cfg.steps * cfg.batch_size, cfg.batch_size))
    return tuple({k: np.asarray(b[k]) for k in ("inputs", "targets")}
                 for b in (ds[i] for i in range(cfg.steps)))


@functools.lru_cache(maxsize=2)
def val_batches(cfg: ExperimentConfig) -> tuple[dict, ...]:
    """The validation set, the same for every run of the sweep."""
    ds = hmm.make_hmm_dataset(cfg.hmm_config(), split="val", seed=0,
                              batch_size=cfg.val_batch_size,
                              num_examples=cfg.val_batches * cfg.val_batch_size)
    return tuple({k: np.asarray(b[k]) for k in ("inputs", "targets")}
                 for b in (ds[i] for i in range(len(ds))))


# ----------------------------------------------------------------------------- steps


def train_config(cfg: ExperimentConfig) -> loop.TrainConfig:
    return loop.TrainConfig(steps=cfg.steps, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                            batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                            log_every=cfg.log_every, eval_batches=cfg.val_batches)


@functools.cache
def _eval_loss(mcfg: lm.LMConfig):
    """`(params, model_state, batch) -> loss` in eval mode: the removal test's masked loss."""
    return lambda params, model_state, batch: lm.loss_fn(params, model_state, batch, cfg=mcfg,
                                                         train=False)[0]


def hooks(mcfg: lm.LMConfig, cfg: ExperimentConfig, mass: bool) -> StepHooks:
    """MASS's step hooks (`moejax.moe.expansion.mass_hooks`), or none for a fixed-K router."""
    if not mass:
        return NO_HOOKS
    return ex.mass_hooks(_eval_loss(mcfg),
                         tuple(cfg.expansion_config(i) for i in range(mcfg.num_layers)),
                         removal=cfg.removal, projection=cfg.projection)


# ----------------------------------------------------------------------------- one run


def run_dir(workdir: str, router: str, num_experts: int, seed: int) -> str:
    return os.path.join(workdir, "runs", f"{router}_K{num_experts}_seed{seed}")


def train_cell(router: str, num_experts: int, seed: int, cfg: ExperimentConfig,
               workdir: str, *, mesh: Mesh | None = None) -> dict:
    """Trains one model (fixed K, or MASS on `num_experts` = K_max slots) on `mesh` (default
    one device); returns its cell."""
    mass = router == "mass"
    mcfg = cfg.lm_config(router, num_experts)
    tcfg, step_hooks = train_config(cfg), hooks(mcfg, cfg, mass)
    state = loop.init_state(lm, mcfg, tcfg, jax.random.key(seed), hooks=step_hooks, mesh=mesh)
    out = run_dir(workdir, router, num_experts, seed)
    main = mesh_flags.is_main()
    if main and os.path.exists(out):  # an interrupted earlier attempt of this cell
        shutil.rmtree(out)
    writer = log_lib.MetricsWriter(out, start_step=0, total_steps=cfg.steps, progress=False,
                                   enabled=main)
    writer.write_config({"router": router, "num_experts": num_experts, "seed": seed,
                         "model": mcfg.to_dict(), "experiment": cfg.fixed()})
    clone_steps: list[int] = []

    def on_step(step, state, metrics):
        if mass and metrics is not None and int(metrics["mass/cloned"]):
            clone_steps.append(step)

    t0 = time.perf_counter()
    fit = loop.fit(state, train_batches(cfg, seed), model=lm, model_cfg=mcfg, train_cfg=tcfg,
                   rng=jax.random.key(seed), hooks=step_hooks, writer=writer, callback=on_step,
                   mesh=mesh)
    state = fit.state
    train_seconds = time.perf_counter() - t0
    traj = [{"step": r["step"], "k": r["mass/n_active"] if mass else float(num_experts),
             "avg_k": r["moe/avg_k"], "loss": r["ce"]} for r in fit.records]
    val = loop.evaluate(state, val_batches(cfg), model=lm, model_cfg=mcfg, train_cfg=tcfg,
                        mesh=mesh, hooks=step_hooks)
    exp_states = state.extra.get("expansion")
    final_k = (float(np.mean([int(np.sum(e["active"])) for e in exp_states])) if mass
               else float(num_experts))
    writer.write({"step": cfg.steps, "val_loss": val["ce"], "val_avg_k": val["moe/avg_k"],
                  "active_experts": final_k})
    writer.close()
    cell = {"router": router, "num_experts": num_experts, "seed": seed, "val_loss": val["ce"],
            "val_avg_k": val["moe/avg_k"], "final_k": final_k, "train_loss": traj[-1]["loss"],
            "seconds": time.perf_counter() - t0, "train_seconds": train_seconds,
            "trajectory": traj}
    if mass:
        cell.update(k_init=cfg.k_init, clone_steps=clone_steps,
                    n_clones=int(sum(int(e["n_clones"]) for e in exp_states)),
                    n_removed=int(sum(int(e["n_removed"]) for e in exp_states)),
                    active=[np.asarray(e["active"]).astype(int).tolist() for e in exp_states])
    return cell


# ----------------------------------------------------------------------------- summary


def _stats(values: Sequence[float]) -> dict:
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "std": float(v.std()), "n": int(v.size)}


def elbow(curve: dict[int, float], fraction: float) -> int:
    """Smallest K with `L(K) − L_best ≤ (1 − fraction)·(L(K_min) − L_best)` (`curve`: K → loss)."""
    ks = sorted(curve)
    best = min(curve.values())
    drop = curve[ks[0]] - best
    return next(k for k in ks if curve[k] - best <= (1.0 - fraction) * drop + 1e-12)


def summarize(cells: Sequence[dict], cfg: ExperimentConfig) -> dict:
    """Curves (K → loss / avg k, mean ± std over seeds), elbows, MASS numbers and the verdict."""
    out: dict = {"curves": {}, "elbow": {}, "elbow_rule": (
        f"smallest K with L(K) - L_best <= {1 - cfg.elbow_fraction:.2f} * (L(K_min) - L_best), "
        "on seed means")}
    for router in FIXED_ROUTERS:
        by_k: dict[int, list[dict]] = {}
        for c in cells:
            if c["router"] == router and c["num_experts"] in cfg.ks:
                by_k.setdefault(c["num_experts"], []).append(c)
        if not by_k:
            continue
        out["curves"][router] = {
            str(k): {"val_loss": _stats([c["val_loss"] for c in cs]),
                     "avg_k": _stats([c["val_avg_k"] for c in cs])}
            for k, cs in sorted(by_k.items())}
        means = {k: float(np.mean([c["val_loss"] for c in cs])) for k, cs in by_k.items()}
        k_elbow = elbow(means, cfg.elbow_fraction)
        out["elbow"][router] = {"k": k_elbow, "loss_at_elbow": means[k_elbow],
                                "best_k": min(means, key=means.get),
                                "best_loss": min(means.values()),
                                "drop_from_k_min": means[min(means)] - min(means.values())}
    mass = [c for c in cells if c["router"] == "mass" and c["num_experts"] == cfg.k_max]
    if mass:
        out["mass"] = {"final_k": _stats([c["final_k"] for c in mass]),
                       "avg_k": _stats([c["val_avg_k"] for c in mass]),
                       "val_loss": _stats([c["val_loss"] for c in mass]),
                       "n_clones": _stats([c["n_clones"] for c in mass]),
                       "n_removed": _stats([c["n_removed"] for c in mass]),
                       "k_init": cfg.k_init, "k_max": cfg.k_max}
    if mass and "topk" in out["elbow"]:
        m, e = out["mass"], out["elbow"]["topk"]
        at = out["curves"]["topk"][str(e["k"])]
        tol = max(at["val_loss"]["std"], m["val_loss"]["std"])
        near = abs(math.log2(m["final_k"]["mean"] / e["k"])) <= 0.5
        equal_or_better = m["val_loss"]["mean"] <= at["val_loss"]["mean"] + tol
        fewer = m["avg_k"]["mean"] < at["avg_k"]["mean"]
        out["verdict"] = {
            "mass_final_k": m["final_k"]["mean"], "topk_elbow_k": e["k"],
            "near_elbow": near, "near_rule": "|log2(K_MASS / K_elbow_topk)| <= 0.5",
            "mass_loss": m["val_loss"]["mean"], "topk_loss_at_elbow": at["val_loss"]["mean"],
            "loss_tolerance": tol, "loss_equal_or_better": equal_or_better,
            "mass_avg_k": m["avg_k"]["mean"], "topk_avg_k": at["avg_k"]["mean"],
            "fewer_experts_per_token": fewer,
            "claim_holds": bool(near and equal_or_better and fewer)}
    return out


# ----------------------------------------------------------------------------- driver


def todo_cells(cfg: ExperimentConfig) -> list[tuple[str, int, int]]:
    """All (router, K, seed) cells of the sweep, seed-major (the data is built once per seed)."""
    cells = []
    for s in cfg.seeds:
        for r in cfg.routers:
            if r == "mass":
                cells.append((r, cfg.k_max, s))
            else:
                cells.extend((r, k, s) for k in cfg.ks)
    return cells


def run(cfg: ExperimentConfig, workdir: str, *, progress: bool = True,
        mesh: Mesh | None = None) -> dict:
    """Runs the missing cells into `workdir` on `mesh` (default one device); returns
    `{"cells", "summary"}` (files: process 0 only).

    Raises:
      ValueError: `workdir` holds another experiment, another setting, or foreign files; or a
        cell cannot run on `mesh`.
    """
    cfg.check_mesh(mesh)
    sweep = ResultsFile(workdir, EXPERIMENT, fixed=cfg.fixed())
    sweep.write()  # claim the folder at once, so a rerun after an interruption is accepted
    done = sweep.done(KEY)
    todo = [c for c in todo_cells(cfg) if c not in done]
    bar = tqdm(todo, desc=EXPERIMENT, unit="run", disable=not progress or not mesh_flags.is_main(),
               dynamic_ncols=True)
    for router, k, seed in bar:
        bar.set_postfix_str(f"{router} K={k} seed={seed}")
        sweep.add(train_cell(router, k, seed, cfg, workdir, mesh=mesh))
        sweep.write(summary=summarize(sweep.cells, cfg))
    summary = summarize(sweep.cells, cfg)
    sweep.write(summary=summary)
    if mesh_flags.is_main():
        plot_loss(sweep.cells, summary, os.path.join(workdir, PLOT_LOSS))
        if any(c["router"] == "mass" for c in sweep.cells):
            plot_trajectory(sweep.cells, cfg, os.path.join(workdir, PLOT_TRAJ))
    return {"cells": sweep.cells, "summary": summary}


# ----------------------------------------------------------------------------- plots


def plot_loss(cells: Sequence[dict], summary: dict, path: str) -> None:
    """Validation loss and avg k vs K per router (mean ± std), MASS's result marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_loss, ax_k = fig.subplots(1, 2)
    colors = {"topk": "C0", "top_p": "C1", "mass": "C3"}
    for router, curve in summary["curves"].items():
        ks = sorted(curve, key=int)
        x = [int(k) for k in ks]
        for ax, field in ((ax_loss, "val_loss"), (ax_k, "avg_k")):
            ax.errorbar(x, [curve[k][field]["mean"] for k in ks],
                        yerr=[curve[k][field]["std"] for k in ks], marker="o", capsize=3,
                        color=colors[router], label=f"{router} (fixed K)")
        if router in summary["elbow"]:
            ax_loss.axvline(summary["elbow"][router]["k"], color=colors[router], ls=":",
                            alpha=0.7, label=f"{router} elbow K={summary['elbow'][router]['k']}")
    if "mass" in summary:
        m = summary["mass"]
        for ax, field in ((ax_loss, "val_loss"), (ax_k, "avg_k")):
            ax.errorbar([m["final_k"]["mean"]], [m[field]["mean"]], xerr=[m["final_k"]["std"]],
                        yerr=[m[field]["std"]], marker="*", ms=14, capsize=3, ls="none",
                        color=colors["mass"],
                        label=f"MASS ({m['k_init']}→≤{m['k_max']}, final K)")
        ks_mass = [c["final_k"] for c in cells if c["router"] == "mass"]
        ax_loss.scatter(ks_mass, [c["val_loss"] for c in cells if c["router"] == "mass"],
                        marker="x", color=colors["mass"], alpha=0.5)
    ax_loss.set_xlabel("experts K (active)")
    ax_loss.set_ylabel("validation cross-entropy (nats/token)")
    ax_loss.set_title("loss vs K (mean ± std over seeds)")
    ax_k.set_xlabel("experts K (active)")
    ax_k.set_ylabel("avg experts per token (val)")
    ax_k.set_title("avg k vs K")
    for ax in (ax_loss, ax_k):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)


def plot_trajectory(cells: Sequence[dict], cfg: ExperimentConfig, path: str) -> None:
    """MASS: active experts K and avg k (train batches) over training, one line per seed."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6), layout="constrained")
    ax_k, ax_avg = fig.subplots(1, 2)
    for c in sorted((c for c in cells if c["router"] == "mass"), key=lambda c: c["seed"]):
        steps = [t["step"] for t in c["trajectory"]]
        ax_k.step(steps, [t["k"] for t in c["trajectory"]], where="post",
                  label=f"seed {c['seed']}")
        ax_avg.plot(steps, [t["avg_k"] for t in c["trajectory"]], label=f"seed {c['seed']}")
    expand_until = cfg.expansion_config().expand_until
    for ax in (ax_k, ax_avg):
        ax.axvline(expand_until, color="gray", ls=":", label="expansion ends")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax_k.set_ylabel("active experts K")
    ax_k.set_title(f"MASS: K over training (K_init={cfg.k_init}, K_max={cfg.k_max})")
    ax_avg.set_ylabel("avg experts per token (train batch)")
    ax_avg.set_title("MASS: avg k over training")
    fig.savefig(path, dpi=110)


# ----------------------------------------------------------------------------- flags


def config_from_flags() -> ExperimentConfig:
    base = dict(FULL) if FLAGS.full else {}
    over = {"routers": tuple(FLAGS.routers), "seeds": tuple(int(s) for s in FLAGS.seeds)}
    if FLAGS.ks:
        over["ks"] = tuple(int(k) for k in FLAGS.ks)
    for name in ("steps", "k_init", "k_max", "num_concepts", "cos_delta", "warm_steps", "window",
                 "expand_fraction"):
        if getattr(FLAGS, name) is not None:
            over[name] = getattr(FLAGS, name)
    over.update(elbow_fraction=FLAGS.elbow_fraction, removal=FLAGS.removal,
                projection=FLAGS.projection)
    return ExperimentConfig(**{**base, **over})


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    mesh, cfg = mesh_flags.setup_sweep(config_from_flags)  # a bad flag: UsageError, here
    t0 = time.perf_counter()
    results = run(cfg, FLAGS.workdir, mesh=mesh)
    if not mesh_flags.is_main():
        return
    s = results["summary"]
    print(f"done in {time.perf_counter() - t0:.0f} s; validation loss (mean ± std over seeds):")
    for router, curve in s["curves"].items():
        row = "  ".join(f"K={k}: {v['val_loss']['mean']:.4f}±{v['val_loss']['std']:.4f}"
                        for k, v in curve.items())
        print(f"  {router:6s} {row}   elbow K={s['elbow'][router]['k']}")
    if "mass" in s:
        m = s["mass"]
        print(f"  MASS   final K {m['final_k']['mean']:.1f}±{m['final_k']['std']:.1f}, "
              f"avg k {m['avg_k']['mean']:.2f}±{m['avg_k']['std']:.2f}, "
              f"loss {m['val_loss']['mean']:.4f}±{m['val_loss']['std']:.4f}")
    if "verdict" in s:
        print(f"  verdict: {s['verdict']}")
    print(f"wrote {os.path.join(FLAGS.workdir, 'results.json')}, {PLOT_LOSS}, {PLOT_TRAJ}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
