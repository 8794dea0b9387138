"""Shared pieces of the HMM routing experiments (`routing_hmm`, `star_shift`, `mass_expand`).

A small MoE language model is trained on GINC-style mixture-of-HMM sequences
(`moejax.data.hmm`), whose tokens carry their latent label (`label = concept · S + state`), and
its routing is measured against that label. What lives here:

  ROUTERS / lm_config   named router variants (the experiment's names, e.g. `topk_switch`) and
                        the `LMConfig` of the small model for one of them, optionally under a
                        routing recipe (RECIPES: `synthetic` top-2 without aux loss, `lm` the
                        authors' top-1 + Switch 1e-2) with extra STAR options
  ModelSpec.gate_init   every router's gate N(0, 0.01²) (`authors`, default; `init_state` /
                        `train(gate_std=)` rescale the non-STAR gates) or std d^-1/2 (`library`)
  train_batches, batches  a seed's training stream, and fixed labelled eval batches (numpy
                        dicts; pass `dataclasses.replace(hmm_cfg, shift=λ)` for shifted data)
  train                 a seed's model trained by the library loop (`loop.fit`), with an
                        optional per-step callback
  evaluate              validation loss and the DESIGN §6 routing suite on labelled batches:
                        per-layer I(top-1 expert; label), load entropy, CV, dead experts, flip
                        rate against the previous evaluation's top-1 experts, and the joint
                        expert × label counts (layer-averaged scalars)

    spec = ModelSpec()
    hmm_cfg = hmm.HMMConfig()
    cfg = lm_config("star", spec, hmm_cfg, eta=5e-5, recipe="synthetic")
    state = train(cfg, TrainSpec(steps=600), hmm_cfg, seed,
                  gate_std=gate_std(spec))                          # a loop.TrainState
    val = batches(hmm_cfg, split="val", seed=12345, batch_size=32, num_batches=4)
    ev = evaluate(state.params, state.model_state, cfg, val, num_labels=hmm_cfg.num_labels)
    ev["mi"], ev["load_entropy"], ev["val_loss"]

Loads over an eval set are the mean of the per-batch load shares (every batch holds the same
number of tokens, so for a fixed k this equals counts over the whole set; dead = zero share in
every batch). MI is computed per MoE layer from the joint count table summed over the eval set
and then averaged over layers (`mi`), and also reported per layer (`mi_layers`).

Devices: `train` and `init_state` take the sweep's `mesh=` (default one device) and `evaluate`
the same mesh, on which it places the eval batches (rows split over the mesh's data×fsdp where
they divide, else replicated) and from which it returns replicated results, so a model trained
on a multi-device (or multi-process) mesh is evaluated where it lives.

Axis letters: L MoE layers, E experts, N tokens, C·S latent labels.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from experiments import sweep
from moejax.data import hmm
from moejax.models import lm
from moejax.moe import metrics as moe_metrics
from moejax.parallel import mesh as mesh_lib
from moejax.parallel import sharding as sharding_lib
from moejax.train import loop
from moejax.train.steps import device_batch

# Experiment-level router names -> (moejax router, fixed router kwargs). "star" takes `eta`.
ROUTERS: dict[str, tuple[str, dict[str, Any]]] = {
    "topk_switch": ("topk", {"load_balance_weight": 1e-2, "z_loss_weight": 0.0}),
    "topk": ("topk", {"load_balance_weight": 0.0, "z_loss_weight": 0.0}),
    "aux_free": ("aux_free", {}),
    "expert_choice": ("expert_choice", {"capacity_factor": 1.0}),
    "top_p": ("top_p", {"top_p": 0.5, "load_balance_weight": 0.0}),
    "star": ("star", {"load_balance_weight": 0.0}),
}
ROUTER_NAMES = tuple(ROUTERS)
LABEL_KEYS = ("label", "state", "concept")

# The two routing recipes STAR is compared under (the same for STAR and top-k): the authors'
# synthetic setting (top-2, no aux loss) and their LM pre-training (`lm_recipe` of
# `moejax.routers.star`: top-1, Switch loss 1e-2 on the router's probabilities, no z-loss).
# `top_k` replaces `ModelSpec.top_k`; `load_balance_weight` is set on "topk" and "star" (the
# other routers keep their own balancing).
RECIPES: dict[str, dict[str, Any]] = {
    "synthetic": {"top_k": 2, "load_balance_weight": 0.0},
    "lm": {"top_k": 1, "load_balance_weight": 1e-2},
}
# Router gate inits: "authors" — every router's W_g ~ N(0, 0.01²) (their `--init-method-std
# 0.01` applies to every Megatron router, STAR's and the baselines'); "library" — std d^-1/2
# (moejax's top-k init; STAR with `gate_init_std=None`).
GATE_INITS = ("authors", "library")
AUTHORS_GATE_STD = 0.01


def num_labels(hmm_cfg: hmm.HMMConfig, label_key: str) -> int:
    """How many values the latent label `label_key` (one of LABEL_KEYS) takes."""
    return {"label": hmm_cfg.num_labels, "state": hmm_cfg.num_states,
            "concept": hmm_cfg.num_concepts}[label_key]


def check_router(name: str) -> None:
    """Raises ValueError naming the valid routers unless `name` is one of ROUTERS."""
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; valid routers: {', '.join(ROUTER_NAMES)}")


def check_eta(eta: float, *, allow_zero: bool = True) -> None:
    """Raises ValueError unless `eta` (STAR's GHA step size) is a number ≥ 0 (> 0 without
    `allow_zero`; η = 0 is the frozen-random-V control)."""
    bad = isinstance(eta, bool) or not isinstance(eta, int | float) or not eta >= 0
    if bad or (not allow_zero and eta == 0):
        want = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"eta (STAR's GHA step size) must be a number {want}, got {eta!r}")


def check_recipe(recipe: str | None) -> None:
    """Raises ValueError unless `recipe` is None or one of RECIPES."""
    if recipe is not None and recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {tuple(RECIPES)} (or None), got {recipe!r}")


def router_label(name: str, eta: float | None = None) -> str:
    """The name a run is stored and plotted under: `star_eta5e-05` for STAR, else `name`."""
    check_router(name)
    if name == "star":
        check_eta(eta)
        return f"star_eta{eta:g}"
    return name


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ModelSpec:
    """The small MoE LM (the vocabulary comes from the HMM config). Validated by `LMConfig`."""

    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 2
    head_dim: int = 32
    d_ff: int = 128
    num_experts: int = 8
    top_k: int = 2
    mixer: str = "softmax"
    gate_init: str = "authors"

    def __post_init__(self):
        if self.gate_init not in GATE_INITS:
            raise ValueError(f"gate_init must be one of {GATE_INITS}, got {self.gate_init!r}")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class TrainSpec:
    """Optimiser and batch settings (AdamW, warmup + cosine; see `moejax.train.loop`).

    `weight_decay` (0.01, Megatron's default in the authors' runs) decays every matrix, STAR's
    free `R` included (`moejax.train.optim`'s mask), and no vector (σ(a), norms).
    """

    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01

    def train_config(self, seq_len: int) -> loop.TrainConfig:
        return loop.TrainConfig(steps=self.steps, lr=self.lr, batch_size=self.batch_size,
                                warmup_steps=min(self.warmup_steps, self.steps),
                                seq_len=seq_len, weight_decay=self.weight_decay)


# The paper-scale (`--full`) model, training and data shared by routing_hmm and star_shift.
FULL_SETTING = dict(
    model=ModelSpec(d_model=256, num_layers=4, num_heads=4, head_dim=64, d_ff=512,
                    num_experts=16),
    train=TrainSpec(steps=5000, batch_size=64, lr=1e-3, warmup_steps=250),
    hmm=hmm.HMMConfig(num_concepts=8, num_states=16, vocab_size=256, seq_len=256,
                      emission_support=16))


def lm_config(router: str, spec: ModelSpec, hmm_cfg: hmm.HMMConfig, *, eta: float | None = None,
              test_time_update: bool = False, recipe: str | None = None,
              star_options: Mapping[str, Any] | None = None) -> lm.LMConfig:
    """The `LMConfig` of the small model routed by `router` (a name in ROUTERS).

    Args:
      router: experiment router name; `"star"` needs `eta` (≥ 0; 0 = frozen random V).
      spec: model sizes and the gate init (`spec.gate_init`; for routers other than STAR the
        "authors" init is applied by `init_state`, STAR gets `gate_init_std`).
      hmm_cfg: the data (vocabulary and sequence length).
      eta: STAR's GHA step size; ignored by other routers.
      test_time_update: STAR only: take the GHA step at eval (`train=False`) too. Params and
        state have the same structure either way, so a trained model can be re-run with it.
      recipe: None (`spec.top_k`, the routers' own kwargs) or a name in RECIPES: its `top_k`
        for every router, its `load_balance_weight` for "topk" and "star".
      star_options: extra `moejax.routers.star.Config` fields (e.g. `v_dtype`, `gha_steps`).

    Raises:
      ValueError: unknown router (the message lists the valid ones) or recipe, a bad eta for
        STAR, or test_time_update / star_options for a router other than STAR.
    """
    check_router(router)
    check_recipe(recipe)
    base_name, kwargs = ROUTERS[router]
    kwargs = dict(kwargs)
    top_k = spec.top_k
    if recipe is not None:
        top_k = RECIPES[recipe]["top_k"]
        if router in ("topk", "star"):
            kwargs["load_balance_weight"] = RECIPES[recipe]["load_balance_weight"]
    if router == "star":
        check_eta(eta)
        kwargs.update(eta=float(eta), test_time_update=bool(test_time_update),
                      gate_init_std=AUTHORS_GATE_STD if spec.gate_init == "authors" else None)
        kwargs.update(star_options or {})
    elif test_time_update or star_options:
        raise ValueError(f"test_time_update and star_options are STAR options; router "
                         f"{router!r} has none")
    return lm.LMConfig(vocab_size=hmm_cfg.vocab_size, d_model=spec.d_model,
                       num_layers=spec.num_layers, num_heads=spec.num_heads,
                       head_dim=spec.head_dim, d_ff=spec.d_ff, mixer=spec.mixer,
                       moe=dict(num_experts=spec.num_experts, top_k=top_k, router=base_name,
                                router_kwargs=tuple(sorted(kwargs.items()))),
                       max_seq_len=max(hmm_cfg.seq_len, 8), chunk_size=min(64, hmm_cfg.seq_len))


# ----------------------------------------------------------------------------- data


def batches(hmm_cfg: hmm.HMMConfig, *, split: str, seed: int, batch_size: int,
            num_batches: int) -> list[dict[str, np.ndarray]]:
    """`num_batches` fixed batches (in order, no shuffling) of `<int32>[B, T]` arrays `inputs`,
    `targets`, `concept`, `state`, `label`; a pure function of the arguments."""
    ds = hmm.make_hmm_dataset(hmm_cfg, split=split, seed=seed, batch_size=batch_size,
                              num_examples=batch_size * num_batches, num_epochs=1, shuffle=False)
    return [ds[i] for i in range(num_batches)]


def train_batches(hmm_cfg: hmm.HMMConfig, *, seed: int, batch_size: int,
                  steps: int) -> Iterator[dict[str, np.ndarray]]:
    """The training batches of one seed, one per step (lazily generated)."""
    ds = hmm.make_hmm_dataset(hmm_cfg, split="train", seed=seed, batch_size=batch_size,
                              num_examples=batch_size * steps, num_epochs=1, shuffle=False)
    for i in range(steps):
        yield ds[i]


def model_batch(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The model's part of a labelled batch (`inputs`, `targets`)."""
    return {"inputs": batch["inputs"], "targets": batch["targets"]}


# ----------------------------------------------------------------------------- training


def init_state(cfg: lm.LMConfig, train: TrainSpec, seq_len: int, seed: int, *,
               mesh: Mesh | None = None, gate_std: float | None = None) -> loop.TrainState:
    """A fresh `loop.TrainState` for `cfg` (init key `jax.random.key(seed)`; the compiled init
    is shared by the seeds) on `mesh` (default one device).

    `gate_std`: if given, the `w_g` of every MoE router other than STAR (whose config draws its
    own) is rescaled from the library's N(0, 1/d) to N(0, gate_std²) — the same draw, scaled by
    `gate_std·√d` (the optimizer's moments start at 0 whatever the values).
    """
    state = loop.init_state(lm, cfg, train.train_config(seq_len), jax.random.key(seed),
                            mesh=mesh)
    if gate_std is None or cfg.moe is None or cfg.moe.router == "star":
        return state
    scale = gate_std * cfg.d_model**0.5
    blocks = [dict(b) for b in state.params["blocks"]]
    for b in blocks:
        router = b.get("ffn", {}).get("router") if isinstance(b.get("ffn"), dict) else None
        if router is not None and "w_g" in router:
            b["ffn"] = {**b["ffn"], "router": {**router, "w_g": router["w_g"] * scale}}
    return dataclasses.replace(state, params={**state.params, "blocks": blocks})


def gate_std(spec: ModelSpec) -> float | None:
    """The `init_state(gate_std=)` of `spec.gate_init` (None: the library's init)."""
    return AUTHORS_GATE_STD if spec.gate_init == "authors" else None


def train(cfg: lm.LMConfig, train_spec: TrainSpec, hmm_cfg: hmm.HMMConfig, seed: int, *,
          callback=None, mesh: Mesh | None = None,
          gate_std: float | None = None) -> loop.TrainState:
    """Trains a fresh model on the un-shifted `hmm_cfg` stream of `seed` with the library loop
    (`loop.fit`; the seeds of a config share one compiled step; router state — aux-free bias,
    STAR's V — is updated inside the step).

    `callback(step, state, metrics)`, if given, runs before the first step (step 0, metrics
    None) and after every step (metrics: the step's device metrics). `mesh`: where it trains
    (default one device; batch rows split over its data×fsdp). `gate_std`: as `init_state`'s.
    """
    tcfg = train_spec.train_config(hmm_cfg.seq_len)
    data = (model_batch(b) for b in train_batches(hmm_cfg, seed=seed,
                                                  batch_size=train_spec.batch_size,
                                                  steps=train_spec.steps))
    state = init_state(cfg, train_spec, hmm_cfg.seq_len, seed, mesh=mesh, gate_std=gate_std)
    return loop.fit(state, data,
                    model=lm, model_cfg=cfg, train_cfg=tcfg,
                    rng=jax.random.key(seed + 1_000_003), callback=callback, mesh=mesh).state


def check_mesh(mesh: Mesh | None, models: Mapping[str, lm.LMConfig], train_spec: TrainSpec,
               seq_len: int) -> None:
    """Refuses, before any training, a mesh that one of `models` (name -> config, trained with
    `train_spec`) cannot train on: the library's ValueError (`experiments.sweep.check_mesh`),
    naming the model. The evaluation takes any batch size."""
    tcfg = train_spec.train_config(seq_len)
    sweep.check_mesh(mesh, [(name, lm, cfg, tcfg) for name, cfg in models.items()])


# ----------------------------------------------------------------------------- evaluation


_EVAL_STATIC = ("cfg", "num_labels", "update_state")


def _eval_batch_fn(params, state, inputs, targets, labels, *, cfg: lm.LMConfig, num_labels: int,
                   update_state: bool):
    """One batch: (ce, top1 [L, N], load [L, E], joint [L, E, C·S], avg_k, new_state)."""
    logits, new_state, aux = lm.apply(params, state, inputs, cfg=cfg, train=False)
    ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))
    joint = jax.vmap(lambda t: moe_metrics.joint_counts(t, labels, cfg.moe.num_experts,
                                                        num_labels))(aux["top1"])
    avg_k = aux["metrics"].get("avg_k", jnp.float32(jnp.nan))
    return ce, aux["top1"], aux["load"], joint, avg_k, (new_state if update_state else state)


