r"""MASS: how many experts are enough? Fixed-K top-p sweep vs MASS expansion on HMM data.

The data (`moejax.data.hmm`) is a mixture of C HMM "concepts" (default C = 8). For each seed this
trains a small LM (1 softmax-attention layer, a MoE FFN) and measures the validation
cross-entropy:

  (a) fixed K ∈ `ks` experts with `top_p` routing (confidence mass p = 0.5, weights renormalised
      over the selected experts, no aux loss: the authors' `MASSGate` in a tutel layer with
      `normalize_gate=True`), the control: the loss-vs-K curve and its best K;
  (b) `mass`: the same router on K_max = 16 slots of which K_init = 8 are active at the start,
      grown by `moejax.moe.expansion` with the authors' rules (drift test on ‖∇W_fc1‖, cosine
      gate, clone before the optimizer step with one-off gradient alignment, redundancy loss and
      the patience/removal rule during the first 10% of steps), as step hooks of the library
      loop (`expansion.mass_hooks`, `loop.fit`);
  (c) `topk` (k = 2, Switch + z losses) is available by `--routers` as an extra control.

Each of them from two starts (`starts`): "random" (every weight random) and "upcycled" (the
authors' language setting: a dense LM with one FFN of the expert width is trained first for
`dense_steps` steps on separate data; the MoE model takes all its weights, every expert slot is a
copy of its FFN, the router is random).

Claims tested (the MASS paper, Park & Park 2025, "How Many Experts Are Enough? Towards Optimal
Semantic Specialization for MoE", psmiz/MASS: expansion from K_init finds how many experts are
needed and MASS matches or beats fixed-K MoEs), per start, paired per seed with
`experiments.stats.compare` (95% Student-t interval of the per-seed difference):

  C1 "expansion helps":      loss(MASS) < loss(fixed K = K_init)               direction "less"
  C2 "reaches the best K":   loss(MASS) < loss(fixed best K)                   direction "less"
                             ("not separated" is consistent with "reaches" but not a
                             reproduction; "opposite" means MASS is worse)
  C3 "with fewer experts":   final active K(MASS) < best fixed K               direction "less"
  C4 "fewer per token":      avg experts per token(MASS) < that of the best K  direction "less"

The best fixed K is the K of the grid with the lowest mean validation loss (same start).
Convergence: the validation loss is measured every `eval_every` steps; `stats.plateau` on the
seed-mean curve of the best fixed K (the better baseline) says whether it had stopped improving
(< 1% over the last 20% of the run); it is reported, per start, in the summary.

Scale (default: what fits in ≤ 30 min on a free 2-core CPU): d_model 32, experts of width
d_ff = 16, one layer, 5 seeds, 1500 MoE steps of 16 × 32 tokens, fixed K ∈ {8, 12, 16}. The
schedule is the authors': T_warm = max(30, 5% of steps), ω = max(60, 9%), expansion during the
first 10% of steps, p < 0.01, patience 3, redundancy weight 0.01. δ (the cosine gate, 1e-3 for the
authors' experts of 4096 × 1024 fc1 weights, where a random direction has |cos| ≈ 5e-4) is scaled
by default to the same multiple of a random direction's |cos|, δ = 1e-3·√(4096·1024 / n_fc1)
(`cos_delta=None`); `--cos_delta` sets it. `--full` (for a GPU) uses a larger model, more steps,
C = 8 and the same schedule.

Outputs in `--workdir`: `results.json` (`experiments.sweep.ResultsFile`, experiment
"mass_expand"; a rerun skips finished cells, other settings are refused), per-run
`runs/<start>_<router>_K<K>_seed<S>/metrics.jsonl` + TensorBoard (`MetricsWriter`), the dense
starts `dense/seed<S>.pkl`, and the plots `mass_expand_loss.png` (loss and avg k vs K, MASS
marked, per start), `mass_expand_trajectory.png` (MASS: active experts over training) and
`mass_expand_curves.png` (validation loss over training: the convergence check).

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
import pickle
import shutil
import time
from collections.abc import Sequence

import jax
import numpy as np
from absl import app, flags
from jax.sharding import Mesh
from tqdm import tqdm

from experiments import mesh_flags, stats
from experiments.sweep import ResultsFile, check_mesh, fixed_settings
from moejax.data import hmm
from moejax.models import lm, trees
from moejax.moe import expansion as ex
from moejax.train import logging as log_lib
from moejax.train import loop
from moejax.train.optim import make_optimizer, optimizer_settings
from moejax.train.steps import NO_HOOKS, StepHooks

EXPERIMENT = "mass_expand"
ROUTERS = ("top_p", "mass", "topk")
FIXED_ROUTERS = ("top_p", "topk")
STARTS = ("random", "upcycled")
KEY = ("start", "router", "num_experts", "seed")
PLOT_LOSS = "mass_expand_loss.png"
PLOT_TRAJ = "mass_expand_trajectory.png"
PLOT_CURVES = "mass_expand_curves.png"
# Sweep axes and summary-only options: everything else must match to reuse a workdir.
NOT_FIXED = ("ks", "routers", "seeds", "starts", "confidence")
# The authors' experts: BERT-large's FFN (4096 × 1024 fc1 weights), upcycled whole.
AUTHORS_FC1 = 4096 * 1024
AUTHORS_DELTA = 1e-3

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the script's flags on the global FLAGS (only when run as a script)."""
    flags.DEFINE_string("workdir", "runs/mass_expand", "Output folder (results.json, runs/, PNG).")
    flags.DEFINE_list("ks", None, "Fixed numbers of experts K (default 8,12,16).")
    flags.DEFINE_list("routers", ["top_p", "mass"], f"Among {ROUTERS}; 'mass' = top-p + "
                      "expansion; 'topk' an extra control.")
    flags.DEFINE_list("starts", list(STARTS), f"Among {STARTS}.")
    flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Seeds (init, data order).")
    flags.DEFINE_integer("steps", None, "MoE training steps per run (default 1500).")
    flags.DEFINE_integer("dense_steps", None, "Dense pretraining steps of the upcycled start.")
    flags.DEFINE_integer("k_init", None, "MASS: experts active at the start (default 8).")
    flags.DEFINE_integer("k_max", None, "MASS: expert slots (default 16).")
    flags.DEFINE_integer("num_concepts", None, "C, HMM concepts (default 8).")
    flags.DEFINE_float("cos_delta", None, "MASS δ: clone only if |cos(∇W_fc1, W_fc1)| < δ "
                       "(default: the authors' 1e-3 scaled to the expert size).")
    flags.DEFINE_float("p_threshold", None, "MASS drift p-value threshold (default 0.01).")
    flags.DEFINE_integer("warm_steps", None, "MASS T_warm (default: max(30, 5% of steps)).")
    flags.DEFINE_integer("window", None, "MASS ω (default: max(60, 9% of steps)).")
    flags.DEFINE_float("expand_fraction", None, "MASS: expansion during this share of the "
                       "steps (default 0.1).")
    flags.DEFINE_enum("statistic", "authors", ex.STATISTICS, "MASS drift statistic.")
    flags.DEFINE_enum("alignment", "once", ex.ALIGNMENTS, "MASS gradient alignment.")
    flags.DEFINE_enum("removal", "authors", ex.REMOVALS, "MASS removal rule.")
    flags.DEFINE_bool("renormalize", True, "top-p weights renormalised over the selection "
                      "(the authors'); False: raw probabilities (the earlier default).")
    flags.DEFINE_bool("full", False, "Paper-ish scale (for a GPU) instead of the small CPU one.")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ExperimentConfig:
    """The sweep. Frozen, validated on construction (errors name the field).

    Attributes:
      ks: fixed numbers of experts K (each ≥ 1) for the fixed-K curves.
      routers: subset of ROUTERS; "mass" is one run per seed and start (K_init → K_max).
      starts: subset of STARTS ("random", "upcycled").
      seeds: ≥ 1 non-negative seeds (model init and training-data order; validation data is
        the same for every run).
      steps: optimizer steps of each MoE run (the expansion schedule's total).
      dense_steps: steps of the dense pretraining of the upcycled start (≥ 1).
      k_init, k_max: MASS slots active at the start / allocated (1 ≤ k_init ≤ k_max).
      num_concepts, num_states, vocab_size, emission_support, seq_len: HMM data (`HMMConfig`).
      batch_size: training sequences per step; val_batches × val_batch_size validation sequences.
      d_model, d_ff, num_layers, num_heads, head_dim, mixer: the LM (`LMConfig`); d_ff is the
        width of each expert and of the dense FFN of the upcycled start.
      top_k: k of the `topk` router (min(top_k, K) for K < top_k).
      top_p: p of the `top_p` router and of MASS; renormalize: its weights renormalised.
      lr, warmup_steps: AdamW peak learning rate and warmup (`loop.make_optimizer`), for the
        dense pretraining too.
      warm_steps, window, p_threshold, cos_delta, expand_fraction, redundancy_weight,
        removal_patience, statistic, alignment, removal: `ExpansionConfig` of MASS
        (warm_steps/window None = the authors' max(30, 5%) / max(60, 9%); cos_delta None = the
        authors' δ scaled, `delta()`).
      eval_every: steps between validation-loss points (the convergence curve).
      log_every: steps between metrics lines (and K / avg k trajectory points).
      confidence: of the intervals and comparisons, in (0, 1).
    """

    ks: tuple[int, ...] = (8, 12, 16)
    routers: tuple[str, ...] = ("top_p", "mass")
    starts: tuple[str, ...] = STARTS
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    steps: int = 1500
    dense_steps: int = 1000
    k_init: int = 8
    k_max: int = 16
    num_concepts: int = 8
    num_states: int = 8
    vocab_size: int = 64
    emission_support: int = 4
    seq_len: int = 32
    batch_size: int = 16
    val_batches: int = 4
    val_batch_size: int = 64
    d_model: int = 32
    d_ff: int = 16
    num_layers: int = 1
    num_heads: int = 2
    head_dim: int = 16
    mixer: str = "softmax"
    top_k: int = 2
    top_p: float = 0.5
    renormalize: bool = True
    lr: float = 3e-3
    warmup_steps: int = 50
    warm_steps: int | None = None
    window: int | None = None
    p_threshold: float = 0.01
    cos_delta: float | None = None
    expand_fraction: float = 0.1
    redundancy_weight: float = 0.01
    removal_patience: int = 3
    statistic: str = "authors"
    alignment: str = "once"
    removal: str = "authors"
    eval_every: int = 100
    log_every: int = 25
    confidence: float = 0.95

    def __post_init__(self):
        if not self.ks:
            raise ValueError("ks must not be empty")
        for k in self.ks:
            if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
                raise ValueError(f"ks: every K must be an int >= 1, got {k!r}")
        if len(set(self.ks)) != len(self.ks):
            raise ValueError(f"ks must not repeat values, got {self.ks}")
        for name, valid in (("routers", ROUTERS), ("starts", STARTS)):
            value = getattr(self, name)
            unknown = [r for r in value if r not in valid]
            if unknown or not value or len(set(value)) != len(value):
                raise ValueError(f"{name}: choose a non-empty subset of {valid} without "
                                 f"repeats, got {value}")
        if not self.seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0
                                 for s in self.seeds):
            raise ValueError(f"seeds must be non-negative ints and non-empty, got {self.seeds}")
        for name in ("steps", "dense_steps", "k_init", "k_max", "batch_size", "val_batches",
                     "val_batch_size", "top_k", "log_every", "warmup_steps", "eval_every"):
            value = getattr(self, name)
            lo = 0 if name == "warmup_steps" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
        if self.k_init > self.k_max:
            raise ValueError(f"k_init={self.k_init} must be <= k_max={self.k_max}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        if not isinstance(self.renormalize, bool):
            raise ValueError(f"renormalize must be a bool, got {self.renormalize!r}")
        if self.cos_delta is not None and not 0 <= self.cos_delta <= 1:
            raise ValueError(f"cos_delta must be in [0, 1] or None, got {self.cos_delta}")
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
                for _, router, k, _ in todo_cells(dataclasses.replace(
                    self, seeds=self.seeds[:1], starts=("random",)))]
        runs.append((f"val_batch_size={self.val_batch_size}", lm, runs[0][2],
                     tcfg.replace(batch_size=self.val_batch_size)))
        check_mesh(mesh, runs)

    def hmm_config(self) -> hmm.HMMConfig:
        return hmm.HMMConfig(num_concepts=self.num_concepts, num_states=self.num_states,
                             vocab_size=self.vocab_size, seq_len=self.seq_len,
                             emission_support=self.emission_support)

    def lm_config(self, router: str, num_experts: int) -> lm.LMConfig:
        """`topk`: k = min(top_k, K); `top_p` and `mass`: p = top_p (MASS on K_max slots);
        `dense`: the dense LM of the upcycled start (one FFN of width d_ff)."""
        common = dict(vocab_size=self.vocab_size, d_model=self.d_model,
                      num_layers=self.num_layers, num_heads=self.num_heads,
                      head_dim=self.head_dim, mixer=self.mixer, d_ff=self.d_ff,
                      max_seq_len=self.seq_len)
        if router == "dense":
            return lm.LMConfig(**common, ffn="dense")
        if router == "topk":
            name, top_k, kwargs = "topk", min(self.top_k, num_experts), ()
        else:
            name, top_k = "top_p", 1
            kwargs = (("top_p", self.top_p), ("renormalize", self.renormalize))
        return lm.LMConfig(**common, ffn="moe", moe=dict(
            num_experts=num_experts, top_k=top_k, router=name, router_kwargs=kwargs))

    def delta(self) -> float:
        """δ of the cosine gate: `cos_delta`, or the authors' 1e-3 for 4096·1024 fc1 weights
        scaled by √(4096·1024 / n_fc1) to our n_fc1 = 2·d_model·d_ff (SwiGLU: gate + up)."""
        if self.cos_delta is not None:
            return self.cos_delta
        return min(1.0, AUTHORS_DELTA * math.sqrt(AUTHORS_FC1 / (2 * self.d_model * self.d_ff)))

    def expansion_config(self, layer: int = 0) -> ex.ExpansionConfig:
        return ex.ExpansionConfig(
            total_steps=self.steps, k_init=self.k_init, k_max=self.k_max,
            warm_steps=self.warm_steps, window=self.window, p_threshold=self.p_threshold,
            cos_delta=self.delta(), expand_fraction=self.expand_fraction,
            redundancy_weight=self.redundancy_weight, removal_patience=self.removal_patience,
            statistic=self.statistic, alignment=self.alignment, removal=self.removal,
            opt_prefix=trees.ffn_path(layer))


