r"""Routing quality on GINC-style HMM data with known latent labels.

For each (router, seed) cell a small MoE LM (`experiments.hmm_common.ModelSpec`: softmax mixer,
2 layers, d = 64, 8 experts, top-2) is trained on the mixture-of-HMMs stream of
`moejax.data.hmm` and evaluated every `eval_every` steps (and at step 0) on a fixed validation
set, the same for every cell. The routing suite of DESIGN §6 is computed per MoE layer and
averaged over layers: I(top-1 expert; latent label) in nats — the label is the flat HMM label
`concept · S + state` by default (`--label`), the state index alone being meaningless across
concepts — normalised load entropy, CV, dead experts, flip rate (share of validation tokens whose
top-1 expert changed since the previous evaluation) and validation loss.

Routers (`--routers`, names of `hmm_common.ROUTERS`): `topk_switch` (top-k + Switch loss 1e-2),
`topk` (no aux loss), `aux_free` (DeepSeek-V3 bias, γ = 1e-3), `expert_choice` (capacity factor
1), `top_p` (p = 0.5, no aux loss), `star` (no aux loss, one run per η in `--etas`).
For STAR the cell's `final` also holds `v_drift`, ‖V_end − V_init‖_F averaged over the MoE layers
(how far GHA moved the subspace from its random orthonormal start). The claim under test: STAR
gives higher I(expert; latent) and balanced load without any aux loss, at no worse loss.

Writes `WORKDIR/results.json` (`experiments.sweep.ResultsFile`, experiment "routing_hmm"; a
rerun skips finished cells and refuses other settings), per-run metrics
`WORKDIR/runs/<router>_seed<s>/{metrics.jsonl,tensorboard/}`, and the plots
`routing_hmm.png` (metric curves, mean ± std over seeds) and `routing_hmm_heatmaps.png`
(P(expert | label) of the last MoE layer at the final evaluation, first seed).

The default setting takes minutes on a 2-core CPU; `--full` is a larger setting for a GPU.
Scale out: --mesh and the multi-process flags of `experiments.mesh_flags` (default: one device;
the batch size must divide over the mesh's data×fsdp); only process 0 writes.

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
from experiments import mesh_flags
from experiments.sweep import ResultsFile, fixed_settings
from moejax.data import hmm
from moejax.train.logging import MetricsWriter, to_record
from moejax.validation import check_int

EXPERIMENT = "routing_hmm"
PLOT = "routing_hmm.png"
HEATMAP = "routing_hmm_heatmaps.png"
CURVE_METRICS = ("val_loss", "mi", "load_entropy", "cv", "dead_experts", "flip_rate")
FINAL_METRICS = ("val_loss", "mi", "load_entropy", "cv", "max_vio", "dead_experts", "flip_rate")

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the script's flags (only when run as a script; importing stays side-effect free)."""
    flags.DEFINE_string("workdir", "runs/routing_hmm", "Output folder (results.json, PNGs, runs/).")
    flags.DEFINE_list("routers", list(hc.ROUTER_NAMES), f"Routers among {hc.ROUTER_NAMES}.")
    flags.DEFINE_list("etas", ["2e-5", "5e-5"], "STAR GHA step sizes (one run each).")
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (init, data order).")
    flags.DEFINE_integer("steps", None, "Training steps per cell (default 300; --full 5000).")
    flags.DEFINE_integer("eval_every", None, "Evaluate every K steps (default 25; --full 250).")
    flags.DEFINE_enum("label", "label", list(hc.LABEL_KEYS), "Latent label for the MI.")
    flags.DEFINE_bool("full", False, "Larger setting (GPU) instead of the small CPU one.")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ExperimentConfig:
    """The sweep. Validated on construction.

    Attributes:
      routers: names in `hc.ROUTER_NAMES`.
      etas: STAR step sizes (> 0), one run each when "star" is in `routers`.
      seeds: ≥ 1 non-negative seeds.
      model: the MoE LM; train: optimiser, steps and batch; hmm: the data.
      eval_every: evaluation period in steps (≥ 1); evaluations also at step 0 and the end.
      val_batches, val_batch_size: the fixed validation set (split "val", seed `val_seed`).
      label: latent label of the MI ("label" = concept·S + state, "state" or "concept").
    """

    routers: tuple[str, ...] = hc.ROUTER_NAMES
    etas: tuple[float, ...] = (2e-5, 5e-5)
    seeds: tuple[int, ...] = (0, 1, 2)
    model: hc.ModelSpec = hc.ModelSpec()
    train: hc.TrainSpec = hc.TrainSpec()
    hmm: hmm.HMMConfig = hmm.HMMConfig()
    eval_every: int = 25
    val_batches: int = 4
    val_batch_size: int = 32
    val_seed: int = 12345
    label: str = "label"

    def __post_init__(self):
        if not self.routers:
            raise ValueError(f"routers must not be empty; valid routers: "
                             f"{', '.join(hc.ROUTER_NAMES)}")
        for r in self.routers:
            hc.check_router(r)
        if len(set(self.routers)) != len(self.routers):
            raise ValueError(f"routers must not repeat, got {self.routers}")
        if "star" in self.routers and not self.etas:
            raise ValueError("etas must not be empty when routers include 'star'")
        for eta in self.etas:
            hc.check_eta(eta)
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        for seed in self.seeds:
            check_int("seeds", seed, lo=0)
        for name in ("eval_every", "val_batches", "val_batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if self.label not in hc.LABEL_KEYS:
            raise ValueError(f"label must be one of {hc.LABEL_KEYS}, got {self.label!r}")
        self.train.train_config(self.hmm.seq_len)  # validates steps, lr, batch size
        for _label, router, eta in self.variants():
            hc.lm_config(router, self.model, self.hmm, eta=eta)  # validates the model

    def variants(self) -> list[tuple[str, str, float | None]]:
        """`(label, router, eta)` of every run per seed, e.g. `("star_eta5e-05", "star", 5e-5)`."""
        out = []
        for r in self.routers:
            for eta in (self.etas if r == "star" else (None,)):
                out.append((hc.router_label(r, eta), r, eta))
        return out

    @property
    def num_labels(self) -> int:
        return hc.num_labels(self.hmm, self.label)

    def fixed(self) -> dict:
        """Settings every cell shares (checked on resume); routers, etas and seeds may grow."""
        return fixed_settings(self, ("routers", "etas", "seeds"))

    def check_mesh(self, mesh: Mesh | None) -> None:
        """Refuses a mesh some router's model cannot train on (the library's ValueError)."""
        hc.check_mesh(mesh, {label: hc.lm_config(router, self.model, self.hmm, eta=eta)
                             for label, router, eta in self.variants()},
                      self.train, self.hmm.seq_len)


FULL = dict(**hc.FULL_SETTING, eval_every=250, val_batches=16, val_batch_size=64)


def train_cell(label: str, router: str, eta: float | None, seed: int, cfg: ExperimentConfig,
               val: list, workdir: str, *, progress: bool = False,
               mesh: Mesh | None = None) -> dict:
    """Trains one model on `mesh` (default one device), evaluating every `eval_every` steps;
    returns its cell."""
    lm_cfg = hc.lm_config(router, cfg.model, cfg.hmm, eta=eta)
    writer = MetricsWriter(os.path.join(workdir, "runs", f"{label}_seed{seed}"), start_step=0,
                           total_steps=cfg.train.steps, progress=progress,
                           enabled=mesh_flags.is_main())
    writer.write_config({"router": label, "seed": seed, "lm": lm_cfg.to_dict(),
                         "experiment": cfg.fixed()})
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
        hc.train(lm_cfg, cfg.train, cfg.hmm, seed, callback=callback, mesh=mesh)
    finally:
        writer.close()
    final = {k: last[k] for k in (*FINAL_METRICS, "mi_layers", "avg_k")}
    if router == "star":  # how far GHA moved the subspace: ‖V_end − V_init‖_F, mean over layers
        final["v_drift"] = float(np.mean([
            np.linalg.norm(np.asarray(a["router"]["v"]) - np.asarray(b["router"]["v"]))
            for a, b in zip(last["state"]["blocks"], last["state0"]["blocks"], strict=True)]))
    return {"router": label, "seed": seed, "final": final, "curve": curve,
            "joint": last["joint"].tolist(), "load": np.round(last["load"], 6).tolist(),
            "seconds": time.perf_counter() - t0}


def summarize(cells: Sequence[dict]) -> dict:
    """`{router: {"final": {metric: mean/std/n}, "curve": {"step", metric: {"mean", "std"}}}}`."""
    out: dict = {}
    by_router: dict[str, list[dict]] = {}
    for c in cells:
        by_router.setdefault(c["router"], []).append(c)
    for router, cs in by_router.items():
        final = {m: hc.mean_std(c["final"][m] for c in cs) for m in FINAL_METRICS}
        steps = cs[0]["curve"]["step"]
        curve: dict = {"step": steps}
        for m in CURVE_METRICS:
            rows = np.array([[np.nan if v is None else v for v in c["curve"][m]] for c in cs
                             if c["curve"]["step"] == steps], dtype=float)
            with warnings.catch_warnings():  # all-NaN columns (flip rate at step 0)
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nanmean(rows, axis=0) if rows.size else np.array([])
                std = np.nanstd(rows, axis=0) if rows.size else np.array([])
            curve[m] = {"mean": [None if np.isnan(v) else float(v) for v in mean],
                        "std": [None if np.isnan(v) else float(v) for v in std]}
        out[router] = {"final": final, "curve": curve, "seeds": sorted(c["seed"] for c in cs)}
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
    done = sweep.done(("router", "seed"))
    todo = [(v, s) for s in cfg.seeds for v in cfg.variants() if (v[0], s) not in done]
    val = hc.batches(cfg.hmm, split="val", seed=cfg.val_seed, batch_size=cfg.val_batch_size,
                     num_batches=cfg.val_batches)
    for (label, router, eta), seed in tqdm(todo, desc=EXPERIMENT, unit="run",
                                           disable=not progress or not mesh_flags.is_main()):
        cell = train_cell(label, router, eta, seed, cfg, val, workdir, mesh=mesh)
        sweep.add(cell, summary=summarize([*sweep.cells, cell]))
    labels = [v[0] for v in cfg.variants()]
    cells = [c for c in sweep.cells if c["router"] in labels and c["seed"] in cfg.seeds]
    summary = summarize(cells)
    sweep.write(summary=summarize(sweep.cells))
    if mesh_flags.is_main():
        plot_curves(summary, os.path.join(workdir, PLOT))
        plot_heatmaps(cells, os.path.join(workdir, HEATMAP), label=cfg.label)
    return {"cells": cells, "summary": summary}


_TITLES = {"val_loss": "validation loss (nats/token)", "mi": "I(top-1 expert; label) (nats)",
           "load_entropy": "normalised load entropy", "cv": "load CV",
           "dead_experts": "dead experts", "flip_rate": "flip rate vs previous eval"}


def plot_curves(summary: dict, path: str) -> None:
    """A 2×3 grid of metric curves, one line (mean ± std band over seeds) per router."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 7), layout="constrained")
    axes = fig.subplots(2, 3).ravel()
    for ax, metric in zip(axes, CURVE_METRICS, strict=True):
        for router, s in summary.items():
            x = np.array(s["curve"]["step"], float)
            mean = np.array([np.nan if v is None else v for v in s["curve"][metric]["mean"]])
            std = np.array([np.nan if v is None else v for v in s["curve"][metric]["std"]])
            style = "-" if router.startswith("star") else "--"
            (line,) = ax.plot(x, mean, style, label=router, lw=1.5)
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15)
        ax.set_title(_TITLES[metric], fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Routing on HMM data (mean ± std over seeds; layer-averaged)")
    fig.savefig(path, dpi=100)


def plot_heatmaps(cells: Sequence[dict], path: str, *, label: str = "label") -> None:
    """P(expert | latent label) of the last MoE layer at the final eval, first seed per router."""
    from matplotlib.figure import Figure

    first: dict[str, dict] = {}
    for c in sorted(cells, key=lambda c: c["seed"]):
        first.setdefault(c["router"], c)
    n = max(len(first), 1)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig = Figure(figsize=(4.2 * cols, 2.6 * rows + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax in axes[len(first):]:
        ax.set_axis_off()
    for ax, (router, c) in zip(axes, first.items(), strict=False):
        joint = np.asarray(c["joint"], float)[-1]  # [E, num_labels], last layer
        cond = joint / np.maximum(joint.sum(axis=0, keepdims=True), 1.0)
        im = ax.imshow(cond, aspect="auto", cmap="viridis", vmin=0, vmax=1,
                       interpolation="nearest")
        ax.set_title(f"{router} (seed {c['seed']}): I = {hc.mi_nats(joint):.2f} nats",
                     fontsize=9)
        ax.set_xlabel(f"latent {label}")
        ax.set_ylabel("top-1 expert")
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.suptitle("P(expert | latent label), last MoE layer, final eval")
    fig.savefig(path, dpi=100)


def config_from_flags() -> ExperimentConfig:
    base = ExperimentConfig(**FULL) if FLAGS.full else ExperimentConfig()
    over: dict = {"routers": tuple(FLAGS.routers), "etas": tuple(float(e) for e in FLAGS.etas),
                  "seeds": tuple(int(s) for s in FLAGS.seeds), "label": FLAGS.label}
    if FLAGS.steps is not None:
        over["train"] = dataclasses.replace(base.train, steps=FLAGS.steps)
    if FLAGS.eval_every is not None:
        over["eval_every"] = FLAGS.eval_every
    return dataclasses.replace(base, **over)


def format_table(summary: dict) -> str:
    """Markdown table of the final metrics (mean ± std over seeds)."""
    head = ("| router | val loss | I(expert; label) nats | load entropy | CV | dead experts "
            "| flip rate |")
    lines = [head, "|" + "---|" * 7]
    for router, s in summary.items():
        f = s["final"]
        cells = [f"{f[m]['mean']:.3f} ± {f[m]['std']:.3f}" for m in
                 ("val_loss", "mi", "load_entropy", "cv", "dead_experts", "flip_rate")]
        lines.append(f"| {router} | " + " | ".join(cells) + " |")
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
    print(f"wrote {os.path.join(FLAGS.workdir, 'results.json')}, {PLOT}, {HEATMAP} "
          f"in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    define_flags()
    app.run(main)
