r"""Zoology MQAR (multi-query associative recall): does Q-Delta recall as well as Gated DeltaNet?

Arora et al. (2023, arXiv:2312.04927) train 2-layer LMs on MQAR (DESIGN §8: `n_kv` key-value
pairs, then the keys again as queries) and report, per sequence length L, the exact-match
accuracy at the answer positions against the model width d, taking the best learning rate of a
small sweep (`logspace(-4, -2)`). Every (mixer, d_model, (L, n_kv), lr, seed) cell here trains a
fresh 2-layer LM (a SwiGLU FFN of width 2d; `--ffn=none` drops it, as Zoology's; tied embeddings,
vocabulary = the MQAR vocabulary, the Q-Delta authors' N(0, 0.02²) init unless --init_std says
otherwise) with the library loop
(`moejax.train.loop.fit`: AdamW, linear warmup, cosine decay to 0.1×, clipping; the learning
rates and seeds of a model shape share one compiled step).

The loss and the logits are computed only at the `n_kv` answer positions of each example
(`lm.apply(..., positions=answer_positions)`, `[B, n_kv, V]` logits; never `[B, L, V]`).
Accuracy is the share of answers whose arg-max logit is the right value. Every `eval_every`
steps a cell records its accuracy on the val split (the learning curve); at the end it is
measured on the whole val and test splits. `val_acc` (mean over seeds) picks each mixer's
learning rate per (d_model, L, n_kv); `test_acc` at that lr is the reported number, so the lr
choice is not fitted on the reported examples. Chance is 1 / (V/2).

Claim under test (Q-Delta's): Q-Delta recalls at least as well as Gated DeltaNet at equal width.
The authors' Q-Delta is gated, so the claim compares `gated_qdelta` with `gated_deltanet`;
ungated `qdelta` against `deltanet` (moejax's extension) is reported apart when both are in
the sweep. Each comparison is paired per seed (same seed = same init key, data and batch order)
at each mixer's own best lr: `experiments.stats.compare` gives the mean difference of test
accuracy with its 95 % Student-t interval, the per-seed signs and the verdict ("reproduced"
only when the interval lies above 0). Convergence: `experiments.stats.plateau` on the baseline's
mean val-accuracy curve says whether it stopped improving over the last 20 % of the run.

Default: a reduced CPU setting, chosen so that the baseline converges within the
30-min budget (results/mqar.md has the measured cost and the curves): vocabulary 256 (paper
8192), (L, n_kv) = (32, 4) only (shorter than Zoology's shortest, (64, 4): at L = 64 Gated
DeltaNet was still improving after 1500 steps, and 3000 steps of L = 64 cost about 65 min),
d_model 64, the two gated mixers, one learning rate 1e-2 (the top of Zoology's grid and the
best of {3e-3, 1e-2} for every delta mixer in the earlier sweep; the lr sweep is a control),
5 seeds, 2000 steps of 32 from 8192 train examples (about 7.8 epochs; paper 64 epochs of 100k
at batch 512), about 150 s per cell on 2 cores; `summary.claims[*].baseline_plateau` reports
whether the baseline's val curve had stopped improving. `--controls` adds the issue's
controls (d_model 64 and 128, (L, n_kv) = (64, 4) and (128, 8), the four delta mixers, a
three-point lr sweep logspace(-3, -2)) — several CPU hours; `--full` is the paper scale for an
accelerator (all four DESIGN §8 settings, vocabulary 8192, d_model in {64, 128, 256}, 4 lrs in
logspace(-4, -2), 100k train examples, 20k steps of 64, every mixer). Both print and store what
they are (`summary.paper_scale`).

Writes `WORKDIR/results.json` (`experiments.sweep.ResultsFile`, experiment "mqar": rewritten
after every cell; a rerun skips the finished cells and may add mixers, widths, settings, learning
rates or seeds, while other fixed settings are refused), per-cell training curves in
`WORKDIR/cells/<cell>/` (`metrics.jsonl` + TensorBoard, `moejax.train.logging.MetricsWriter`),
`WORKDIR/mqar.png` (mean val accuracy against step at each mixer's best lr, one panel per
(d_model, L, n_kv)) and, with several widths, `WORKDIR/mqar_width.png` (best-lr test accuracy
against d_model).

Scale out: --mesh and the multi-process flags of `experiments.mesh_flags` (default: one device;
the batch size must divide over the mesh's data×fsdp); every process trains every cell, only
process 0 writes.

  python -m experiments.mqar --workdir=runs/mqar
  python -m experiments.mqar --workdir=runs/mqar_controls --controls
  python -m experiments.mqar --workdir=runs/mqar_full --full        # GPU
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
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from jax.sharding import Mesh
from tqdm import tqdm

from experiments import mesh_flags, stats
from experiments.sweep import ResultsFile, check_mesh, fixed_settings
from moejax.data import mqar
from moejax.models import lm
from moejax.parallel import mesh as mesh_lib
from moejax.train import loop
from moejax.train.batches import check_token_ids
from moejax.train.logging import MetricsWriter
from moejax.train.steps import ModelFns

EXPERIMENT = "mqar"
PLOT = "mqar.png"
WIDTH_PLOT = "mqar_width.png"
CELLS_DIR = "cells"
MIXERS = ("qdelta", "gated_qdelta", "deltanet", "gated_deltanet", "softmax")
# The claim's pairs (Q-Delta variant, its DeltaNet baseline): the authors' gated Q-Delta first.
PAIRS = (("gated_qdelta", "gated_deltanet"), ("qdelta", "deltanet"))
# Sweep axes: a rerun of a workdir may change these; every other field must match the saved one.
SWEEP_FIELDS = ("mixers", "d_models", "settings", "lrs", "seeds")
KEY = ("mixer", "d_model", "seq_len", "num_kv_pairs", "lr", "seed")
FAN_IN = "fan_in"  # --init_std value for the fan-in init (LMConfig.init_std=None)

FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    """Defines the flags on `fv`: the global FLAGS only when run as a script (see
    panda_neighbors), so importing this module never clashes with other experiments' flags;
    tests pass their own `flags.FlagValues`."""
    flags.DEFINE_string("workdir", "runs/mqar", "Output folder (results.json, mqar.png, cells/).",
                        flag_values=fv)
    flags.DEFINE_bool("full", False, "Paper-scale setting (for a GPU) instead of the reduced CPU "
                      "one.", flag_values=fv)
    flags.DEFINE_bool("controls", False, "The issue's controls on CPU: d_model 64,128, settings "
                      "64:4,128:8, the four delta mixers, lrs logspace(-3, -2, 3) (hours).",
                      flag_values=fv)
    lists = {
        "mixers": f"Mixers among {MIXERS} (default gated_qdelta,gated_deltanet; --controls: the "
                  "four delta mixers; --full: all).",
        "d_models": "Model widths (default 64; --controls: 64,128; --full: 64,128,256).",
        "settings": "(L, n_kv) pairs as L:n_kv, e.g. 64:4,128:8 (default 32:4; --controls: "
                    "64:4,128:8; --full: 64:4,128:8,256:16,512:64).",
        "lrs": "Peak learning rates (default 1e-2; --controls: logspace(-3, -2, 3); "
               "--full: logspace(-4, -2, 4)).",
        "seeds": "Seeds: model init, data and batch order (default 0,1,2,3,4).",
    }
    for name, help_ in lists.items():
        flags.DEFINE_list(name, None, help_, flag_values=fv)
    ints = {
        "steps": "Optimizer steps per cell (default 2000; --full: 20000).",
        "batch_size": "Examples per step (default 32; --full: 64).",
        "vocab_size": "MQAR vocabulary V (default 256; --full: 8192).",
        "num_train": "Distinct train examples per (L, n_kv, seed) (default 8192; --full: 100000).",
        "num_eval": "Examples in each held-out split, val and test (default 512; --full: 3000).",
        "eval_every": "Steps between val-accuracy points of the learning curve (default 100; "
                      "--full: 1000; 0: only at the end).",
    }
    for name, help_ in ints.items():
        flags.DEFINE_integer(name, None, help_, flag_values=fv)
    flags.DEFINE_enum("ffn", None, ["none", "dense"], "The LM's FFN (default dense: a SwiGLU of "
                      "width 2·d_model; none: no FFN, as Zoology's MQAR models).", flag_values=fv)
    flags.DEFINE_string("init_std", None, "Init std of every projection, conv and the "
                        f"embedding (default 0.02, the Q-Delta authors'; '{FAN_IN}': "
                        "1/sqrt(fan_in), moejax's earlier init).", flag_values=fv)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ExperimentConfig:
    """The sweep. Validated on construction (the tasks by `MQARConfig`, the models by
    `LMConfig`), so a bad grid fails before any training.

    Attributes:
      mixers: names in MIXERS.
      d_models: model widths d (each divisible by `num_heads`, giving an even head dim).
      settings: (L, n_kv) pairs; each must be a valid `MQARConfig` with `vocab_size`.
      lrs: peak learning rates, > 0.
      seeds: non-negative seeds (init, data, batch order).
      steps: optimizer steps per cell.
      batch_size: examples per step.
      vocab_size: MQAR vocabulary V (keys from [1, V/2), values from [V/2, V)); also the LM's.
      num_train: distinct train examples per (setting, seed), cycled in shuffled epochs.
      num_eval: examples in each of the val and test splits (a multiple of batch_size is not
        needed: the last partial batch is evaluated too; the learning curve uses the full
        batches of the val split).
      num_layers, num_heads: the LM (head_dim = d_model / num_heads for every mixer).
      expand_v: delta mixers' value head dim = expand_v · head_dim.
      ffn: the LM's FFN: "dense" (default: a SwiGLU of width `ffn_mult · d_model`) or "none"
        (no FFN sublayer, as Zoology's MQAR models, whose state mixer is the identity; with the
        N(0, 0.02²) init gated Q-Delta did not leave chance in 1500 steps at d = 64 this way).
      ffn_mult: dense SwiGLU hidden width = ffn_mult · d_model.
      warmup_frac: share of the steps spent in linear warmup.
      weight_decay: AdamW weight decay (matrices only).
      log_every: steps between the per-cell train metrics records.
      eval_every: steps between the val-accuracy points of the learning curve (0: only the
        last step).
      init_std: the LM's `init_std` (0.02: the Q-Delta authors' N(0, 0.02²); None: fan-in).
    """

    mixers: tuple[str, ...] = ("gated_qdelta", "gated_deltanet")
    d_models: tuple[int, ...] = (64,)
    settings: tuple[tuple[int, int], ...] = ((32, 4),)
    lrs: tuple[float, ...] = (1e-2,)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    steps: int = 2000
    batch_size: int = 32
    vocab_size: int = 256
    num_train: int = 8192
    num_eval: int = 512
    num_layers: int = 2
    num_heads: int = 2
    expand_v: float = 1.0
    ffn: str = "dense"
    ffn_mult: int = 2
    warmup_frac: float = 0.1
    weight_decay: float = 0.1
    log_every: int = 25
    eval_every: int = 100
    init_std: float | None = 0.02

    def __post_init__(self):
        for name in ("mixers", "d_models", "settings", "lrs", "seeds"):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")
        unknown = [m for m in self.mixers if m not in MIXERS]
        if unknown:
            raise ValueError(f"mixers: unknown mixer(s) {unknown}; valid mixers are "
                             f"{', '.join(MIXERS)}")
        for name in ("steps", "batch_size", "num_train", "num_eval", "num_layers", "num_heads",
                     "ffn_mult", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if (isinstance(self.eval_every, bool) or not isinstance(self.eval_every, int)
                or self.eval_every < 0):
            raise ValueError(f"eval_every must be an int >= 0, got {self.eval_every!r}")
        if self.num_train < self.batch_size:
            raise ValueError(f"num_train={self.num_train} must be >= batch_size="
                             f"{self.batch_size}")
        if self.num_eval < self.batch_size:
            raise ValueError(f"num_eval={self.num_eval} must be >= batch_size="
                             f"{self.batch_size} (the learning curve evaluates full batches)")
        if any(not lr > 0 for lr in self.lrs):
            raise ValueError(f"lrs must be > 0, got {self.lrs}")
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds):
            raise ValueError(f"seeds must be non-negative ints, got {self.seeds}")
        if self.ffn not in ("none", "dense"):
            raise ValueError(f"ffn must be 'none' or 'dense', got {self.ffn!r}")
        if not 0 <= self.warmup_frac < 1:
            raise ValueError(f"warmup_frac must be in [0, 1), got {self.warmup_frac}")
        for setting in self.settings:
            if len(setting) != 2:
                raise ValueError(f"settings: each entry is (L, n_kv), got {setting!r}")
            try:
                self.task(setting)
            except ValueError as e:
                raise ValueError(f"settings: (L, n_kv) = {tuple(setting)} with vocab_size="
                                 f"{self.vocab_size}: {e}") from None
        for d in self.d_models:
            if isinstance(d, bool) or not isinstance(d, int) or d < 1 or d % self.num_heads:
                raise ValueError(f"d_models: each must be a positive multiple of num_heads="
                                 f"{self.num_heads}, got {d!r}")
            for mixer in self.mixers:  # LMConfig checks the rest (init_std, even head dim, ...)
                self.model(mixer, d, max(L for L, _ in self.settings))

    def task(self, setting: tuple[int, int]) -> mqar.MQARConfig:
        L, n_kv = setting
        return mqar.MQARConfig(seq_len=L, num_kv_pairs=n_kv, vocab_size=self.vocab_size)

    def model(self, mixer: str, d_model: int, seq_len: int) -> lm.LMConfig:
        return lm.LMConfig(
            vocab_size=self.vocab_size, d_model=d_model, num_layers=self.num_layers,
            num_heads=self.num_heads, head_dim=d_model // self.num_heads,
            expand_v=self.expand_v, mixer=mixer, ffn=self.ffn, d_ff=self.ffn_mult * d_model,
            max_seq_len=seq_len, init_std=self.init_std)

    def train_config(self, lr: float, seq_len: int, seed: int) -> loop.TrainConfig:
        return loop.TrainConfig(
            steps=self.steps, lr=lr, warmup_steps=int(self.warmup_frac * self.steps),
            weight_decay=self.weight_decay, batch_size=self.batch_size, seq_len=seq_len,
            log_every=self.log_every, eval_every=self.eval_every,
            eval_batches=self.num_eval // self.batch_size, seed=seed)

    def fixed(self) -> dict:
        """The settings every cell of a workdir shares (ResultsFile checks them on rerun)."""
        return fixed_settings(self, SWEEP_FIELDS)

    def check_mesh(self, mesh: Mesh | None) -> None:
        """Refuses a mesh some model of the grid cannot train on (the library's ValueError:
        e.g. `batch_size` not divisible by the mesh's data×fsdp)."""
        check_mesh(mesh, [(f"{m} d_model={d} L={L}", MODEL, self.model(m, d, L),
                           self.train_config(self.lrs[0], L, self.seeds[0]))
                          for L, _ in self.settings for d in self.d_models for m in self.mixers])

    @property
    def is_paper_scale(self) -> bool:
        return (self.vocab_size == mqar.MQAR_VOCAB_SIZE
                and set(map(tuple, self.settings)) >= set(mqar.MQAR_SETTINGS)
                and self.num_train >= 100_000)


FULL = dict(mixers=MIXERS, d_models=(64, 128, 256), settings=mqar.MQAR_SETTINGS,
            lrs=tuple(float(x) for x in np.logspace(-4, -2, 4)), steps=20000, batch_size=64,
            vocab_size=mqar.MQAR_VOCAB_SIZE, num_train=100_000, num_eval=3000, log_every=100,
            eval_every=1000)
CONTROLS = dict(mixers=("qdelta", "gated_qdelta", "deltanet", "gated_deltanet"),
                d_models=(64, 128), settings=((64, 4), (128, 8)),
                lrs=tuple(float(f"{x:.3g}") for x in np.logspace(-3, -2, 3)))


# ----------------------------------------------------------------------------- data


def _materialise(task: mqar.MQARConfig, *, split: str, seed: int, num: int) -> dict:
    """Examples `0 .. num-1` of a split (`mqar.mqar_example`, the examples `make_mqar_dataset`
    serves unshuffled) as stacked numpy arrays: `inputs` `[N, L]`, `answer_positions` and
    `answer_targets` `[N, n_kv]` (the other fields are not needed)."""
    fields = ("inputs", "answer_positions", "answer_targets")
    rows = [mqar.mqar_example(task, seed=seed, split=split, index=i) for i in range(num)]
    return {f: np.stack([r[f] for r in rows]) for f in fields}


@functools.lru_cache(maxsize=4)
def _data(cfg: ExperimentConfig, setting: tuple[int, int], seed: int) -> dict:
    """Train, val and test arrays of one (setting, seed), shared by its mixers, widths and lrs."""
    task = cfg.task(setting)
    return {"train": _materialise(task, split="train", seed=seed, num=cfg.num_train),
            "val": _materialise(task, split="val", seed=seed, num=cfg.num_eval),
            "test": _materialise(task, split="test", seed=seed, num=cfg.num_eval)}


def _batch(arrays: dict, idx: np.ndarray) -> dict:
    return {k: v[idx] for k, v in arrays.items()}


# ----------------------------------------------------------------------------- model


def answer_loss(params, state, batch: dict, *, cfg: lm.LMConfig, train: bool = False,
                rng=None):
    """Mean cross-entropy and exact-match accuracy over the answer positions only: the loss of
    `MODEL` (the library loop's model contract).

    Args:
      params, state: from `lm.init` (a dense-FFN model's state is not updated).
      batch: `inputs` `<int32>[B, L]`, `answer_positions`, `answer_targets` `<int32>[B, P]`.
      cfg: the LM.
      train, rng: as for `lm.apply`.

    Returns:
      `(loss, (state, metrics))`: `ce` (= loss), `acc` (share of exact answers) and `weight`
      (B·P answers: evaluation averages weigh batches by it); logits are `[B, P, V]`, never
      `[B, L, V]`.
    """
    logits, _, _ = lm.apply(params, state, batch["inputs"], cfg=cfg, train=train, rng=rng,
                            positions=batch["answer_positions"])
    ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["answer_targets"]))
    correct = jnp.argmax(logits, axis=-1) == batch["answer_targets"]
    return ce, (state, {"ce": ce, "acc": jnp.mean(correct),
                        "weight": jnp.float32(correct.size)})


