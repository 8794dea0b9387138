r"""STAR test-time subspace updates under distribution shift.

Per seed, two small MoE LMs (`experiments.hmm_common`) are trained on the un-shifted HMM stream
under one routing recipe (`recipe`, `hc.RECIPES`: `synthetic` = top-2, no aux loss, the
default; `lm` = the authors' top-1 + Switch 1e-2): one routed by STAR (GHA step size `eta`, the
authors' options: gate N(0, 0.01²), free R, V = normalise(randn); `star_quirks` adds their bf16 V
and two GHA steps) and a top-k baseline (`baseline`, default `topk`, same recipe and gate init).
During training both are evaluated every `eval_every` steps on the un-shifted held-out set, so
the report can say whether the better one's loss had plateaued (`stats.plateau`). Each is then
evaluated on the emission-shifted data of `moejax.data.hmm`
(`HMMConfig.shift = λ`: same latent chains, tokens drawn from `(1 − λ)·emission + λ·alt`) for
every λ in `shifts`:

  topk_frozen          the baseline, parameters and router state frozen
  star_frozen          STAR with its trained subspace V frozen (`test_time_update=False`)
  star_tta_eta<η'>     STAR with test-time GHA updates at step size η' (one per `tta_etas`):
                       the model runs with `train=False` and `test_time_update=True` over a
                       stream of unlabelled shifted batches, so only the router state V moves
                       (one Sanger step per MoE layer per batch, before that batch is routed);
                       no parameter receives a gradient.

Reported per (variant, seed, λ): `stream` — loss and routing metrics over the adaptation stream
(online: each batch is scored right after the update it caused); `before` / `after` — the same on
a held-out shifted set with the trained V and with the V left by the stream (equal for frozen
variants); `v_shift` — ‖V_after − V_trained‖_F averaged over MoE layers. The claim under test:
test-time updates improve robustness under shift, i.e. per λ > 0 the held-out loss after the
stream is lower than frozen STAR's; `summarize` tests it with `experiments.stats.compare`
(paired by seed, 95 % interval, per-seed signs, verdict), and the same against the baseline.

Writes `WORKDIR/results.json` (`experiments.sweep.ResultsFile`, experiment "star_shift"; a rerun
skips finished cells; the training curves are stored as cells too) and `WORKDIR/star_shift.png`
(held-out loss after adaptation, its paired difference to frozen STAR with 95 % intervals, and
MI, vs λ; the training curves).

Scale out: --mesh and the multi-process flags of `experiments.mesh_flags` (default: one device;
the batch size must divide over the mesh's data×fsdp); only process 0 writes.

  python -m experiments.star_shift --workdir=runs/star_shift
"""

from __future__ import annotations

import dataclasses
import os
import time
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
from moejax.validation import check_int

