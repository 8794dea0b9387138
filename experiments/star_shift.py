r"""STAR test-time subspace updates under distribution shift.

Per seed, two small MoE LMs (`experiments.hmm_common`) are trained on the un-shifted HMM stream:
one routed by STAR (GHA step size `eta`, no aux loss) and a top-k baseline (`baseline`, default
`topk_switch`). Each is then evaluated on the emission-shifted data of `moejax.data.hmm`
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
test-time updates improve robustness under shift.

Writes `WORKDIR/results.json` (`experiments.sweep.ResultsFile`, experiment "star_shift"; a rerun
skips finished cells) and `WORKDIR/star_shift.png` (held-out loss after adaptation, its paired
difference to frozen STAR, and MI, vs λ; mean ± std over seeds).

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
from experiments import mesh_flags
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
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (init, data order).")
    flags.DEFINE_float("eta", 5e-5, "STAR's GHA step size in training.")
    flags.DEFINE_list("tta_etas", ["5e-5", "5e-4", "5e-3"], "GHA step sizes at test time.")
    flags.DEFINE_enum("baseline", "topk_switch",
                      [r for r in hc.ROUTER_NAMES if r != "star"], "Frozen baseline router.")
    flags.DEFINE_integer("steps", None, "Training steps (default 300; --full 5000).")
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
      model, train, hmm: as in `routing_hmm` (the un-shifted training data is `hmm`).
      stream_batches, stream_batch_size: the unlabelled adaptation stream per λ (split "test").
      heldout_batches, heldout_batch_size: the held-out shifted set per λ (split "val").
      data_seed: seed of the stream and held-out examples (the same for every cell).
      label: latent label of the MI.
    """

    shifts: tuple[float, ...] = (0.0, 0.5, 1.0)
    seeds: tuple[int, ...] = (0, 1, 2)
    eta: float = 5e-5
    tta_etas: tuple[float, ...] = (5e-5, 5e-4, 5e-3)
    baseline: str = "topk_switch"
    model: hc.ModelSpec = hc.ModelSpec()
    train: hc.TrainSpec = hc.TrainSpec()
    hmm: hmm.HMMConfig = hmm.HMMConfig()
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
        hc.check_eta(self.eta)
        for eta in self.tta_etas:
            hc.check_eta(eta)
        hc.check_router(self.baseline)
        if self.baseline == "star":
            raise ValueError("baseline must be a router other than 'star'")
        for name in ("stream_batches", "stream_batch_size", "heldout_batches",
                     "heldout_batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if self.label not in hc.LABEL_KEYS:
            raise ValueError(f"label must be one of {hc.LABEL_KEYS}, got {self.label!r}")
        self.train.train_config(self.hmm.seq_len)
        hc.lm_config("star", self.model, self.hmm, eta=self.eta)
        hc.lm_config(self.baseline, self.model, self.hmm)

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
        hc.check_mesh(mesh, {"star": hc.lm_config("star", self.model, self.hmm, eta=self.eta),
                             self.baseline: hc.lm_config(self.baseline, self.model, self.hmm)},
                      self.train, self.hmm.seq_len)


FULL = dict(**hc.FULL_SETTING, stream_batches=128, stream_batch_size=32, heldout_batches=16,
            heldout_batch_size=64)


def _v_shift(a, b) -> float:
    """Mean over MoE layers of ‖V_a − V_b‖_F (STAR router states)."""
    return float(np.mean([np.linalg.norm(np.asarray(x["router"]["v"]) -
                                         np.asarray(y["router"]["v"]))
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
            frozen_cfg = hc.lm_config("star", cfg.model, cfg.hmm, eta=cfg.eta)
            st = trained["star"]
        else:
            frozen_cfg = hc.lm_config(cfg.baseline, cfg.model, cfg.hmm)
            st = trained[cfg.baseline]
        before = hc.evaluate(st.params, st.model_state, frozen_cfg, held, **kw)
        if variant.startswith("star_tta_eta"):
            tta_eta = float(variant.removeprefix("star_tta_eta"))
            tta_cfg = hc.lm_config("star", cfg.model, cfg.hmm, eta=tta_eta,
                                   test_time_update=True)
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
    """`{variant: {shift: {part: {metric: mean/std/n}, "v_shift", "delta_vs_star_frozen"}}}`,
    parts stream/before/after, shifts as strings; `delta_vs_star_frozen` is the held-out loss
    after the stream minus frozen STAR's, paired per seed."""
    groups: dict = {}
    ref = {(c["seed"], c["shift"]): c["after"]["val_loss"] for c in cells
           if c["variant"] == "star_frozen"}
    for c in cells:
        groups.setdefault(c["variant"], {}).setdefault(f"{c['shift']:g}", []).append(c)
    out: dict = {}
    for variant, by_shift in groups.items():
        out[variant] = {}
        for lam, cs in sorted(by_shift.items(), key=lambda kv: float(kv[0])):
            out[variant][lam] = {part: {m: hc.mean_std(c[part][m] for c in cs) for m in METRICS}
                                 for part in ("stream", "before", "after")}
            out[variant][lam]["v_shift"] = hc.mean_std(c["v_shift"] for c in cs)
            # paired over seeds: held-out loss after the stream minus that of frozen STAR
            out[variant][lam]["delta_vs_star_frozen"] = hc.mean_std(
                c["after"]["val_loss"] - ref[c["seed"], c["shift"]] for c in cs
                if (c["seed"], c["shift"]) in ref)
    return out


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
    for seed in tqdm(cfg.seeds, desc=EXPERIMENT, unit="seed",
                     disable=not progress or not mesh_flags.is_main()):
        missing = {lam: {v for v in variants if (v, seed, float(lam)) not in done}
                   for lam in cfg.shifts}
        if not any(missing.values()):
            continue
        need = {v for vs in missing.values() for v in vs}
        trained = {}
        if any(v.startswith("star") for v in need):
            trained["star"] = hc.train(hc.lm_config("star", cfg.model, cfg.hmm, eta=cfg.eta),
                                       cfg.train, cfg.hmm, seed, mesh=mesh)
        if any(not v.startswith("star") for v in need):
            trained[cfg.baseline] = hc.train(hc.lm_config(cfg.baseline, cfg.model, cfg.hmm),
                                             cfg.train, cfg.hmm, seed, mesh=mesh)
        jax.block_until_ready([s.params for s in trained.values()])
        for lam in cfg.shifts:
            for cell in eval_cells(seed, lam, trained, cfg, missing[lam], mesh=mesh):
                sweep.add(cell, summary=summarize([*sweep.cells, cell]))
    cells = [c for c in sweep.cells if c["variant"] in variants and c["seed"] in cfg.seeds
             and c["shift"] in {float(x) for x in cfg.shifts}]
    summary = summarize(cells)
    sweep.write(summary=summarize(sweep.cells))
    if mesh_flags.is_main():
        plot(summary, os.path.join(workdir, PLOT))
    return {"cells": cells, "summary": summary}


def plot(summary: dict, path: str) -> None:
    """Held-out loss and MI after adaptation (frozen: as trained) vs λ, mean ± std."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), layout="constrained")
    axes = fig.subplots(1, 3)
    panels = (("after", "val_loss", "held-out loss after the stream (nats/token)"),
              (None, "delta_vs_star_frozen", "Δ held-out loss vs star_frozen (paired)"),
              ("after", "mi", "held-out I(top-1 expert; label) (nats)"))
    for ax, (part, metric, title) in zip(axes, panels, strict=True):
        for variant, by_shift in summary.items():
            lams = sorted(by_shift, key=float)
            stats = [by_shift[x][metric] if part is None else by_shift[x][part][metric]
                     for x in lams]
            mean = [st["mean"] for st in stats]
            std = [st["std"] for st in stats]
            ax.errorbar([float(x) for x in lams], mean, yerr=std, marker="o", capsize=3,
                        linestyle="-" if "tta" in variant else "--", label=variant)
        ax.set_xlabel("emission shift λ")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("STAR test-time GHA updates under emission shift (mean ± std over seeds)")
    fig.savefig(path, dpi=100)


def format_table(summary: dict) -> str:
    """Markdown table: held-out loss / MI after the stream, per variant and λ."""
    lines = ["| variant | λ | held-out loss before | held-out loss after | Δ vs star_frozen "
             "(paired) | online stream loss | MI after (nats) | load entropy after | ‖ΔV‖_F |",
             "|" + "---|" * 9]
    for variant, by_shift in summary.items():
        for lam, s in by_shift.items():
            f = lambda d: f"{d['mean']:.4f} ± {d['std']:.4f}"  # noqa: E731
            lines.append(f"| {variant} | {lam} | {f(s['before']['val_loss'])} | "
                         f"{f(s['after']['val_loss'])} | {f(s['delta_vs_star_frozen'])} | "
                         f"{f(s['stream']['val_loss'])} | "
                         f"{f(s['after']['mi'])} | {f(s['after']['load_entropy'])} | "
                         f"{f(s['v_shift'])} |")
    return "\n".join(lines)


def config_from_flags() -> ExperimentConfig:
    base = ExperimentConfig(**FULL) if FLAGS.full else ExperimentConfig()
    over: dict = {"shifts": tuple(float(x) for x in FLAGS.shifts),
                  "seeds": tuple(int(s) for s in FLAGS.seeds), "eta": FLAGS.eta,
                  "tta_etas": tuple(float(e) for e in FLAGS.tta_etas),
                  "baseline": FLAGS.baseline}
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