FULL = dict(steps=6000, dense_steps=4000, d_model=128, d_ff=128, num_layers=2, num_heads=4,
            head_dim=32, seq_len=128, batch_size=64, num_states=8, vocab_size=256,
            emission_support=16, val_batches=16, val_batch_size=64, lr=1e-3, warmup_steps=250,
            ks=(4, 8, 12, 16, 24), eval_every=250, log_every=50)


# ----------------------------------------------------------------------------- data


@functools.lru_cache(maxsize=2)
def train_batches(cfg: ExperimentConfig, seed: int, dense: bool = False) -> tuple[dict, ...]:
    """The training batches (`inputs`, `targets` `<int32>[B, T]`) for `seed`: `steps` of them
    for a MoE run, `dense_steps` from a separate stream for the dense pretraining."""
    n = cfg.dense_steps if dense else cfg.steps
    ds = hmm.make_hmm_dataset(cfg.hmm_config(), split="train",
                              seed=seed + 100_003 if dense else seed,
                              batch_size=cfg.batch_size,
                              num_examples=max(n * cfg.batch_size, cfg.batch_size))
    return tuple({k: np.asarray(b[k]) for k in ("inputs", "targets")}
                 for b in (ds[i] for i in range(n)))


@functools.lru_cache(maxsize=2)
def val_batches(cfg: ExperimentConfig) -> tuple[dict, ...]:
    """The validation set, the same for every run of the sweep."""
    ds = hmm.make_hmm_dataset(cfg.hmm_config(), split="val", seed=0,
                              batch_size=cfg.val_batch_size,
                              num_examples=cfg.val_batches * cfg.val_batch_size)
    return tuple({k: np.asarray(b[k]) for k in ("inputs", "targets")}
                 for b in (ds[i] for i in range(len(ds))))