def check_answer_batch(batch, *, cfg: lm.LMConfig, train_cfg: loop.TrainConfig) -> None:
    """Refuses a first batch that is not MQAR's (`inputs` `[B, L]` ids in the vocabulary,
    `answer_positions` in [0, L), `answer_targets` ids in the vocabulary), naming the field."""
    missing = [k for k in ("inputs", "answer_positions", "answer_targets") if k not in batch]
    if missing:
        raise ValueError(f"MQAR batches need {missing}; the first has keys {sorted(batch)}")
    check_token_ids("inputs", batch["inputs"], cfg=cfg, train_cfg=train_cfg)
    pos, tgt = np.asarray(batch["answer_positions"]), np.asarray(batch["answer_targets"])
    if pos.shape != tgt.shape or pos.shape[0] != train_cfg.batch_size:
        raise ValueError(f"answer_positions {pos.shape} and answer_targets {tgt.shape} must both "
                         f"be [batch_size={train_cfg.batch_size}, P]")
    if pos.min() < 0 or pos.max() >= train_cfg.seq_len:
        raise ValueError(f"answer_positions must lie in [0, {train_cfg.seq_len})")
    if tgt.min() < 0 or tgt.max() >= cfg.vocab_size:
        raise ValueError(f"answer_targets must lie in [0, vocab_size={cfg.vocab_size})")