_eval_batch = jax.jit(_eval_batch_fn, static_argnames=_EVAL_STATIC)


@functools.lru_cache(maxsize=8)
def _eval_batch_on(mesh: Mesh):
    """`_eval_batch` on `mesh`, its results replicated (readable on every process)."""
    return jax.jit(_eval_batch_fn, static_argnames=_EVAL_STATIC,
                   out_shardings=NamedSharding(mesh, P()))


def _to_mesh(x, mesh: Mesh | None):
    """A host array as an eval input: as it is without a mesh; on `mesh`, rows split over its
    data×fsdp where they divide evenly, else replicated (every process passes the same array)."""
    if mesh is None:
        return jnp.asarray(x)
    spec = (sharding_lib.batch_spec(mesh) if np.shape(x)[0] % mesh_lib.num_batch_shards(mesh) == 0
            else P())
    return device_batch(x, NamedSharding(mesh, spec))


_mi_from_counts = jax.jit(moe_metrics.mutual_information_from_counts)
_load_suite = jax.jit(lambda counts, n, active: moe_metrics.load_metrics_from_counts(
    counts, num_tokens=n, active=active)[1])


def mi_nats(table: np.ndarray) -> float:
    """I(expert; label) in nats of one `[E, C·S]` joint count table
    (`moejax.moe.metrics.mutual_information_from_counts`)."""
    return float(_mi_from_counts(jnp.asarray(table, jnp.float32)))