# ----------------------------------------------------------------------------- steps


def train_config(cfg: ExperimentConfig, *, dense: bool = False) -> loop.TrainConfig:
    return loop.TrainConfig(steps=cfg.dense_steps if dense else cfg.steps, lr=cfg.lr,
                            warmup_steps=cfg.warmup_steps, batch_size=cfg.batch_size,
                            seq_len=cfg.seq_len, log_every=cfg.log_every,
                            eval_every=cfg.eval_every, eval_batches=cfg.val_batches)


@functools.cache
def _eval_loss(mcfg: lm.LMConfig):
    """`(params, model_state, batch) -> loss` in eval mode: the removal test's losses."""
    return lambda params, model_state, batch: lm.loss_fn(params, model_state, batch, cfg=mcfg,
                                                         train=False)[0]


@functools.cache
def _optimizer(opt_settings: loop.TrainConfig):
    """The loop's optimizer for these settings (its update is what `fit` applies)."""
    return make_optimizer(opt_settings)[0]


def hooks(mcfg: lm.LMConfig, cfg: ExperimentConfig, mass: bool) -> StepHooks:
    """MASS's step hooks (`moejax.moe.expansion.mass_hooks`), or none for a fixed-K router."""
    if not mass:
        return NO_HOOKS
    return ex.mass_hooks(_eval_loss(mcfg),
                         tuple(cfg.expansion_config(i) for i in range(mcfg.num_layers)),
                         _optimizer(optimizer_settings(train_config(cfg))))