MODEL = ModelFns(init=lm.init, loss_fn=answer_loss, check_batch=check_answer_batch)


def evaluate(mcfg: lm.LMConfig, tcfg: loop.TrainConfig, state: loop.TrainState, arrays: dict,
             batch_size: int, *, mesh: Mesh | None = None) -> dict:
    """Exact-match accuracy and mean CE over all answers of a split (the last batch may be
    partial), on `mesh` (default one device).

    A partial last batch whose rows do not split over the mesh's data×fsdp = S is evaluated on
    its own with every row repeated `S / gcd(rows, S)` times (the same means) and weighed by its
    own rows."""
    n = len(arrays["inputs"])
    batches = [_batch(arrays, np.arange(start, min(n, start + batch_size)))
               for start in range(0, n, batch_size)]
    shards = 1 if mesh is None else mesh_lib.num_batch_shards(mesh)
    rows = len(batches[-1]["inputs"])
    if rows % shards == 0:
        out = loop.evaluate(state, batches, model=MODEL, model_cfg=mcfg, train_cfg=tcfg,
                            mesh=mesh)
        return {"acc": out["acc"], "loss": out["ce"]}
    tail = _batch(batches.pop(), np.repeat(np.arange(rows), shards // math.gcd(rows, shards)))
    parts = [(n - rows, batches), (rows, [tail])] if batches else [(rows, [tail])]
    outs = [(w, loop.evaluate(state, bs, model=MODEL, model_cfg=mcfg, train_cfg=tcfg,
                              mesh=mesh)) for w, bs in parts]
    return {name: sum(w * out[key] for w, out in outs) / n
            for name, key in (("acc", "acc"), ("loss", "ce"))}


def train_batches(cfg: ExperimentConfig, arrays: dict, setting: tuple[int, int], seed: int):
    """`steps` batches of `batch_size` from the train split, in epochs shuffled by a generator
    seeded with `[seed, L, n_kv]`."""
    L, n_kv = setting
    order = np.random.default_rng([seed, L, n_kv])
    n_batches = cfg.num_train // cfg.batch_size
    perm = order.permutation(cfg.num_train)
    for step in range(1, cfg.steps + 1):
        i = (step - 1) % n_batches
        if step > 1 and i == 0:
            perm = order.permutation(cfg.num_train)
        yield _batch(arrays, perm[i * cfg.batch_size:(i + 1) * cfg.batch_size])


def cell_name(mixer: str, d_model: int, seq_len: int, n_kv: int, lr: float, seed: int) -> str:
    return f"{mixer}_d{d_model}_L{seq_len}_kv{n_kv}_lr{lr:g}_s{seed}"


def val_batches(cfg: ExperimentConfig, arrays: dict):
    """The full batches of the val split in order (the learning curve's evaluation)."""
    n = (len(arrays["inputs"]) // cfg.batch_size) * cfg.batch_size
    return lambda: (_batch(arrays, np.arange(start, start + cfg.batch_size))
                    for start in range(0, n, cfg.batch_size))


def train_cell(cfg: ExperimentConfig, mixer: str, d_model: int, setting: tuple[int, int],
               lr: float, seed: int, workdir: str, bar: tqdm | None = None, *,
               mesh: Mesh | None = None) -> dict:
    """Trains one model with the library loop (`loop.fit`; every lr and seed of a model shape
    shares one compiled step) on `mesh` (default one device), recording the val accuracy every
    `eval_every` steps (`curve_steps`, `curve_val_acc`), and evaluates it on the whole held-out
    splits at the end; returns its cell. A run whose loss becomes non-finite (too large an lr)
    stops there and is recorded with `diverged` (the message) and accuracy 0."""
    L, n_kv = setting
    mcfg = cfg.model(mixer, d_model, L)
    tcfg = cfg.train_config(lr, L, seed)
    data = _data(cfg, (L, n_kv), seed)
    name = cell_name(mixer, d_model, L, n_kv, lr, seed)
    cell_dir = os.path.join(workdir, CELLS_DIR, name)
    main = mesh_flags.is_main()
    if main:
        shutil.rmtree(cell_dir, ignore_errors=True)  # an interrupted attempt restarts clean
    writer = MetricsWriter(cell_dir, start_step=0, total_steps=cfg.steps, progress=False,
                           enabled=main)
    writer.write_config({"model": mcfg.to_dict(), "experiment": dataclasses.asdict(cfg),
                         "lr": lr, "seed": seed, "setting": [L, n_kv]})
    state = loop.init_state(MODEL, mcfg, tcfg, jax.random.key(seed), mesh=mesh)
    t0 = time.perf_counter()
    cell = {"mixer": mixer, "d_model": d_model, "seq_len": L, "num_kv_pairs": n_kv, "lr": lr,
            "seed": seed}
    try:
        fit = loop.fit(state, train_batches(cfg, data["train"], setting, seed), model=MODEL,
                       model_cfg=mcfg, train_cfg=tcfg, rng=jax.random.key(seed), writer=writer,
                       mesh=mesh, val_data=val_batches(cfg, data["val"]), val_metrics=("acc",),
                       callback=None if bar is None else lambda step, *_: step and bar.update(1))
    except FloatingPointError as e:  # a too-large lr: the cell counts as accuracy 0
        writer.write({"step": cfg.steps, "diverged": str(e)})
        writer.close()
        return {**cell, "diverged": str(e), "val_acc": 0.0, "val_loss": None, "test_acc": 0.0,
                "test_loss": None, "final_train_loss": None, "curve_steps": [],
                "curve_val_acc": [], "steps": cfg.steps,
                "train_seconds": time.perf_counter() - t0,
                "metrics": os.path.join(CELLS_DIR, name)}
    seconds = time.perf_counter() - t0
    curve = [(r["step"], r["val_acc"]) for r in fit.records if "val_acc" in r]
    val = evaluate(mcfg, tcfg, fit.state, data["val"], cfg.batch_size, mesh=mesh)
    test = evaluate(mcfg, tcfg, fit.state, data["test"], cfg.batch_size, mesh=mesh)
    writer.write({"step": cfg.steps, "val_acc": val["acc"], "val_loss": val["loss"],
                  "test_acc": test["acc"], "test_loss": test["loss"]})
    writer.close()
    return {**cell, "val_acc": val["acc"], "val_loss": val["loss"],
            "test_acc": test["acc"], "test_loss": test["loss"],
            "final_train_loss": fit.records[-1]["loss"],
            "curve_steps": [int(s) for s, _ in curve],
            "curve_val_acc": [float(a) for _, a in curve],
            "num_params": lm.num_params(fit.state.params), "steps": cfg.steps,
            "train_seconds": seconds, "metrics": os.path.join(CELLS_DIR, name)}


# ----------------------------------------------------------------------------- sweep


def _mean_curve(cells: Sequence[dict]) -> tuple[list[int], list[float]]:
    """The seeds' val-accuracy curves averaged on the steps they share."""
    curves = [dict(zip(c.get("curve_steps", []), c.get("curve_val_acc", []), strict=True))
              for c in cells if not c.get("diverged")]
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    return steps, [float(np.mean([c[s] for c in curves])) for s in steps]


def _no_nan(d: dict) -> dict:
    """`d` with NaN numbers as None (`stats.plateau` of a short curve), so results.json
    round-trips equal."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in d.items()}


def summarize(cells: Sequence[dict]) -> list[dict]:
    """Best learning rate per (mixer, d_model, L, n_kv).

    The lr is chosen by mean `val_acc` over seeds (ties: the smaller lr); the row reports that
    lr's `test_acc` per seed (`test_acc_by_seed`), its mean, 95 % interval (`test_interval`,
    `experiments.stats.interval`) and std, the mean `val_acc`, every lr's mean test accuracy
    in `by_lr`, the mean val-accuracy curve (`curve_steps`, `curve_val_acc`) and whether it
    has plateaued (`plateau`, `experiments.stats.plateau` with mode "max").
    """
    groups: dict = {}
    for c in cells:
        key = (c["mixer"], c["d_model"], c["seq_len"], c["num_kv_pairs"])
        groups.setdefault(key, {}).setdefault(c["lr"], []).append(c)
    rows = []
    for (mixer, d, L, n_kv), by_lr in groups.items():
        mean = lambda cs, f: float(np.mean([c[f] for c in cs]))
        best = max(by_lr, key=lambda lr: (mean(by_lr[lr], "val_acc"), -lr))
        cs = sorted(by_lr[best], key=lambda c: c["seed"])
        tests = [c["test_acc"] for c in cs]
        steps, curve = _mean_curve(cs)
        rows.append({"mixer": mixer, "d_model": d, "seq_len": L, "num_kv_pairs": n_kv,
                     "best_lr": best, "test_acc": float(np.mean(tests)),
                     "test_acc_std": float(np.std(tests)),
                     "test_interval": stats.interval(tests),
                     "test_acc_by_seed": {str(c["seed"]): c["test_acc"] for c in cs},
                     "val_acc": mean(cs, "val_acc"), "n_seeds": len(cs),
                     "by_lr": {f"{lr:g}": mean(v, "test_acc") for lr, v in sorted(by_lr.items())},
                     "curve_steps": steps, "curve_val_acc": curve,
                     "plateau": _no_nan(stats.plateau(steps, curve, mode="max"))})
    order = {m: i for i, m in enumerate(MIXERS)}
    return sorted(rows, key=lambda r: (r["seq_len"], r["num_kv_pairs"], r["d_model"],
                                       order[r["mixer"]]))


def claim_check(rows: Sequence[dict]) -> list[dict]:
    """Per (d_model, L, n_kv) and `PAIRS` entry present in `rows`: the Q-Delta variant against
    its DeltaNet baseline, each at its own best lr, paired per seed on test accuracy
    (`experiments.stats.compare(qdelta, deltanet, direction="greater")`, over the seeds both
    have); `verdict` is the claim's ("reproduced": Q-Delta's advantage excludes 0), and
    `baseline_plateau` says whether the baseline's mean val curve had stopped improving."""
    out = []
    by = {(r["mixer"], r["d_model"], r["seq_len"], r["num_kv_pairs"]): r for r in rows}
    cells = sorted({k[1:] for k in by})
    for d, L, n_kv in cells:
        for q, base in PAIRS:
            if (q, d, L, n_kv) not in by or (base, d, L, n_kv) not in by:
                continue
            rq, rb = by[(q, d, L, n_kv)], by[(base, d, L, n_kv)]
            seeds = sorted(set(rq["test_acc_by_seed"]) & set(rb["test_acc_by_seed"]), key=int)
            if not seeds:
                continue
            a = [rq["test_acc_by_seed"][s] for s in seeds]
            b = [rb["test_acc_by_seed"][s] for s in seeds]
            cmp = stats.compare(a, b, direction="greater")
            out.append({"qdelta_mixer": q, "baseline": base, "d_model": d, "seq_len": L,
                        "num_kv_pairs": n_kv, "seeds": [int(s) for s in seeds],
                        "qdelta_lr": rq["best_lr"], "baseline_lr": rb["best_lr"],
                        "qdelta": stats.interval(a), "baseline_acc": stats.interval(b),
                        "difference": cmp, "verdict": cmp["verdict"],
                        "baseline_plateau": rb["plateau"], "qdelta_plateau": rq["plateau"]})
    return out


def run(cfg: ExperimentConfig, workdir: str, *, progress: bool = True,
        mesh: Mesh | None = None) -> dict:
    """Runs the missing cells of the sweep into `workdir` on `mesh` (default one device);
    returns the results dict (`experiment`, `fixed`, `cells`, `summary`) and writes the plots
    (process 0 only).

    Raises:
      ValueError: `workdir` holds another experiment, or this one with other fixed settings;
        or a model cannot train on `mesh`.
    """
    cfg.check_mesh(mesh)
    sweep = ResultsFile(workdir, EXPERIMENT, fixed=cfg.fixed())
    sweep.write()  # results.json first, so the cells/ folder never makes the workdir foreign
    done = sweep.done(KEY)
    todo = [(m, d, s, lr, seed) for s in cfg.settings for seed in cfg.seeds
            for d in cfg.d_models for m in cfg.mixers for lr in cfg.lrs
            if (m, d, s[0], s[1], lr, seed) not in done]
    bar = tqdm(total=len(todo) * cfg.steps, desc=EXPERIMENT, unit="step",
               disable=not progress or not mesh_flags.is_main(), dynamic_ncols=True)
    for m, d, s, lr, seed in todo:
        bar.set_postfix_str(cell_name(m, d, *s, lr, seed), refresh=False)
        cell = train_cell(cfg, m, d, tuple(s), lr, seed, workdir, bar, mesh=mesh)
        cells = [*sweep.cells, cell]
        sweep.add(cell, summary=_summary(cfg, cells))
    bar.close()
    sweep.write(summary=_summary(cfg, sweep.cells))
    if mesh_flags.is_main():
        rows, chance = sweep.summary["best_lr"], 2.0 / cfg.vocab_size
        plot_curves(rows, os.path.join(workdir, PLOT), chance=chance, title=plot_title(cfg))
        if len({r["d_model"] for r in rows}) > 1:
            plot(rows, os.path.join(workdir, WIDTH_PLOT), chance=chance, title=plot_title(cfg))
    return {"experiment": EXPERIMENT, "fixed": sweep.fixed, "cells": sweep.cells,
            "summary": sweep.summary}


def plot_title(cfg: ExperimentConfig) -> str:
    scale = "paper scale" if cfg.is_paper_scale else "reduced CPU setting"
    return (f"MQAR, V={cfg.vocab_size}, {cfg.steps} steps × batch {cfg.batch_size}, "
            f"{len(cfg.seeds)} seeds\n({scale})")


def _summary(cfg: ExperimentConfig, cells: Sequence[dict]) -> dict:
    rows = summarize(cells)
    return {"chance": 2.0 / cfg.vocab_size, "paper_scale": cfg.is_paper_scale,
            "best_lr": rows, "claims": claim_check(rows)}


_STYLES = {"qdelta": "-", "gated_qdelta": "-", "deltanet": "--", "gated_deltanet": "--",
           "softmax": ":"}


def plot_curves(rows: Sequence[dict], path: str, *, chance: float, title: str = "MQAR") -> None:
    """Mean val accuracy against step at each mixer's best lr: one panel per (d_model, L, n_kv),
    one line per mixer (`summarize` rows' `curve_*`)."""
    panels = sorted({(r["d_model"], r["seq_len"], r["num_kv_pairs"]) for r in rows})
    fig, axes = _accuracy_panels(len(panels), 3.8)
    for ax, (d, L, n_kv) in zip(axes, panels, strict=False):
        for r in rows:
            if (r["d_model"], r["seq_len"], r["num_kv_pairs"]) == (d, L, n_kv) and r[
                    "curve_steps"]:
                ax.plot(r["curve_steps"], r["curve_val_acc"], linestyle=_STYLES[r["mixer"]],
                        color=_color(r["mixer"]),
                        label=f"{r['mixer']} (lr {r['best_lr']:g}, {r['n_seeds']} seeds)")
        ax.set_title(f"d={d}, L={L}, n_kv={n_kv}")
        ax.set_xlabel("step")
    _save_accuracy_panels(fig, axes, path, chance=chance, title=title,
                          ylabel="val accuracy (mean over seeds)", legend_size=7)


def _color(mixer: str) -> str:
    """One colour per mixer across every panel and plot."""
    return f"C{MIXERS.index(mixer)}"


def _accuracy_panels(n: int, width: float):
    """A row of `n` (at least 1) panels sharing the accuracy axis: `(figure, axes)`."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(5.0, width * n), 3.8), layout="constrained")
    return fig, fig.subplots(1, max(1, n), squeeze=False, sharey=True)[0]


def _save_accuracy_panels(fig, axes, path: str, *, chance: float, title: str, ylabel: str,
                          legend_size: int) -> None:
    """Chance line, [0, 1] range and grid on every panel, the labels, legend and title; writes
    the PNG."""
    for ax in axes:
        ax.axhline(chance, color="grey", lw=0.8, label="chance")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    for ax in axes:  # panels may hold different mixers: each names its own lines
        ax.legend(fontsize=legend_size)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)


def plot(rows: Sequence[dict], path: str, *, chance: float, title: str = "MQAR") -> None:
    """Best-lr test accuracy against d_model: one panel per (L, n_kv), one line per mixer.

    Args:
      rows: `summarize` rows.
      path: the PNG to write.
      chance: the accuracy of guessing a value (drawn as a grey line).
      title: the figure title.
    """
    settings = sorted({(r["seq_len"], r["num_kv_pairs"]) for r in rows})
    fig, axes = _accuracy_panels(len(settings), 3.6)
    for ax, (L, n_kv) in zip(axes, settings, strict=False):
        for mixer in MIXERS:
            pts = sorted((r["d_model"], r["test_acc"]) for r in rows
                         if (r["mixer"], r["seq_len"], r["num_kv_pairs"]) == (mixer, L, n_kv))
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", linestyle=_STYLES[mixer],
                        color=_color(mixer), label=mixer)
        ax.set_xscale("log", base=2)
        ds = sorted({r["d_model"] for r in rows})
        ax.set_xticks(ds, [str(d) for d in ds])
        ax.set_title(f"L={L}, n_kv={n_kv}")
        ax.set_xlabel("d_model")
    _save_accuracy_panels(fig, axes, path, chance=chance, title=title,
                          ylabel="MQAR accuracy (best lr, test)", legend_size=8)


# ----------------------------------------------------------------------------- CLI


def parse_settings(items: Sequence[str]) -> tuple[tuple[int, int], ...]:
    """`["64:4", "128:8"]` → `((64, 4), (128, 8))`."""
    out = []
    for item in items:
        parts = item.split(":")
        try:
            if len(parts) != 2:
                raise ValueError
            out.append((int(parts[0]), int(parts[1])))
        except ValueError:
            raise app.UsageError(f"--settings: expected L:n_kv pairs like 64:4,128:8, got "
                                 f"{item!r}") from None
    return tuple(out)


def _numbers(name: str, items: Sequence[str], kind: type) -> tuple:
    try:
        return tuple(kind(x) for x in items)
    except ValueError:
        raise app.UsageError(f"--{name}: expected a comma-separated list of {kind.__name__}s, "
                             f"got {','.join(items)!r}") from None


def config_from_flags(fv: flags.FlagValues = FLAGS) -> ExperimentConfig:
    """The `ExperimentConfig` of the parsed flags `fv`; a bad grid raises `app.UsageError`."""
    if fv.full and fv.controls:
        raise app.UsageError("--full and --controls are two presets; give one")
    over = dict(FULL) if fv.full else dict(CONTROLS) if fv.controls else {}
    if fv.mixers is not None:
        over["mixers"] = tuple(fv.mixers)
    if fv.d_models is not None:
        over["d_models"] = _numbers("d_models", fv.d_models, int)
    if fv.settings is not None:
        over["settings"] = parse_settings(fv.settings)
    if fv.lrs is not None:
        over["lrs"] = _numbers("lrs", fv.lrs, float)
    if fv.seeds is not None:
        over["seeds"] = _numbers("seeds", fv.seeds, int)
    for name in ("steps", "batch_size", "vocab_size", "num_train", "num_eval", "eval_every",
                 "ffn"):
        if getattr(fv, name) is not None:
            over[name] = getattr(fv, name)
    if fv.init_std is not None:
        over["init_std"] = None if fv.init_std == FAN_IN else _numbers(
            "init_std", [fv.init_std], float)[0]
    try:
        return ExperimentConfig(**over)
    except ValueError as e:  # a bad grid is a usage error of the command line
        raise app.UsageError(str(e)) from None


def describe(cfg: ExperimentConfig) -> str:
    scale = ("paper scale" if cfg.is_paper_scale else
             f"REDUCED setting (paper: V={mqar.MQAR_VOCAB_SIZE}, (L, n_kv) in "
             f"{list(mqar.MQAR_SETTINGS)}, 100k train examples, d_model up to 256+)")
    init = "fan-in" if cfg.init_std is None else f"N(0, {cfg.init_std:g}²)"
    return (f"MQAR sweep, {scale}:\n  vocab={cfg.vocab_size} settings={list(cfg.settings)} "
            f"d_models={list(cfg.d_models)} lrs={list(cfg.lrs)} seeds={list(cfg.seeds)}\n"
            f"  steps={cfg.steps} batch_size={cfg.batch_size} num_train={cfg.num_train} "
            f"num_eval={cfg.num_eval} (val and test) eval_every={cfg.eval_every} init={init} "
            f"mixers={list(cfg.mixers)}")


def format_table(rows: Sequence[dict]) -> str:
    """Markdown table of `summarize` rows: test accuracy mean ± 95 % interval over seeds."""
    lines = ["| mixer | d_model | L | n_kv | best lr | seeds | test acc | val acc | "
             "val curve plateaued |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['mixer']} | {r['d_model']} | {r['seq_len']} | {r['num_kv_pairs']} "
                     f"| {r['best_lr']:g} | {r['n_seeds']} | {stats.fmt(r['test_interval'])} "
                     f"| {r['val_acc']:.3f} | {'yes' if r['plateau']['plateaued'] else 'no'} |")
    return "\n".join(lines)


def format_claims(claims: Sequence[dict]) -> str:
    """One line per paired comparison of `claim_check`."""
    lines = []
    for c in claims:
        lines.append(
            f"  d={c['d_model']} L={c['seq_len']} n_kv={c['num_kv_pairs']}: {c['qdelta_mixer']} "
            f"(lr {c['qdelta_lr']:g}) {stats.fmt(c['qdelta'])} vs {c['baseline']} (lr "
            f"{c['baseline_lr']:g}) {stats.fmt(c['baseline_acc'])}; difference "
            f"{stats.fmt(c['difference'], signed=True)}, signs {''.join(c['difference']['signs'])}"
            f" -> {c['verdict']}; baseline plateaued: {c['baseline_plateau']['plateaued']}")
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    mesh, cfg = mesh_flags.setup_sweep(config_from_flags)  # a bad flag: UsageError, here
    main = mesh_flags.is_main()
    if main:
        print(describe(cfg), flush=True)
    t0 = time.perf_counter()
    results = run(cfg, FLAGS.workdir, mesh=mesh)
    if not main:
        return
    print(format_table(results["summary"]["best_lr"]))
    print(f"chance = {results['summary']['chance']:.4f}")
    print("Claim: Q-Delta recalls at least as well as (Gated) DeltaNet, paired per seed:")
    print(format_claims(results["summary"]["claims"]))
    print(f"wall {time.perf_counter() - t0:.0f} s; wrote "
          f"{os.path.join(FLAGS.workdir, 'results.json')} and {PLOT}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
