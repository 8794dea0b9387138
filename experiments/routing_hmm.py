r"""Routing quality on GINC-style HMM data with known latent labels: STAR against top-k.

The claim under test (STAR paper): *STAR gives higher I(expert; latent) and balanced load
without any aux loss, at no worse loss* than a top-k router.

For each cell (data variant, recipe, router, seed) a small MoE LM (`experiments.hmm_common`:
softmax mixer, 2 layers, d = 64, 8 experts) is trained on the mixture-of-HMMs stream of
`moejax.data.hmm` and evaluated every `eval_every` steps (and at step 0) on a fixed validation
set, the same for every cell of a data variant. The routing suite of DESIGN §6 is computed per
MoE layer and averaged over layers: I(top-1 expert; latent label) in nats — the label is the flat
HMM label `concept · S + state` by default (`--label`) — normalised load entropy, CV, MaxVio,
dead experts, flip rate and validation loss.

Axes of the sweep:
  data      `overlap` (GINC: concepts share the vocabulary) and `disjoint` (each concept its own
            slice of V // C tokens, `HMMConfig.disjoint_vocab`: a control where the concept can
            be read off any token).
  recipe    `synthetic` (top-2, no aux loss, for STAR and top-k alike: the authors' synthetic
            setting) and `lm` (the authors' LM recipe, `moejax.routers.star.lm_recipe`: top-1,
            Switch loss 1e-2 on the router probabilities, no z-loss — for both routers).
  router    `topk` plus STAR per η in `--etas` (`star_eta5e-05`, ...); η = 0 is the
            frozen-random-V control `star_eta0` (the GHA step never runs; R, W_g and σ(a) still
            learn). Other baselines of `hc.ROUTERS` (aux_free, expert_choice, top_p, topk_switch)
            by `--routers`.
Every router's gate starts N(0, 0.01²) (`--gate_init=authors`, their `--init-method-std 0.01`;
`library`: std d^-1/2), AdamW with weight decay 0.01 on matrices (STAR's free R included).
STAR's options are the authors' (free R with orthogonal init, V = normalise(randn), one GHA
step before routing); `--star_quirks` adds their bf16 V and two GHA steps per forward.

Per (data, recipe) the script reports, with `experiments.stats` over seeds (paired by seed =
same init key and data order): STAR − top-k for I(expert; label) (claimed greater), load entropy
(claimed greater: "balanced") and validation loss (claimed "no worse": the claim fails only if
STAR's loss is higher with the interval excluding 0), STAR − frozen-V control for I; and whether
the better baseline's mean validation-loss curve has plateaued (`stats.plateau`, last 20 % of
the steps, 1 % relative).

Writes `WORKDIR/results.json` (`experiments.sweep.ResultsFile`, experiment "routing_hmm"; a
rerun skips finished cells and refuses other fixed settings), per-run metrics
`WORKDIR/runs/<data>_<recipe>_<router>_seed<s>/{metrics.jsonl,tensorboard/}`, and the plots
`routing_hmm.png` (curves of every (data, recipe), mean ± std over seeds),
`routing_hmm_diffs.png` (per-seed STAR − top-k differences with their 95 % intervals) and
`routing_hmm_heatmaps.png` (P(expert | label), last MoE layer, final eval, first seed).

The default (overlapping data, both recipes, top-k / STAR η = 5e-5 / frozen-V control, 5 seeds,
600 steps) takes about 28 min on a 2-core CPU; `--data=overlap,disjoint` adds the control data
(as long again). `--full` is the larger GPU setting (on a
mesh via `--mesh` and the multi-process flags of `experiments.mesh_flags`; the batch size must
divide over the mesh's data×fsdp); only process 0 writes.

  python -m experiments.routing_hmm --workdir=runs/routing_hmm
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections.abc import Sequence

import jax
import numpy as np
from absl import app, flags
from jax.sharding import Mesh
from tqdm import tqdm

from experiments import hmm_common as hc
from experiments import mesh_flags, stats
from experiments.sweep import ResultsFile, fixed_settings
from moejax.data import hmm
from moejax.train.logging import MetricsWriter, to_record
from moejax.validation import check_int

EXPERIMENT = "routing_hmm"
PLOT = "routing_hmm.png"
DIFF_PLOT = "routing_hmm_diffs.png"
HEATMAP = "routing_hmm_heatmaps.png"
CURVE_METRICS = ("val_loss", "mi", "load_entropy", "cv", "dead_experts", "flip_rate")
FINAL_METRICS = ("val_loss", "mi", "load_entropy", "cv", "max_vio", "dead_experts", "flip_rate")
DATA = ("overlap", "disjoint")
# (metric, claimed direction of STAR − baseline): higher MI, more balanced load, loss no worse.
CLAIMS = (("mi", "greater"), ("load_entropy", "greater"), ("val_loss", "less"))

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the script's flags (only when run as a script; importing stays side-effect free)."""
    flags.DEFINE_string("workdir", "runs/routing_hmm", "Output folder (results.json, PNGs, runs/).")
    flags.DEFINE_list("routers", ["topk", "star"], f"Routers among {hc.ROUTER_NAMES}.")
    flags.DEFINE_list("etas", ["5e-5", "0"], "STAR GHA step sizes (one run each; 0 = frozen V).")
    flags.DEFINE_list("recipes", list(hc.RECIPES), f"Routing recipes among {tuple(hc.RECIPES)}.")
    flags.DEFINE_list("data", ["overlap"], f"Data variants among {DATA} (the disjoint-vocabulary "
                      "control doubles the run time).")
    flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Seeds (init, data order).")
    flags.DEFINE_integer("steps", None, "Training steps per cell (default 600; --full 5000).")
    flags.DEFINE_integer("eval_every", None, "Evaluate every K steps (default 50; --full 250).")
    flags.DEFINE_enum("label", "label", list(hc.LABEL_KEYS), "Latent label for the MI.")
    flags.DEFINE_enum("gate_init", "authors", list(hc.GATE_INITS),
                      "Router gate init: N(0, 0.01²) (authors) or std d^-1/2 (library).")
    flags.DEFINE_bool("star_quirks", False, "STAR with the authors' bf16 V and 2 GHA steps.")
    flags.DEFINE_bool("full", False, "Larger setting (GPU) instead of the small CPU one.")