# ----------------------------------------------------------------------------- one run


def run_dir(workdir: str, start: str, router: str, num_experts: int, seed: int) -> str:
    return os.path.join(workdir, "runs", f"{start}_{router}_K{num_experts}_seed{seed}")


def _val_curve(records: Sequence[dict]) -> list[dict]:
    return [{"step": r["step"], "val_loss": r["val_loss"]} for r in records if "val_loss" in r]


def dense_start(cfg: ExperimentConfig, seed: int, workdir: str, *,
                mesh: Mesh | None = None) -> dict:
    """The dense LM of the upcycled start for `seed` (trained once, kept in
    `workdir/dense/seed<S>.pkl`): `{"params", "val_loss", "val_curve", "seconds"}`."""
    path = os.path.join(workdir, "dense", f"seed{seed}.pkl")
    if os.path.exists(path):
        with open(path, "rb") as f:
            return pickle.load(f)
    t0 = time.perf_counter()
    mcfg, tcfg = cfg.lm_config("dense", 0), train_config(cfg, dense=True)
    state = loop.init_state(lm, mcfg, tcfg, jax.random.key(seed + 7919), mesh=mesh)
    fit = loop.fit(state, train_batches(cfg, seed, dense=True), model=lm, model_cfg=mcfg,
                   train_cfg=tcfg, rng=jax.random.key(seed + 7919),
                   val_data=lambda: val_batches(cfg), mesh=mesh)
    curve = _val_curve(fit.records)
    out = {"params": jax.device_get(fit.state.params), "val_loss": curve[-1]["val_loss"],
           "val_curve": curve, "seconds": time.perf_counter() - t0}
    if mesh_flags.is_main():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "wb") as f:
            pickle.dump(out, f)
        os.replace(path + ".tmp", path)
    return out