def evaluate(params, model_state, cfg: lm.LMConfig, eval_batches: Sequence[Mapping[str, Any]],
             *, label_key: str = "label", num_labels: int | None = None,
             prev_top1: np.ndarray | None = None, update_state: bool = False,
             mesh: Mesh | None = None) -> dict[str, Any]:
    """Validation loss and the routing suite over a fixed set of labelled batches.

    Args:
      params, model_state: the model (`lm.init` structure).
      cfg: its `LMConfig` (an MoE model).
      eval_batches: labelled batches (`batches(...)`), all of the same shape.
      label_key: the latent label the MI is measured against (`label`, `state` or `concept`).
      num_labels: number of values of that label (default: 1 + the largest seen).
      prev_top1: the `[L, N_total]` top-1 experts of the previous evaluation on the same batches
        (for the flip rate); None gives `flip_rate` None.
      update_state: return the model state after the batches (each forward's new router state
        feeds the next; only STAR with `test_time_update` changes it at eval) — test-time
        adaptation on a stream. False: every batch sees `model_state`.
      mesh: the mesh the model lives on (the one it was trained on); None: the batches go to
        the default device, as the params do when trained without a mesh.

    Returns:
      dict: `val_loss` (mean CE, nats/token), `mi` (nats, mean over layers), `mi_layers`,
      `load_entropy`, `cv`, `max_vio`, `dead_experts` (means over layers of the set's load;
      inactive MASS slots, `state["router"]["active"]` False, are left out),
      `avg_k`, `flip_rate` (or None), `top1` (`<int32>[L, N_total]`, for the next call),
      `joint` (`<int64>[L, E, num_labels]`), `load` (`[L, E]`), `model_state`.
    """
    if label_key not in LABEL_KEYS:
        raise ValueError(f"label_key must be one of {LABEL_KEYS}, got {label_key!r}")
    if cfg.ffn != "moe":
        raise ValueError("evaluate needs an MoE model (ffn='moe')")
    if num_labels is None:
        num_labels = 1 + max(int(np.max(b[label_key])) for b in eval_batches)
    ces, top1s, loads, joint, ks = [], [], [], None, []
    state = model_state
    eval_batch = _eval_batch if mesh is None else _eval_batch_on(mesh)
    for b in eval_batches:
        ce, top1, load, jt, k, new_state = eval_batch(
            params, state, _to_mesh(b["inputs"], mesh), _to_mesh(b["targets"], mesh),
            _to_mesh(np.asarray(b[label_key]).reshape(-1), mesh), cfg=cfg,
            num_labels=num_labels, update_state=update_state)
        if update_state:
            state = new_state
        ces.append(float(ce))
        top1s.append(np.asarray(top1))
        loads.append(np.asarray(load))
        ks.append(float(k))
        joint = np.asarray(jt) if joint is None else joint + np.asarray(jt)
    load = np.mean(loads, axis=0)  # [L, E]
    top1 = np.concatenate(top1s, axis=1)
    n = top1.shape[1]
    suites = [_load_suite(jnp.asarray(row * n, jnp.float32), n, _active(state, i))
              for i, row in enumerate(load)]
    mean = {name: float(np.mean([float(s[name]) for s in suites]))
            for name in ("load_entropy", "cv", "max_vio", "dead_experts")}
    mi_layers = [mi_nats(t) for t in joint]
    flip = None
    if prev_top1 is not None:
        flip = float(np.mean(np.asarray(prev_top1) != top1))
    return {"val_loss": float(np.mean(ces)), "mi": float(np.mean(mi_layers)),
            "mi_layers": mi_layers, **mean, "avg_k": float(np.mean(ks)), "flip_rate": flip,
            "top1": top1, "joint": joint.astype(np.int64), "load": load, "model_state": state}


def _active(model_state, layer: int):
    """The `[E]` active-slot mask of MoE layer `layer` (MASS expansion), or None (all active)."""
    router = model_state["blocks"][layer].get("router", {}) if model_state.get("blocks") else {}
    active = router.get("active") if isinstance(router, dict) else None
    return None if active is None else np.asarray(active)  # replicated: readable everywhere


def scalars(ev: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON-able scalar part of an `evaluate` result (drops arrays and the state)."""
    return {k: v for k, v in ev.items() if k not in ("top1", "joint", "load", "model_state")}


def mean_std(values: Iterable[float | None]) -> dict[str, float]:
    """`{"mean", "std", "n"}` over the non-None values (NaN mean if none)."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "n": len(vals)}