def _nonempty_unique(name: str, values: Sequence, valid: Sequence) -> None:
    if not values:
        raise ValueError(f"{name} must not be empty; valid: {', '.join(map(str, valid))}")
    for v in values:
        if v not in valid:
            raise ValueError(f"unknown {name} entry {v!r}; valid: {', '.join(map(str, valid))}")
    if len(set(values)) != len(values):
        raise ValueError(f"{name} must not repeat, got {tuple(values)}")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ExperimentConfig:
    """The sweep. Validated on construction.

    Attributes:
      routers: names in `hc.ROUTER_NAMES`.
      etas: STAR step sizes (≥ 0; 0 = frozen random V), one run each when "star" is in
        `routers`.
      recipes: names in `hc.RECIPES` (top-k and loss of every router, see `hc.lm_config`).
      data: variants in DATA (`overlap`: `hmm` as given; `disjoint`: with `disjoint_vocab`);
        the default runs `overlap` only.
      seeds: ≥ 1 non-negative seeds.
      model: the MoE LM (and its gate init); train: optimiser, steps and batch; hmm: the data.
      star_quirks: STAR with `v_dtype="bfloat16"`, `gha_steps=2` (the authors' runs).
      eval_every: evaluation period in steps (≥ 1); evaluations also at step 0 and the end.
      val_batches, val_batch_size: the fixed validation set (split "val", seed `val_seed`).
      label: latent label of the MI ("label" = concept·S + state, "state" or "concept").
    """

    routers: tuple[str, ...] = ("topk", "star")
    etas: tuple[float, ...] = (5e-5, 0.0)
    recipes: tuple[str, ...] = tuple(hc.RECIPES)
    data: tuple[str, ...] = ("overlap",)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    model: hc.ModelSpec = hc.ModelSpec()
    train: hc.TrainSpec = hc.TrainSpec(steps=600, lr=3e-3, warmup_steps=30)
    hmm: hmm.HMMConfig = hmm.HMMConfig()
    star_quirks: bool = False
    eval_every: int = 50
    val_batches: int = 4
    val_batch_size: int = 32
    val_seed: int = 12345
    label: str = "label"

    def __post_init__(self):
        _nonempty_unique("routers", self.routers, hc.ROUTER_NAMES)
        _nonempty_unique("recipes", self.recipes, tuple(hc.RECIPES))
        _nonempty_unique("data", self.data, DATA)
        if "star" in self.routers and not self.etas:
            raise ValueError("etas must not be empty when routers include 'star'")
        for eta in self.etas:
            hc.check_eta(eta)
        if len(set(self.etas)) != len(self.etas):
            raise ValueError(f"etas must not repeat, got {self.etas}")
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        for seed in self.seeds:
            check_int("seeds", seed, lo=0)
        if not isinstance(self.star_quirks, bool):
            raise ValueError(f"star_quirks must be a bool, got {self.star_quirks!r}")
        for name in ("eval_every", "val_batches", "val_batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if self.label not in hc.LABEL_KEYS:
            raise ValueError(f"label must be one of {hc.LABEL_KEYS}, got {self.label!r}")
        self.train.train_config(self.hmm.seq_len)  # validates steps, lr, batch size
        for data in self.data:
            self.hmm_of(data)  # validates the disjoint variant (emission_support ≤ V // C)
        for recipe in self.recipes:
            for _label, router, eta in self.variants():
                self.lm_config(router, eta, recipe)  # validates the model

    def variants(self) -> list[tuple[str, str, float | None]]:
        """`(label, router, eta)` of every run per (data, recipe, seed), e.g.
        `("star_eta5e-05", "star", 5e-5)`."""
        out = []
        for r in self.routers:
            for eta in (self.etas if r == "star" else (None,)):
                out.append((hc.router_label(r, eta), r, eta))
        return out

    def hmm_of(self, data: str) -> hmm.HMMConfig:
        """The HMM config of a data variant."""
        return dataclasses.replace(self.hmm, disjoint_vocab=data == "disjoint")

    def lm_config(self, router: str, eta: float | None, recipe: str):
        opts = dict(v_dtype="bfloat16", gha_steps=2) if self.star_quirks else None
        return hc.lm_config(router, self.model, self.hmm, eta=eta, recipe=recipe,
                            star_options=opts if router == "star" else None)

    def cells_todo(self) -> list[tuple[str, str, str, str, float | None, int]]:
        """`(data, recipe, label, router, eta, seed)` of every cell, seeds outermost."""
        return [(d, rc, label, router, eta, s) for s in self.seeds for d in self.data
                for rc in self.recipes for label, router, eta in self.variants()]

    @property
    def num_labels(self) -> int:
        return hc.num_labels(self.hmm, self.label)

    def fixed(self) -> dict:
        """Settings every cell shares (checked on resume); the sweep axes may grow."""
        return fixed_settings(self, ("routers", "etas", "seeds", "recipes", "data"))

    def check_mesh(self, mesh: Mesh | None) -> None:
        """Refuses a mesh some router's model cannot train on (the library's ValueError)."""
        hc.check_mesh(mesh, {f"{rc}/{label}": self.lm_config(router, eta, rc)
                             for rc in self.recipes for label, router, eta in self.variants()},
                      self.train, self.hmm.seq_len)


FULL = dict(**{k: v for k, v in hc.FULL_SETTING.items()}, eval_every=250, val_batches=16,
            val_batch_size=64)


def group_key(data: str, recipe: str, router: str) -> str:
    """Summary key of a (data, recipe, router label): `overlap/synthetic/topk`."""
    return f"{data}/{recipe}/{router}"


def train_cell(data: str, recipe: str, label: str, router: str, eta: float | None, seed: int,
               cfg: ExperimentConfig, val: list, workdir: str, *, progress: bool = False,
               mesh: Mesh | None = None) -> dict:
    """Trains one model on `mesh` (default one device), evaluating every `eval_every` steps;
    returns its cell."""
    lm_cfg = cfg.lm_config(router, eta, recipe)
    h = cfg.hmm_of(data)
    writer = MetricsWriter(os.path.join(workdir, "runs", f"{data}_{recipe}_{label}_seed{seed}"),
                           start_step=0, total_steps=cfg.train.steps, progress=progress,
                           enabled=mesh_flags.is_main())
    writer.write_config({"data": data, "recipe": recipe, "router": label, "seed": seed,
                         "lm": lm_cfg.to_dict(), "experiment": cfg.fixed()})
    curve: dict[str, list] = {"step": [], **{m: [] for m in CURVE_METRICS}}
    last: dict = {}
    t0 = time.perf_counter()

    def callback(step, state, m):
        if step == 0:
            last["state0"] = jax.device_get(state.model_state)  # the loop donates its state
        if step % cfg.eval_every and step != cfg.train.steps:
            return
        ev = hc.evaluate(state.params, state.model_state, lm_cfg, val, label_key=cfg.label,
                         num_labels=cfg.num_labels, prev_top1=last.get("top1"), mesh=mesh)
        last.update(ev, state=jax.device_get(state.model_state))
        curve["step"].append(step)
        for name in CURVE_METRICS:
            curve[name].append(ev[name])
        record = {f"val_{k}" if not k.startswith("val_") else k: v
                  for k, v in hc.scalars(ev).items() if k != "mi_layers"}
        if m is not None:
            record.update(loss=float(m["loss"]), ce=float(m["ce"]), aux_loss=float(m["aux_loss"]))
            writer.progress(step, loss=float(m["loss"]))
        record = {**record, **to_record(step, {"load": ev["load"]})}
        writer.write({"step": step, **{k: v for k, v in record.items() if v is not None}})

    try:
        hc.train(lm_cfg, cfg.train, h, seed, callback=callback, mesh=mesh,
                 gate_std=hc.gate_std(cfg.model))
    finally:
        writer.close()
    final = {k: last[k] for k in (*FINAL_METRICS, "mi_layers", "avg_k")}
    if router == "star":  # how far GHA moved the subspace: ‖V_end − V_init‖_F, mean over layers
        final["v_drift"] = float(np.mean([
            np.linalg.norm(np.asarray(a["router"]["v"], np.float32)
                           - np.asarray(b["router"]["v"], np.float32))
            for a, b in zip(last["state"]["blocks"], last["state0"]["blocks"], strict=True)]))
    return {"data": data, "recipe": recipe, "router": label, "seed": seed, "final": final,
            "curve": curve, "joint": last["joint"].tolist(),
            "load": np.round(last["load"], 6).tolist(), "seconds": time.perf_counter() - t0}


def _key(c: dict) -> str:
    # Cells of the previous layout (no data/recipe) read as the overlapping data, synthetic.
    return group_key(c.get("data", "overlap"), c.get("recipe", "synthetic"), c["router"])


def _by_seed(cells: Sequence[dict], metric: str) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for c in cells:
        v = c["final"].get(metric)
        if v is not None:
            out.setdefault(_key(c), {})[c["seed"]] = float(v)
    return out


def _interval(values: Sequence[float]) -> dict:
    return stats.interval(values) if len(values) else {"n": 0}


def summarize(cells: Sequence[dict]) -> dict:
    """Per group key (`data/recipe/router`): `final` (metric: `stats.interval` over seeds),
    `curve` (step, metric: mean/std), `seeds`; and `comparisons` (per data/recipe: STAR − top-k
    claims and STAR − frozen-V, `stats.compare` paired by seed) and `plateau` (per data/recipe:
    the better baseline's mean val-loss curve, `stats.plateau`)."""
    groups: dict[str, list[dict]] = {}
    for c in cells:
        groups.setdefault(_key(c), []).append(c)
    out: dict = {"groups": {}, "comparisons": {}, "plateau": {}}
    for key, cs in groups.items():
        final = {m: _interval([c["final"][m] for c in cs if c["final"].get(m) is not None])
                 for m in (*FINAL_METRICS, "v_drift")
                 if any(c["final"].get(m) is not None for c in cs)}
        steps = cs[0]["curve"]["step"]
        curve: dict = {"step": steps}
        same = [c for c in cs if c["curve"]["step"] == steps]
        for m in CURVE_METRICS:
            rows = np.array([[np.nan if v is None else v for v in c["curve"][m]] for c in same],
                            dtype=float)
            with warnings.catch_warnings():  # all-NaN columns (flip rate at step 0)
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nanmean(rows, axis=0) if rows.size else np.array([])
                std = np.nanstd(rows, axis=0) if rows.size else np.array([])
            curve[m] = {"mean": [None if np.isnan(v) else float(v) for v in mean],
                        "std": [None if np.isnan(v) else float(v) for v in std]}
        out["groups"][key] = {"final": final, "curve": curve,
                              "seeds": sorted(c["seed"] for c in cs)}
    by_metric = {m: _by_seed(cells, m) for m, _ in CLAIMS}
    pairs = sorted({tuple(k.split("/")[:2]) for k in groups})
    for data, recipe in pairs:
        prefix = f"{data}/{recipe}/"
        stars = [k for k in groups if k.startswith(prefix + "star") and k != prefix + "star_eta0"]
        comps: dict = {}
        for star_key in stars:
            name = star_key.removeprefix(prefix)
            for base in ("topk", "star_eta0"):
                if prefix + base not in groups:
                    continue
                for metric, direction in (CLAIMS if base == "topk" else (("mi", "greater"),)):
                    a, b = by_metric[metric].get(star_key, {}), by_metric[metric][prefix + base]
                    seeds = sorted(set(a) & set(b))
                    if not seeds:
                        continue
                    d = stats.compare([a[s] for s in seeds], [b[s] for s in seeds],
                                      direction=direction)
                    comps[f"{name}-{base}/{metric}"] = {
                        **d, "seeds": seeds, "values": [a[s] - b[s] for s in seeds]}
        if comps:
            out["comparisons"][f"{data}/{recipe}"] = comps
        baselines = [k for k in groups if k.startswith(prefix) and
                     not k.removeprefix(prefix).startswith("star")]
        if baselines:
            best = min(baselines, key=lambda k: out["groups"][k]["final"]["val_loss"]["mean"])
            cv = out["groups"][best]["curve"]
            p = stats.plateau(cv["step"], cv["val_loss"]["mean"], mode="min")
            out["plateau"][f"{data}/{recipe}"] = {"router": best.removeprefix(prefix), **p}
    return out


def run(cfg: ExperimentConfig, workdir: str, *, progress: bool = True,
        mesh: Mesh | None = None) -> dict:
    """Runs the missing cells into `workdir` on `mesh` (default one device); returns
    `{"cells", "summary"}` and writes plots (process 0 only).

    Raises:
      ValueError: `workdir` holds another experiment or this one with other fixed settings, or
        some model cannot train on `mesh`.
    """
    cfg.check_mesh(mesh)
    sweep = ResultsFile(workdir, EXPERIMENT, fixed=cfg.fixed())
    sweep.write()  # results.json exists before the run folders, so a rerun recognises the dir
    done = sweep.done(("data", "recipe", "router", "seed"))
    todo = [t for t in cfg.cells_todo() if (t[0], t[1], t[2], t[5]) not in done]
    vals = {d: hc.batches(cfg.hmm_of(d), split="val", seed=cfg.val_seed,
                          batch_size=cfg.val_batch_size, num_batches=cfg.val_batches)
            for d in cfg.data}
    for data, recipe, label, router, eta, seed in tqdm(
            todo, desc=EXPERIMENT, unit="run", disable=not progress or not mesh_flags.is_main()):
        cell = train_cell(data, recipe, label, router, eta, seed, cfg, vals[data], workdir,
                          mesh=mesh)
        sweep.add(cell, summary=summarize([*sweep.cells, cell]))
    labels = {v[0] for v in cfg.variants()}
    cells = [c for c in sweep.cells if c["router"] in labels and c["seed"] in cfg.seeds
             and c.get("data") in cfg.data and c.get("recipe") in cfg.recipes]
    summary = summarize(cells)
    sweep.write(summary=summarize(sweep.cells))
    if mesh_flags.is_main():
        plot_curves(summary, os.path.join(workdir, PLOT))
        plot_diffs(summary, os.path.join(workdir, DIFF_PLOT))
        plot_heatmaps(cells, os.path.join(workdir, HEATMAP), label=cfg.label)
    return {"cells": cells, "summary": summary}


_TITLES = {"val_loss": "val loss (nats/token)", "mi": "I(top-1 expert; label) (nats)",
           "load_entropy": "normalised load entropy"}


def plot_curves(summary: dict, path: str) -> None:
    """Rows: val loss, MI, load entropy; columns: the (data, recipe) pairs; one line (mean ±
    std band over seeds) per router."""
    from matplotlib.figure import Figure

    pairs = sorted({"/".join(k.split("/")[:2]) for k in summary["groups"]})
    cols = max(len(pairs), 1)
    fig = Figure(figsize=(4.2 * cols, 9), layout="constrained")
    axes = fig.subplots(3, cols, squeeze=False)
    for j, pair in enumerate(pairs):
        for i, metric in enumerate(_TITLES):
            ax = axes[i, j]
            for key, s in summary["groups"].items():
                if not key.startswith(pair + "/"):
                    continue
                x = np.array(s["curve"]["step"], float)
                mean = np.array([np.nan if v is None else v for v in s["curve"][metric]["mean"]])
                std = np.array([np.nan if v is None else v for v in s["curve"][metric]["std"]])
                router = key.removeprefix(pair + "/")
                style = ":" if router == "star_eta0" else "-" if router.startswith("star") else "--"
                (line,) = ax.plot(x, mean, style, label=router, lw=1.5)
                ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15)
            if metric == "val_loss":
                finite = [v for k, s in summary["groups"].items() if k.startswith(pair + "/")
                          for v in s["curve"]["val_loss"]["mean"][1:] if v is not None]
                if finite:
                    ax.set_ylim(min(finite) - 0.02, np.percentile(finite, 90))
            ax.set_title(f"{pair}: {_TITLES[metric]}", fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        axes[0, j].legend(fontsize=8)
    fig.suptitle("Routing on HMM data (mean ± std over seeds; layer-averaged)")
    fig.savefig(path, dpi=100)


def plot_diffs(summary: dict, path: str) -> None:
    """Per comparison (STAR − baseline, metric) and (data, recipe): the per-seed differences
    (dots) and the mean with its 95 % interval (bar)."""
    from matplotlib.figure import Figure

    names = sorted({n for comps in summary["comparisons"].values() for n in comps})
    metrics = sorted({n.split("/")[-1] for n in names})
    fig = Figure(figsize=(4.5 * max(len(metrics), 1), 4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, max(len(metrics), 1), squeeze=False)).ravel()
    for ax, metric in zip(axes, metrics, strict=False):
        rows = [(f"{pair}\n{n.split('/')[0]}", d) for pair, comps in
                sorted(summary["comparisons"].items()) for n, d in comps.items()
                if n.endswith("/" + metric)]
        for y, (_, d) in enumerate(rows):
            half = d["half"] if np.isfinite(d["half"]) else 0.0
            ax.errorbar(d["mean"], y, xerr=half, fmt="o", color="k", capsize=3)
            diffs = d.get("values")
            if diffs:
                ax.plot(diffs, [y] * len(diffs), ".", alpha=0.5)
        ax.axvline(0.0, color="r", lw=0.8)
        ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=6)
        ax.set_title(f"Δ {metric} (mean ± 95 % CI)", fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle("STAR − baseline, paired by seed")
    fig.savefig(path, dpi=100)


def plot_heatmaps(cells: Sequence[dict], path: str, *, label: str = "label") -> None:
    """P(expert | latent label) of the last MoE layer at the final eval, first seed per group."""
    from matplotlib.figure import Figure

    first: dict[str, dict] = {}
    for c in sorted(cells, key=lambda c: c["seed"]):
        first.setdefault(_key(c), c)
    n = max(len(first), 1)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig = Figure(figsize=(4.2 * cols, 2.6 * rows + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax in axes[len(first):]:
        ax.set_axis_off()
    for ax, (key, c) in zip(axes, sorted(first.items()), strict=False):
        joint = np.asarray(c["joint"], float)[-1]  # [E, num_labels], last layer
        cond = joint / np.maximum(joint.sum(axis=0, keepdims=True), 1.0)
        im = ax.imshow(cond, aspect="auto", cmap="viridis", vmin=0, vmax=1,
                       interpolation="nearest")
        ax.set_title(f"{key} (seed {c['seed']}): I = {hc.mi_nats(joint):.2f}", fontsize=8)
        ax.set_xlabel(f"latent {label}")
        ax.set_ylabel("top-1 expert")
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.suptitle("P(expert | latent label), last MoE layer, final eval")
    fig.savefig(path, dpi=100)


def config_from_flags() -> ExperimentConfig:
    base = ExperimentConfig(**FULL) if FLAGS.full else ExperimentConfig()
    over: dict = {"routers": tuple(FLAGS.routers), "etas": tuple(float(e) for e in FLAGS.etas),
                  "recipes": tuple(FLAGS.recipes), "data": tuple(FLAGS.data),
                  "seeds": tuple(int(s) for s in FLAGS.seeds), "label": FLAGS.label,
                  "star_quirks": FLAGS.star_quirks,
                  "model": dataclasses.replace(base.model, gate_init=FLAGS.gate_init)}
    if FLAGS.steps is not None:
        over["train"] = dataclasses.replace(base.train, steps=FLAGS.steps)
    if FLAGS.eval_every is not None:
        over["eval_every"] = FLAGS.eval_every
    return dataclasses.replace(base, **over)


def format_table(summary: dict) -> str:
    """Markdown tables: final metrics (mean ± 95 % interval over seeds), then the paired
    comparisons with per-seed signs and verdicts, then the baselines' plateau checks."""
    lines = ["| data / recipe / router | val loss | I(expert; label) nats | load entropy | CV "
             "| MaxVio | dead experts | v_drift |", "|" + "---|" * 8]
    for key, s in sorted(summary["groups"].items()):
        f = s["final"]
        cells = [stats.fmt(f[m]) if m in f and f[m].get("n") else "–" for m in
                 ("val_loss", "mi", "load_entropy", "cv", "max_vio", "dead_experts", "v_drift")]
        lines.append(f"| {key} (n={f['val_loss']['n']}) | " + " | ".join(cells) + " |")
    lines += ["", "| data / recipe | comparison | claimed | Δ mean ± 95 % | per-seed signs "
              "| verdict |", "|" + "---|" * 6]
    for pair, comps in sorted(summary["comparisons"].items()):
        for name, d in comps.items():
            lines.append(f"| {pair} | {name} | {d['direction']} | "
                         f"{stats.fmt(d, 4, signed=True)} | {''.join(d['signs'])} | "
                         f"{d['verdict']} |")
    lines += ["", "| data / recipe | better baseline | plateaued | last change (rel.) |",
              "|---|---|---|---|"]
    for pair, p in sorted(summary["plateau"].items()):
        lines.append(f"| {pair} | {p['router']} | {p['plateaued']} | {p['last_change']:.4f} |")
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    mesh, cfg = mesh_flags.setup_sweep(config_from_flags)  # a bad flag: UsageError, here
    t0 = time.perf_counter()
    results = run(cfg, FLAGS.workdir, mesh=mesh)
    if not mesh_flags.is_main():
        return
    print(format_table(results["summary"]))
    print(f"wrote {os.path.join(FLAGS.workdir, 'results.json')}, {PLOT}, {DIFF_PLOT}, "
          f"{HEATMAP} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    define_flags()
    app.run(main)