def upcycled_params(moe_params: dict, dense_params: dict, num_layers: int) -> dict:
    """The dense LM's params with every MoE layer's experts copies of its FFN (router from
    `moe_params`)."""
    params = jax.tree.map(lambda x: x, dense_params)
    for i in range(num_layers):
        params = trees.replace_ffn_params(params, i, ex.upcycle(
            trees.ffn_params(moe_params, i), trees.ffn_params(dense_params, i)))
    return params


def train_cell(start: str, router: str, num_experts: int, seed: int, cfg: ExperimentConfig,
               workdir: str, *, mesh: Mesh | None = None) -> dict:
    """Trains one model (fixed K, or MASS on `num_experts` = K_max slots) from `start` on
    `mesh` (default one device); returns its cell."""
    mass = router == "mass"
    mcfg = cfg.lm_config(router, num_experts)
    tcfg, step_hooks = train_config(cfg), hooks(mcfg, cfg, mass)
    state = loop.init_state(lm, mcfg, tcfg, jax.random.key(seed), hooks=step_hooks, mesh=mesh)
    dense = None
    if start == "upcycled":
        dense = dense_start(cfg, seed, workdir, mesh=mesh)
        params = upcycled_params(jax.device_get(state.params), dense["params"], cfg.num_layers)
        state = dataclasses.replace(state, params=jax.tree.map(
            lambda new, old: jax.device_put(np.asarray(new, old.dtype), old.sharding),
            params, state.params))
    out = run_dir(workdir, start, router, num_experts, seed)
    main = mesh_flags.is_main()
    if main and os.path.exists(out):  # an interrupted earlier attempt of this cell
        shutil.rmtree(out)
    writer = log_lib.MetricsWriter(out, start_step=0, total_steps=cfg.steps, progress=False,
                                   enabled=main)
    writer.write_config({"start": start, "router": router, "num_experts": num_experts,
                         "seed": seed, "model": mcfg.to_dict(), "experiment": cfg.fixed()})
    events: dict[str, list[int]] = {"clone": [], "removal": []}

    def on_step(step, state, metrics):
        if mass and metrics is not None:
            if int(metrics["mass/cloned"]):
                events["clone"].append(step)
            if int(metrics["mass/removed"]):
                events["removal"].append(step)

    t0 = time.perf_counter()
    fit = loop.fit(state, train_batches(cfg, seed), model=lm, model_cfg=mcfg, train_cfg=tcfg,
                   rng=jax.random.key(seed), hooks=step_hooks, writer=writer, callback=on_step,
                   val_data=lambda: val_batches(cfg), mesh=mesh)
    state = fit.state
    train_seconds = time.perf_counter() - t0
    traj = [{"step": r["step"], "k": r["mass/n_active"] if mass else float(num_experts),
             "avg_k": r["moe/avg_k"], "loss": r["ce"]} for r in fit.records if "ce" in r]
    curve = _val_curve(fit.records)
    val = loop.evaluate(state, val_batches(cfg), model=lm, model_cfg=mcfg, train_cfg=tcfg,
                        mesh=mesh, hooks=step_hooks)
    exp_states = state.extra.get("expansion")
    final_k = (float(np.mean([int(np.sum(e["active"])) for e in exp_states])) if mass
               else float(num_experts))
    writer.write({"step": cfg.steps, "final_val_loss": val["ce"], "val_avg_k": val["moe/avg_k"],
                  "active_experts": final_k})
    writer.close()
    cell = {"start": start, "router": router, "num_experts": num_experts, "seed": seed,
            "val_loss": val["ce"], "val_avg_k": val["moe/avg_k"], "final_k": final_k,
            "train_loss": traj[-1]["loss"], "seconds": time.perf_counter() - t0,
            "train_seconds": train_seconds, "trajectory": traj, "val_curve": curve}
    if dense is not None:
        cell.update(dense_val_loss=dense["val_loss"], dense_seconds=dense["seconds"])
    if mass:
        cell.update(k_init=cfg.k_init, clone_steps=events["clone"],
                    removal_steps=events["removal"],
                    n_clones=int(sum(int(e["n_clones"]) for e in exp_states)),
                    n_removed=int(sum(int(e["n_removed"]) for e in exp_states)),
                    stopped=[bool(e["stopped"]) for e in exp_states],
                    patience_left=[int(e["patience"]) for e in exp_states],
                    active=[np.asarray(e["active"]).astype(int).tolist() for e in exp_states])
    return cell