EXPERIMENT = "star_shift"
PLOT = "star_shift.png"
METRICS = ("val_loss", "mi", "load_entropy", "cv", "dead_experts")

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the script's flags (only when run as a script; importing stays side-effect free)."""
    flags.DEFINE_string("workdir", "runs/star_shift", "Output folder (results.json, PNG).")
    flags.DEFINE_list("shifts", ["0.0", "0.5", "1.0"], "Emission shifts λ in [0, 1].")
    flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Seeds (init, data order).")
    flags.DEFINE_float("eta", 5e-5, "STAR's GHA step size in training.")
    flags.DEFINE_list("tta_etas", ["5e-5", "5e-4", "5e-3"], "GHA step sizes at test time.")
    flags.DEFINE_enum("baseline", "topk",
                      [r for r in hc.ROUTER_NAMES if r != "star"], "Frozen baseline router.")
    flags.DEFINE_enum("recipe", "synthetic", list(hc.RECIPES), "Routing recipe of both models.")
    flags.DEFINE_enum("gate_init", "authors", list(hc.GATE_INITS),
                      "Router gate init: N(0, 0.01²) (authors) or std d^-1/2 (library).")
    flags.DEFINE_bool("star_quirks", False, "STAR with the authors' bf16 V and 2 GHA steps.")
    flags.DEFINE_bool("disjoint", False, "Disjoint concept vocabularies (HMMConfig option).")
    flags.DEFINE_integer("steps", None, "Training steps (default 600; --full 5000).")
    flags.DEFINE_integer("stream_batches", None, "Adaptation stream length in batches "
                         "(default 32; --full 128).")
    flags.DEFINE_bool("full", False, "Larger setting (GPU) instead of the small CPU one.")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ExperimentConfig:
    """The sweep. Validated on construction.

    Attributes:
      shifts: emission shifts λ in [0, 1] (non-empty).
      seeds: ≥ 1 non-negative seeds.
      eta: STAR's training GHA step size (> 0).
      tta_etas: test-time GHA step sizes (each > 0; may be empty: frozen variants only).
      baseline: the top-k-style router name (any of `hc.ROUTER_NAMES` except "star").
      recipe: routing recipe of both models (`hc.RECIPES`).
      star_quirks: STAR with `v_dtype="bfloat16"`, `gha_steps=2` (the authors' runs).
      model, train, hmm: as in `routing_hmm` (the un-shifted training data is `hmm`).
      eval_every: period (steps) of the un-shifted held-out evaluation during training.
      stream_batches, stream_batch_size: the unlabelled adaptation stream per λ (split "test").
      heldout_batches, heldout_batch_size: the held-out shifted set per λ (split "val").
      data_seed: seed of the stream and held-out examples (the same for every cell).
      label: latent label of the MI.
    """

    shifts: tuple[float, ...] = (0.0, 0.5, 1.0)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    eta: float = 5e-5
    tta_etas: tuple[float, ...] = (5e-5, 5e-4, 5e-3)
    baseline: str = "topk"
    recipe: str = "synthetic"
    star_quirks: bool = False
    model: hc.ModelSpec = hc.ModelSpec()
    train: hc.TrainSpec = hc.TrainSpec(steps=600, lr=3e-3, warmup_steps=30)
    hmm: hmm.HMMConfig = hmm.HMMConfig()
    eval_every: int = 50
    stream_batches: int = 32
    stream_batch_size: int = 16
    heldout_batches: int = 4
    heldout_batch_size: int = 32
    data_seed: int = 4321
    label: str = "label"

    def __post_init__(self):
        if not self.shifts:
            raise ValueError("shifts must not be empty")
        for lam in self.shifts:
            dataclasses.replace(self.hmm, shift=lam)  # validates λ ∈ [0, 1]
        if len(set(self.shifts)) != len(self.shifts):
            raise ValueError(f"shifts must not repeat, got {self.shifts}")
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        for seed in self.seeds:
            check_int("seeds", seed, lo=0)
        hc.check_eta(self.eta, allow_zero=False)
        for eta in self.tta_etas:
            hc.check_eta(eta, allow_zero=False)
        hc.check_router(self.baseline)
        if self.baseline == "star":
            raise ValueError("baseline must be a router other than 'star'")
        hc.check_recipe(self.recipe)
        if not isinstance(self.star_quirks, bool):
            raise ValueError(f"star_quirks must be a bool, got {self.star_quirks!r}")
        for name in ("stream_batches", "stream_batch_size", "heldout_batches",
                     "heldout_batch_size", "eval_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if self.label not in hc.LABEL_KEYS:
            raise ValueError(f"label must be one of {hc.LABEL_KEYS}, got {self.label!r}")
        self.train.train_config(self.hmm.seq_len)
        self.star_config()
        self.baseline_config()

    def star_config(self, *, eta: float | None = None, test_time_update: bool = False):
        """STAR's `LMConfig` (training η unless `eta`; with test-time updates if asked)."""
        opts = dict(v_dtype="bfloat16", gha_steps=2) if self.star_quirks else None
        return hc.lm_config("star", self.model, self.hmm, eta=self.eta if eta is None else eta,
                            test_time_update=test_time_update, recipe=self.recipe,
                            star_options=opts)

    def baseline_config(self):
        return hc.lm_config(self.baseline, self.model, self.hmm, recipe=self.recipe)

    def variants(self) -> list[str]:
        return [f"{self.baseline}_frozen", "star_frozen",
                *(f"star_tta_eta{e:g}" for e in self.tta_etas)]

    @property
    def num_labels(self) -> int:
        return hc.num_labels(self.hmm, self.label)

    def fixed(self) -> dict:
        """Settings every cell shares; shifts, seeds and tta_etas may grow."""
        return fixed_settings(self, ("shifts", "seeds", "tta_etas"))

    def check_mesh(self, mesh: Mesh | None) -> None:
        """Refuses a mesh STAR's or the baseline's model cannot train on (the library's
        ValueError)."""
        hc.check_mesh(mesh, {"star": self.star_config(), self.baseline: self.baseline_config()},
                      self.train, self.hmm.seq_len)


FULL = dict(**hc.FULL_SETTING, stream_batches=128, stream_batch_size=32, heldout_batches=16,
            heldout_batch_size=64)


def _v_shift(a, b) -> float:
    """Mean over MoE layers of ‖V_a − V_b‖_F (STAR router states, any storage dtype)."""
    return float(np.mean([np.linalg.norm(np.asarray(x["router"]["v"], np.float32) -
                                         np.asarray(y["router"]["v"], np.float32))
                          for x, y in zip(a["blocks"], b["blocks"], strict=True)]))


def eval_cells(seed: int, lam: float, trained: dict, cfg: ExperimentConfig,
               todo: set[str], *, mesh: Mesh | None = None) -> list[dict]:
    """The cells of one (seed, λ) for the variants in `todo`; `trained[model] = TrainState`
    (trained on `mesh`, default one device)."""
    h = dataclasses.replace(cfg.hmm, shift=float(lam))
    stream = hc.batches(h, split="test", seed=cfg.data_seed, batch_size=cfg.stream_batch_size,
                        num_batches=cfg.stream_batches)
    held = hc.batches(h, split="val", seed=cfg.data_seed, batch_size=cfg.heldout_batch_size,
                      num_batches=cfg.heldout_batches)
    kw = dict(label_key=cfg.label, num_labels=cfg.num_labels, mesh=mesh)
    cells = []
    for variant in cfg.variants():
        if variant not in todo:
            continue
        t0 = time.perf_counter()
        if variant.startswith("star"):
            frozen_cfg = cfg.star_config()
            st = trained["star"]
        else:
            frozen_cfg = cfg.baseline_config()
            st = trained[cfg.baseline]
        before = hc.evaluate(st.params, st.model_state, frozen_cfg, held, **kw)
        if variant.startswith("star_tta_eta"):
            tta_eta = float(variant.removeprefix("star_tta_eta"))
            tta_cfg = cfg.star_config(eta=tta_eta, test_time_update=True)
            on_stream = hc.evaluate(st.params, st.model_state, tta_cfg, stream,
                                    update_state=True, **kw)
            adapted = on_stream["model_state"]
            after = hc.evaluate(st.params, adapted, frozen_cfg, held, **kw)
            v_shift = _v_shift(adapted, st.model_state)
        else:
            on_stream = hc.evaluate(st.params, st.model_state, frozen_cfg, stream, **kw)
            after, v_shift = before, 0.0
        cells.append({"variant": variant, "seed": seed, "shift": float(lam),
                      "stream": _clean(on_stream), "before": _clean(before),
                      "after": _clean(after), "v_shift": v_shift,
                      "seconds": time.perf_counter() - t0})
    return cells


def _clean(ev: dict) -> dict:
    return {k: v for k, v in hc.scalars(ev).items() if k != "flip_rate"}


def summarize(cells: Sequence[dict]) -> dict:
    """`{"variants": {variant: {shift: {part: {metric: stats.interval}, "v_shift",
    "delta_vs_star_frozen", "delta_vs_<baseline>_frozen"}}}, "training": {model: {"step",
    "val_loss": mean curve, "final": interval}}, "plateau": {...}}`.

    Parts stream/before/after, shifts as strings. The deltas are `stats.compare` of the held-out
    loss after the stream against frozen STAR's / the frozen baseline's, paired per seed, with
    the claimed direction "less" (lower loss = more robust). `plateau` is `stats.plateau` of the
    mean training curve of the model with the lower final un-shifted loss.
    """
    train_cells = [c for c in cells if c.get("kind") == "training"]
    eval_cells_ = [c for c in cells if c.get("kind") != "training"]
    after = {(c["variant"], c["seed"], c["shift"]): c["after"]["val_loss"] for c in eval_cells_}
    refs = sorted({c["variant"] for c in eval_cells_ if c["variant"].endswith("_frozen")})
    groups: dict = {}
    for c in eval_cells_:
        groups.setdefault(c["variant"], {}).setdefault(f"{c['shift']:g}", []).append(c)
    out: dict = {"variants": {}, "training": {}, "plateau": {}}
    for variant, by_shift in groups.items():
        out["variants"][variant] = {}
        for lam, cs in sorted(by_shift.items(), key=lambda kv: float(kv[0])):
            entry = {part: {m: stats.interval([c[part][m] for c in cs]) for m in METRICS}
                     for part in ("stream", "before", "after")}
            entry["v_shift"] = stats.interval([c["v_shift"] for c in cs])
            for ref in refs:
                if ref == variant:
                    continue
                pairs = [(after[variant, c["seed"], c["shift"]], after[ref, c["seed"], c["shift"]])
                         for c in cs if (ref, c["seed"], c["shift"]) in after]
                if pairs:
                    d = stats.compare([p[0] for p in pairs], [p[1] for p in pairs],
                                      direction="less")
                    entry[f"delta_vs_{ref}"] = {**d, "seeds": sorted(
                        c["seed"] for c in cs if (ref, c["seed"], c["shift"]) in after)}
            out["variants"][variant][lam] = entry
    by_model: dict = {}
    for c in train_cells:
        by_model.setdefault(c["model"], []).append(c)
    for model, cs in by_model.items():
        steps = cs[0]["curve"]["step"]
        rows = np.array([c["curve"]["val_loss"] for c in cs if c["curve"]["step"] == steps])
        out["training"][model] = {"step": steps, "val_loss": rows.mean(axis=0).tolist(),
                                  "final": stats.interval(rows[:, -1].tolist()),
                                  "seeds": sorted(c["seed"] for c in cs)}
    if out["training"]:
        best = min(out["training"], key=lambda m: out["training"][m]["final"]["mean"])
        t = out["training"][best]
        out["plateau"] = {"model": best, **stats.plateau(t["step"], t["val_loss"], mode="min")}
    return out


def _train(name: str, lm_cfg, seed: int, cfg: ExperimentConfig, held0: list,
           mesh: Mesh | None):
    """Trains one model; returns `(TrainState, training cell)` — the cell holds the un-shifted
    held-out loss every `eval_every` steps."""
    curve: dict = {"step": [], "val_loss": []}
    t0 = time.perf_counter()

    def callback(step, state, m):
        del m
        if step % cfg.eval_every and step != cfg.train.steps:
            return
        ev = hc.evaluate(state.params, state.model_state, lm_cfg, held0, label_key=cfg.label,
                         num_labels=cfg.num_labels, mesh=mesh)
        curve["step"].append(step)
        curve["val_loss"].append(ev["val_loss"])

    state = hc.train(lm_cfg, cfg.train, cfg.hmm, seed, callback=callback, mesh=mesh,
                     gate_std=hc.gate_std(cfg.model))
    return state, {"kind": "training", "variant": f"training_{name}", "shift": None,
                   "model": name, "seed": seed, "curve": curve,
                   "seconds": time.perf_counter() - t0}


def run(cfg: ExperimentConfig, workdir: str, *, progress: bool = True,
        mesh: Mesh | None = None) -> dict:
    """Runs the missing cells into `workdir` on `mesh` (default one device); returns
    `{"cells", "summary"}` and writes the plot (process 0 only).

    Raises:
      ValueError: `workdir` holds another experiment or this one with other fixed settings, or
        a model cannot train on `mesh`.
    """
    cfg.check_mesh(mesh)
    sweep = ResultsFile(workdir, EXPERIMENT, fixed=cfg.fixed())
    sweep.write()
    done = sweep.done(("variant", "seed", "shift"))
    variants = cfg.variants()
    held0 = hc.batches(dataclasses.replace(cfg.hmm, shift=0.0), split="val", seed=cfg.data_seed,
                       batch_size=cfg.heldout_batch_size, num_batches=cfg.heldout_batches)
    for seed in tqdm(cfg.seeds, desc=EXPERIMENT, unit="seed",
                     disable=not progress or not mesh_flags.is_main()):
        missing = {lam: {v for v in variants if (v, seed, float(lam)) not in done}
                   for lam in cfg.shifts}
        if not any(missing.values()):
            continue
        need = {v for vs in missing.values() for v in vs}
        trained, curves = {}, []
        if any(v.startswith("star") for v in need):
            trained["star"], c = _train("star", cfg.star_config(), seed, cfg, held0, mesh)
            curves.append(c)
        if any(not v.startswith("star") for v in need):
            trained[cfg.baseline], c = _train(cfg.baseline, cfg.baseline_config(), seed, cfg,
                                              held0, mesh)
            curves.append(c)
        jax.block_until_ready([s.params for s in trained.values()])
        have = {(c.get("model"), c["seed"]) for c in sweep.cells if c.get("kind") == "training"}
        for c in curves:  # a retrained model's curve is the same: keep the first
            if (c["model"], seed) not in have:
                sweep.add(c)
        for lam in cfg.shifts:
            for cell in eval_cells(seed, lam, trained, cfg, missing[lam], mesh=mesh):
                sweep.add(cell, summary=summarize([*sweep.cells, cell]))
    shifts = {float(x) for x in cfg.shifts}
    cells = [c for c in sweep.cells if c["seed"] in cfg.seeds and (
        (c.get("kind") == "training" and c["model"] in ("star", cfg.baseline))
        or (c.get("kind") != "training" and c["variant"] in variants and c["shift"] in shifts))]
    summary = summarize(cells)
    sweep.write(summary=summarize(sweep.cells))
    if mesh_flags.is_main():
        plot(summary, os.path.join(workdir, PLOT))
    return {"cells": cells, "summary": summary}


def plot(summary: dict, path: str) -> None:
    """Held-out loss after adaptation (frozen: as trained), its paired difference to frozen STAR
    (mean ± 95 % interval), and MI, vs λ; the training curves (mean over seeds)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4), layout="constrained")
    axes = fig.subplots(1, 4)
    panels = (("after", "val_loss", "held-out loss after the stream (nats/token)"),
              (None, "delta_vs_star_frozen", "Δ loss vs star_frozen (paired, 95 % CI)"),
              ("after", "mi", "held-out I(top-1 expert; label) (nats)"))
    colors = {v: f"C{i}" for i, v in enumerate(summary["variants"])}  # same in every panel
    for ax, (part, metric, title) in zip(axes, panels, strict=False):
        for variant, by_shift in summary["variants"].items():
            lams = [x for x in sorted(by_shift, key=float)
                    if part is not None or metric in by_shift[x]]
            if not lams:
                continue
            st = [by_shift[x][metric] if part is None else by_shift[x][part][metric]
                  for x in lams]
            mean = [s["mean"] for s in st]
            half = [s["half"] if np.isfinite(s["half"]) else 0.0 for s in st]
            ax.errorbar([float(x) for x in lams], mean, yerr=half, marker="o", capsize=3,
                        linestyle="-" if "tta" in variant else "--", label=variant,
                        color=colors[variant])
        ax.set_xlabel("emission shift λ")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[1].axhline(0.0, color="k", lw=0.8)
    axes[0].legend(fontsize=8)
    for model, t in summary["training"].items():
        axes[3].plot(t["step"][1:], t["val_loss"][1:], label=model)
    axes[3].set_title("training: un-shifted held-out loss (mean)", fontsize=10)
    axes[3].set_xlabel("step")
    axes[3].grid(alpha=0.3)
    axes[3].legend(fontsize=8)
    fig.suptitle("STAR test-time GHA updates under emission shift (mean ± 95 % interval)")
    fig.savefig(path, dpi=100)


def format_table(summary: dict) -> str:
    """Markdown table: held-out loss before / after the stream and the paired comparisons
    (mean ± 95 % interval, per-seed signs, verdict), per variant and λ; the plateau check."""
    lines = ["| variant | λ | held-out loss before | after | Δ vs star_frozen (signs, verdict) "
             "| Δ vs baseline frozen (signs, verdict) | MI after | ‖ΔV‖_F |", "|" + "---|" * 8]
    for variant, by_shift in summary["variants"].items():
        for lam, s in by_shift.items():
            def delta(key, s=s):
                d = next((v for k, v in s.items() if k == key), None)
                if d is None:
                    return "–"
                return f"{stats.fmt(d, 4, signed=True)} ({''.join(d['signs'])}, {d['verdict']})"
            base = next((k for k in s if k.startswith("delta_vs_") and
                         k != "delta_vs_star_frozen"), None)
            lines.append(f"| {variant} | {lam} | {stats.fmt(s['before']['val_loss'], 4)} | "
                         f"{stats.fmt(s['after']['val_loss'], 4)} | "
                         f"{delta('delta_vs_star_frozen')} | "
                         f"{delta(base) if base else '–'} | {stats.fmt(s['after']['mi'])} | "
                         f"{stats.fmt(s['v_shift'], 4)} |")
    p = summary.get("plateau") or {}
    if p:
        lines.append(f"\nplateau of {p['model']}'s training curve: {p['plateaued']} "
                     f"(last change {p['last_change']:.4f})")
    return "\n".join(lines)


def config_from_flags() -> ExperimentConfig:
    base = ExperimentConfig(**FULL) if FLAGS.full else ExperimentConfig()
    over: dict = {"shifts": tuple(float(x) for x in FLAGS.shifts),
                  "seeds": tuple(int(s) for s in FLAGS.seeds), "eta": FLAGS.eta,
                  "tta_etas": tuple(float(e) for e in FLAGS.tta_etas),
                  "baseline": FLAGS.baseline, "recipe": FLAGS.recipe,
                  "star_quirks": FLAGS.star_quirks,
                  "model": dataclasses.replace(base.model, gate_init=FLAGS.gate_init),
                  "hmm": dataclasses.replace(base.hmm, disjoint_vocab=FLAGS.disjoint)}
    if FLAGS.steps is not None:
        over["train"] = dataclasses.replace(base.train, steps=FLAGS.steps)
    if FLAGS.stream_batches is not None:
        over["stream_batches"] = FLAGS.stream_batches
    return dataclasses.replace(base, **over)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    mesh, cfg = mesh_flags.setup_sweep(config_from_flags)  # a bad flag: UsageError, here
    t0 = time.perf_counter()
    results = run(cfg, FLAGS.workdir, mesh=mesh)
    if not mesh_flags.is_main():
        return
    print(format_table(results["summary"]))
    print(f"wrote {os.path.join(FLAGS.workdir, 'results.json')} and {PLOT} "
          f"in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    define_flags()
    app.run(main)