# ----------------------------------------------------------------------------- summary


def _by_seed(cells: Sequence[dict], field: str) -> dict[int, float]:
    return {c["seed"]: float(c[field]) for c in cells}


def _paired(a: dict[int, float], b: dict[int, float], direction: str, confidence: float):
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    out = stats.compare([a[s] for s in seeds], [b[s] for s in seeds], direction=direction,
                        confidence=confidence)
    return {**out, "seeds": seeds}


def summarize(cells: Sequence[dict], cfg: ExperimentConfig) -> dict:
    """Per start: fixed-K curves (mean ± interval over seeds), the best fixed K, its
    convergence (`stats.plateau` on the seed-mean validation curve), MASS's numbers and the
    paired comparisons C1–C4 of the module docstring."""
    conf = cfg.confidence
    out: dict = {"confidence": conf, "claims": {
        "C1": "loss(MASS) < loss(fixed K_init)", "C2": "loss(MASS) < loss(best fixed K)",
        "C3": "final K(MASS) < best fixed K", "C4": "avg k(MASS) < avg k(best fixed K)"},
        "delta": cfg.delta(), "starts": {}}
    for start in cfg.starts:
        sc = [c for c in cells if c.get("start", "random") == start]
        res: dict = {"curves": {}}
        for router in FIXED_ROUTERS:
            by_k: dict[int, list[dict]] = {}
            for c in sc:
                if c["router"] == router and c["num_experts"] in cfg.ks:
                    by_k.setdefault(c["num_experts"], []).append(c)
            if by_k:
                res["curves"][router] = {
                    str(k): {"val_loss": stats.interval([c["val_loss"] for c in cs], conf),
                             "avg_k": stats.interval([c["val_avg_k"] for c in cs], conf)}
                    for k, cs in sorted(by_k.items())}
        curve = res["curves"].get("top_p")
        if curve:
            best_k = int(min(curve, key=lambda k: curve[k]["val_loss"]["mean"]))
            best = [c for c in sc if c["router"] == "top_p" and c["num_experts"] == best_k]
            res["best_k"] = best_k
            res["convergence"] = _convergence(best)
            if start == "upcycled":
                dense = {c["seed"]: c["dense_val_loss"] for c in sc if "dense_val_loss" in c}
                if dense:
                    res["dense_val_loss"] = stats.interval(list(dense.values()), conf)
        mass = [c for c in sc if c["router"] == "mass" and c["num_experts"] == cfg.k_max]
        if mass:
            res["mass"] = {f: stats.interval([c[k] for c in mass], conf) for f, k in (
                ("val_loss", "val_loss"), ("final_k", "final_k"), ("avg_k", "val_avg_k"),
                ("n_clones", "n_clones"), ("n_removed", "n_removed"))}
            res["mass"]["final_k_per_seed"] = {c["seed"]: c["final_k"] for c in mass}
            res["mass"]["clone_steps_per_seed"] = {c["seed"]: c["clone_steps"] for c in mass}
        if mass and curve:
            def fixed(k, f, sc=sc):
                return _by_seed([c for c in sc if c["router"] == "top_p"
                                 and c["num_experts"] == k], f)

            m_loss, m_k, m_avg = (_by_seed(mass, f) for f in ("val_loss", "final_k",
                                                                "val_avg_k"))
            comps = {}
            if cfg.k_init in cfg.ks:
                comps["C1"] = _paired(m_loss, fixed(cfg.k_init, "val_loss"), "less", conf)
            comps["C2"] = _paired(m_loss, fixed(best_k, "val_loss"), "less", conf)
            comps["C3"] = _paired(m_k, {s: float(best_k) for s in m_k}, "less", conf)
            comps["C4"] = _paired(m_avg, fixed(best_k, "val_avg_k"), "less", conf)
            res["compare"] = {k: v for k, v in comps.items() if v is not None}
            res["near_best_k"] = abs(math.log2(res["mass"]["final_k"]["mean"] / best_k)) <= 0.5
        out["starts"][start] = res
    return out


def _convergence(best_cells: Sequence[dict]) -> dict:
    """`stats.plateau` on the seed-mean validation curve of the best fixed K, and per seed."""
    curves = [c["val_curve"] for c in best_cells if c.get("val_curve")]
    if not curves:
        return {}
    steps = [p["step"] for p in curves[0]]
    curves = [c for c in curves if [p["step"] for p in c] == steps]
    mean = np.mean([[p["val_loss"] for p in c] for c in curves], axis=0)
    out = stats.plateau(steps, mean.tolist(), mode="min")
    per_seed = [stats.plateau(steps, [p["val_loss"] for p in c], mode="min")["plateaued"]
                for c in curves]
    return {**out, "per_seed_plateaued": per_seed, "steps": steps,
            "mean_curve": mean.tolist()}


# ----------------------------------------------------------------------------- driver


def todo_cells(cfg: ExperimentConfig) -> list[tuple[str, str, int, int]]:
    """All (start, router, K, seed) cells of the sweep, seed-major (data built once per seed)."""
    cells = []
    for s in cfg.seeds:
        for start in cfg.starts:
            for r in cfg.routers:
                if r == "mass":
                    cells.append((start, r, cfg.k_max, s))
                else:
                    cells.extend((start, r, k, s) for k in cfg.ks)
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
    for start, router, k, seed in bar:
        bar.set_postfix_str(f"{start} {router} K={k} seed={seed}")
        sweep.add(train_cell(start, router, k, seed, cfg, workdir, mesh=mesh))
        sweep.write(summary=summarize(sweep.cells, cfg))
    summary = summarize(sweep.cells, cfg)
    sweep.write(summary=summary)
    if mesh_flags.is_main():
        plot_loss(sweep.cells, summary, cfg, os.path.join(workdir, PLOT_LOSS))
        if any(c["router"] == "mass" for c in sweep.cells):
            plot_trajectory(sweep.cells, cfg, os.path.join(workdir, PLOT_TRAJ))
        plot_curves(sweep.cells, cfg, os.path.join(workdir, PLOT_CURVES))
    return {"cells": sweep.cells, "summary": summary}


# ----------------------------------------------------------------------------- plots

COLORS = {"topk": "C0", "top_p": "C1", "mass": "C3"}


def plot_loss(cells: Sequence[dict], summary: dict, cfg: ExperimentConfig, path: str) -> None:
    """Validation loss and avg k vs K per start and router (mean ± interval), MASS marked."""
    from matplotlib.figure import Figure

    starts = list(summary["starts"]) or ["random"]
    fig = Figure(figsize=(10, 3.8 * len(starts)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(starts), 2))
    for row, start in zip(axes, starts, strict=True):
        ax_loss, ax_k = row
        res = summary["starts"].get(start, {})
        for router, curve in res.get("curves", {}).items():
            ks = sorted(curve, key=int)
            x = [int(k) for k in ks]
            for ax, field in ((ax_loss, "val_loss"), (ax_k, "avg_k")):
                ax.errorbar(x, [curve[k][field]["mean"] for k in ks],
                            yerr=[_finite(curve[k][field]["half"]) for k in ks], marker="o",
                            capsize=3, color=COLORS[router], label=f"{router} (fixed K)")
        if "mass" in res:
            m = res["mass"]
            for ax, field in ((ax_loss, "val_loss"), (ax_k, "avg_k")):
                ax.errorbar([m["final_k"]["mean"]], [m[field]["mean"]],
                            xerr=[_finite(m["final_k"]["half"])], yerr=[_finite(m[field]["half"])],
                            marker="*", ms=14, capsize=3, ls="none", color=COLORS["mass"],
                            label=f"MASS ({cfg.k_init}→≤{cfg.k_max}, final K)")
            mc = [c for c in cells if c["router"] == "mass" and c.get("start") == start]
            ax_loss.scatter([c["final_k"] for c in mc], [c["val_loss"] for c in mc], marker="x",
                            color=COLORS["mass"], alpha=0.5)
        ax_loss.set_xlabel("experts K (active)")
        ax_loss.set_ylabel("validation cross-entropy (nats/token)")
        ax_loss.set_title(f"{start} start: loss vs K (mean ± 95% interval)")
        ax_k.set_xlabel("experts K (active)")
        ax_k.set_ylabel("avg experts per token (val)")
        ax_k.set_title(f"{start} start: avg k vs K")
        for ax in row:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)


def _finite(x: float) -> float:
    return x if math.isfinite(x) else 0.0


def plot_trajectory(cells: Sequence[dict], cfg: ExperimentConfig, path: str) -> None:
    """MASS: active experts K over training (the expansion phase), one line per seed and
    start."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6), layout="constrained")
    ax_k, ax_avg = fig.subplots(1, 2)
    styles = {"random": "-", "upcycled": "--"}
    for c in sorted((c for c in cells if c["router"] == "mass"),
                    key=lambda c: (c.get("start", ""), c["seed"])):
        steps = [t["step"] for t in c["trajectory"]]
        label = f"{c.get('start')} seed {c['seed']}"
        ls = styles.get(c.get("start"), "-")
        ax_k.step(steps, [t["k"] for t in c["trajectory"]], where="post", ls=ls, label=label)
        ax_avg.plot(steps, [t["avg_k"] for t in c["trajectory"]], ls=ls, label=label)
    expand_until = cfg.expansion_config().expand_until
    for ax in (ax_k, ax_avg):
        ax.axvline(expand_until, color="gray", ls=":", label="expansion ends")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    ax_k.set_ylabel("active experts K")
    ax_k.set_title(f"MASS: K over training (K_init={cfg.k_init}, K_max={cfg.k_max})")
    ax_avg.set_ylabel("avg experts per token (train batch)")
    ax_avg.set_title("MASS: avg k over training")
    fig.savefig(path, dpi=110)


def plot_curves(cells: Sequence[dict], cfg: ExperimentConfig, path: str) -> None:
    """Validation loss over training, seed mean per (start, router, K): the convergence check."""
    from matplotlib.figure import Figure

    starts = [s for s in cfg.starts if any(c.get("start") == s for c in cells)] or ["random"]
    fig = Figure(figsize=(5 * len(starts), 3.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(starts)))
    for ax, start in zip(axes, starts, strict=True):
        groups: dict[tuple[str, int], list[list[dict]]] = {}
        for c in cells:
            if c.get("start") == start and c.get("val_curve"):
                groups.setdefault((c["router"], c["num_experts"]), []).append(c["val_curve"])
        for i, ((router, k), curves) in enumerate(sorted(groups.items())):
            steps = [p["step"] for p in curves[0]]
            same = [c for c in curves if [p["step"] for p in c] == steps]
            mean = np.mean([[p["val_loss"] for p in c] for c in same], axis=0)
            ls = ("-", "--", ":", "-.")[i % 4]
            ax.plot(steps, mean, ls=ls, color=COLORS.get(router, "C5"),
                    label=f"{router} K={k} (n={len(same)})")
        ax.set_xlabel("step")
        ax.set_ylabel("validation cross-entropy")
        ax.set_title(f"{start} start: validation loss (seed mean)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)


# ----------------------------------------------------------------------------- flags


def config_from_flags() -> ExperimentConfig:
    base = dict(FULL) if FLAGS.full else {}
    over = {"routers": tuple(FLAGS.routers), "seeds": tuple(int(s) for s in FLAGS.seeds),
            "starts": tuple(FLAGS.starts)}
    if FLAGS.ks:
        over["ks"] = tuple(int(k) for k in FLAGS.ks)
    for name in ("steps", "dense_steps", "k_init", "k_max", "num_concepts", "cos_delta",
                 "p_threshold", "warm_steps", "window", "expand_fraction"):
        if getattr(FLAGS, name) is not None:
            over[name] = getattr(FLAGS, name)
    over.update(statistic=FLAGS.statistic, alignment=FLAGS.alignment, removal=FLAGS.removal,
                renormalize=FLAGS.renormalize)
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
    print(f"done in {time.perf_counter() - t0:.0f} s; validation loss (mean ± "
          f"{cfg.confidence:.0%} interval over seeds); δ = {s['delta']:.4g}:")
    for start, res in s["starts"].items():
        print(f"[{start} start]")
        for router, curve in res["curves"].items():
            row = "  ".join(f"K={k}: {stats.fmt(v['val_loss'], 4)}" for k, v in curve.items())
            print(f"  {router:6s} {row}")
        if "convergence" in res:
            cv = res["convergence"]
            print(f"  best fixed K = {res['best_k']}: plateaued={cv.get('plateaued')} "
                  f"(last change {cv.get('last_change', float('nan')):.4f})")
        if "mass" in res:
            m = res["mass"]
            print(f"  MASS   final K {stats.fmt(m['final_k'], 2)}, avg k "
                  f"{stats.fmt(m['avg_k'], 2)}, loss {stats.fmt(m['val_loss'], 4)}")
        for name, d in res.get("compare", {}).items():
            print(f"  {name} {s['claims'][name]}: diff {stats.fmt(d, 4, signed=True)} "
                  f"signs {''.join(d['signs'])} -> {d['verdict']}")
    print(f"wrote {os.path.join(FLAGS.workdir, 'results.json')}, {PLOT_LOSS}, {PLOT_TRAJ}, "
          f"{PLOT_CURVES}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
