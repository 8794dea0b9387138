"""MASS expansion: grow a MoE layer from K_init to K_max experts on fixed slots (DESIGN §5).

MASS (Park & Park 2025, "How Many Experts Are Enough?"): a gradient-norm drift test picks an
expert whose gradient is nearly orthogonal to its weights; it is cloned (expert + gate row) into a
free slot, the source keeps only the radial part of its gradient, the copy gets all of it, and a
redundancy loss pushes the two gate rows apart. Axis letters: K = K_max slots, d model width,
f expert hidden width, W = window ω.

All K slots exist from the start; `exp_state["active"]` (`<bool>[K]`) reaches the router through
`with_active` (inactive slots get -inf logits), so growth changes no shape and never recompiles.
Every function is pure and jittable (`cfg` static). `mass_hooks` puts all of it into the
library's training loop (`moejax.train.steps.StepHooks`, the expansion states in
`TrainState.extra`) for `moejax.models.lm`. One training step of one MoE layer:

    loss, grads = jax.value_and_grad(loss_fn)(params)     # loss_fn: with_active + redundancy_loss
    updates, opt_state = opt.update(project_gradients(grads, params, exp_state), opt_state, params)
    params = optax.apply_updates(params, updates)
    params, opt_state, exp_state, info = expansion_step(params, grads, opt_state, exp_state,
                                                        step, cfg)
    exp_state = removal_update(exp_state, loss, loss_newest_masked, step, cfg)  # optional

`params` is the layer's `{"router": {"w_g": [K, d], ...}, "experts": {...}}`; `opt_state` may cover
a larger tree, in which the layer sits at `cfg.opt_prefix`.

Drift statistic (our reading of §5; taking mean and std over the same window that is summed would
make Σz ≡ 0). A slot's first T_warm norms (counted from its (re)start) only fill the reference;
then each step `z_t = (g_t − mean)/std` against the previous n = min(age, ω) norms (ddof 1),
`s̃_t = Σ z / √m` over the last m ≤ ω z-scores, `p_t = 1 − Φ(s̃_t)`, drift iff `p_t < p_threshold`.
One-sided: only rising gradient norms count. Under i.i.d. noise the overlapping references make
Var(s̃) ≈ 2/3 once m ≈ ω, so the test is conservative there (≈0.3% false alarms per step and slot).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.scipy.stats import norm

from moejax.models import trees
from moejax.train.steps import StepContext, StepHooks, TrainState
from moejax.validation import check_choice, check_int, check_range

Array = jax.Array

# Input-side ("fc1") leaves of an expert bank: SwiGLU has both, the GELU MLP only w_up.
_FC1_LEAVES = ("w_gate", "w_up")
# Param paths whose moments `reset_slot_moments` zeroes by default (missing ones are skipped).
DEFAULT_SLOT_PATHS = (("experts", "w_gate"), ("experts", "w_up"), ("experts", "w_down"),
                      ("router", "w_g"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExpansionConfig:
    """MASS growth options; hashable, pass it as a static argument.

    Attributes:
      total_steps: training steps (≥ 1); the phase lengths below are fractions of it.
      k_init: experts active at the start, 1 ≤ k_init ≤ k_max.
      k_max: expert slots K allocated up front.
      warm_steps: T_warm, steps of history a slot needs before it is tested (None:
        max(30, 5% of total_steps)).
      window: ω, length of the reference and z-score windows, ≥ 2 (None: max(60, 9% of steps)).
      p_threshold: drift when the one-sided p-value 1 − Φ(s̃) is below this, in (0, 1).
      cos_delta: δ; only clone when |cos(∇W_e, W_e)| < δ, in [0, 1].
      expand_fraction: cloning and removal happen only while step < expand_fraction·total_steps.
      redundancy_weight: weight of `redundancy_loss` (≥ 0).
      removal_patience: consecutive "masking the newest expert did not raise the loss" checks
        that remove it (≥ 1).
      router_leaves: router params with a leading K axis that are cloned with the expert.
      opt_prefix: path (dict keys / list indices) of this layer's params in the optimizer's tree.
      moment_fields: optimizer-state fields zeroed for a new clone (() disables the reset).
    """

    total_steps: int
    k_init: int = 8
    k_max: int = 16
    warm_steps: int | None = None
    window: int | None = None
    p_threshold: float = 0.01
    cos_delta: float = 1e-3
    expand_fraction: float = 0.1
    redundancy_weight: float = 0.01
    removal_patience: int = 3
    router_leaves: tuple[str, ...] = ("w_g",)
    opt_prefix: tuple = ()
    moment_fields: tuple[str, ...] = ("mu", "nu")

    def __post_init__(self):
        for name, lo in (("total_steps", 1), ("k_init", 1), ("k_max", 1), ("removal_patience", 1),
                         ("warm_steps", 0), ("window", 2)):
            if getattr(self, name) is not None or name not in ("warm_steps", "window"):
                check_int(name, getattr(self, name), lo=lo)  # None only where documented
        if self.k_init > self.k_max:
            raise ValueError(f"k_init={self.k_init} must be <= k_max={self.k_max}")
        check_range("p_threshold", self.p_threshold, 0.0, 1.0, hi_open=True)
        check_range("cos_delta", self.cos_delta, 0.0, 1.0, lo_open=False)
        check_range("expand_fraction", self.expand_fraction, 0.0, 1.0, lo_open=False)
        check_range("redundancy_weight", self.redundancy_weight, 0.0, float("inf"),
                    lo_open=False, hi_open=True)
        for name in ("router_leaves", "moment_fields", "opt_prefix"):
            value = getattr(self, name)
            if not isinstance(value, tuple):
                raise ValueError(f"{name} must be a tuple, got {value!r}")
        if not all(isinstance(s, str) for s in self.router_leaves + self.moment_fields):
            raise ValueError("router_leaves and moment_fields must hold strings")

    @property
    def t_warm(self) -> int:
        """T_warm = max(30, 5% of total_steps) unless `warm_steps` is given."""
        return self.warm_steps if self.warm_steps is not None else max(
            30, int(0.05 * self.total_steps))

    @property
    def omega(self) -> int:
        """ω = max(60, 9% of total_steps) unless `window` is given."""
        return self.window if self.window is not None else max(60, int(0.09 * self.total_steps))

    @property
    def expand_until(self) -> int:
        """First step at which cloning and removal stop."""
        return int(self.expand_fraction * self.total_steps)


def init_expansion_state(cfg: ExpansionConfig) -> dict[str, Array]:
    """Fixed-shape expansion state.

    Returns:
      dict with `active` `<bool>[K]` (first k_init True), `clone_src` `<int32>[K]` (source slot
      of each clone, -1 if none), `g_hist`, `z_hist` `<float32>[W, K]` ring buffers of gradient
      norms and z-scores, `age` `<int32>[K]` (steps of history since the slot's (re)start),
      `ptr` (next ring position), `newest` (slot of the latest clone, -1 if none), counters
      `n_clones`, `n_removed`, and `strikes` (removal patience count); scalars are `<int32>[]`.
    """
    k, w = cfg.k_max, cfg.omega
    i32 = lambda v: jnp.asarray(v, jnp.int32)
    return {
        "active": jnp.arange(k) < cfg.k_init, "clone_src": jnp.full((k,), -1, jnp.int32),
        "g_hist": jnp.zeros((w, k), jnp.float32), "z_hist": jnp.zeros((w, k), jnp.float32),
        "age": jnp.zeros((k,), jnp.int32), "ptr": i32(0), "newest": i32(-1),
        "n_clones": i32(0), "n_removed": i32(0), "strikes": i32(0),
    }


def with_active(moe_state: dict, exp_state: dict, *, drop_newest: bool = False) -> dict:
    """MoE layer state with `state["router"]["active"]` from `exp_state` (`drop_newest`: minus
    the newest clone, for the `loss_masked` of `removal_update`)."""
    active = exp_state["active"]
    if drop_newest:
        active = active & (jnp.arange(active.shape[0]) != exp_state["newest"])
    return {**moe_state, "router": {**moe_state.get("router", {}), "active": active}}


def _bcast(v: Array, leaf: Array) -> Array:
    return v.reshape(v.shape + (1,) * (leaf.ndim - v.ndim))


def _slot_dot(a: dict, b: dict) -> Array:
    """`<float32>[K]`: Σ over leaves and non-leading axes of a·b (two trees of `[K, ...]`)."""
    dots = jax.tree.map(lambda x, y: jnp.sum(
        (x.astype(jnp.float32) * y.astype(jnp.float32)).reshape(x.shape[0], -1), axis=1), a, b)
    return sum(jax.tree.leaves(dots))


def fc1_grad_norms(expert_grads: dict) -> Array:
    """`<float32>[K]` g = ‖∇W_fc1‖_F per slot: sqrt(‖∇w_gate‖² + ‖∇w_up‖²) (GELU bank: ‖∇w_up‖)."""
    fc1 = {k: v for k, v in expert_grads.items() if k in _FC1_LEAVES}
    if not fc1:
        raise ValueError(f"expert bank has none of {_FC1_LEAVES}: {sorted(expert_grads)}")
    return jnp.sqrt(_slot_dot(fc1, fc1))


def slot_cosine(expert_grads: dict, expert_params: dict) -> Array:
    """`<float32>[K]` cos(∇W_e, W_e), each expert's leaves flattened into one vector."""
    gw = _slot_dot(expert_grads, expert_params)
    gg, ww = _slot_dot(expert_grads, expert_grads), _slot_dot(expert_params, expert_params)
    return gw / jnp.sqrt(jnp.maximum(gg * ww, 1e-30))


def drift_test(exp_state: dict, g: Array, cfg: ExpansionConfig) -> tuple[dict, Array, Array]:
    """Records one step of gradient norms and tests every active slot for upward drift.

    Args:
      exp_state: from `init_expansion_state`.
      g: `<float32>[K]` this step's gradient norms (ignored for inactive slots).
      cfg: `ExpansionConfig` (ω, T_warm, p_threshold).

    Returns:
      `(exp_state, p_value, drift)`: `p_value` `<float32>[K]` = 1 − Φ(s̃) (1 where untested),
      `drift` `<bool>[K]` (see the module docstring for the statistic).
    """
    w = cfg.omega
    g = g.astype(jnp.float32)
    age, ptr, active = exp_state["age"], exp_state["ptr"], exp_state["active"]
    pos = jnp.arange(w)[:, None]
    ref = (ptr - 1 - pos) % w < jnp.minimum(age, w)  # [W, K] the last min(age, ω) norms
    n = jnp.sum(ref, axis=0)
    hist = exp_state["g_hist"]
    mean = jnp.sum(jnp.where(ref, hist, 0.0), axis=0) / jnp.maximum(n, 1)
    var = jnp.sum(jnp.where(ref, (hist - mean) ** 2, 0.0), axis=0) / jnp.maximum(n - 1, 1)
    std = jnp.maximum(jnp.sqrt(var), 1e-6 * jnp.abs(mean) + 1e-12)  # floor: rounding noise
    start = max(cfg.t_warm, 2)  # z-scores need a reference of at least T_warm (≥ 2) norms
    z = jnp.where(age >= start, (g - mean) / std, 0.0)
    g_hist = hist.at[ptr].set(g)
    z_hist = exp_state["z_hist"].at[ptr].set(z)
    new_age = jnp.where(active, age + 1, 0)
    new_ptr = (ptr + 1) % w
    m = jnp.clip(new_age - start, 0, w)  # z-scores recorded since the slot's (re)start
    zs = jnp.sum(jnp.where((new_ptr - 1 - pos) % w < m, z_hist, 0.0), axis=0)
    s = zs / jnp.sqrt(jnp.maximum(m, 1).astype(jnp.float32))
    tested = active & (m >= 1)
    p_value = jnp.where(tested, norm.sf(s), 1.0)  # sf = 1 − Φ, accurate in the tail
    drift = tested & (p_value < cfg.p_threshold)
    new_state = {**exp_state, "g_hist": g_hist, "z_hist": z_hist, "age": new_age, "ptr": new_ptr}
    return new_state, p_value, drift


def clone_expert(params: dict, src: Array, dst: Array, *, router_leaves: Sequence[str] = ("w_g",),
                 enabled: Array | bool = True) -> dict:
    """Copies slot `src` of every expert-bank leaf and of `router_leaves` into slot `dst`.

    Fixed-shape (`jnp.where` on a one-hot of `dst`), so `src`, `dst` (`<int>[]`) and `enabled`
    (`<bool>[]`; False returns `params` unchanged) may be traced. Other router leaves and
    `"shared"` are untouched. The copy is bitwise, so right after cloning slot `dst` has the same
    router logit and the same expert output as `src` for every token.
    """
    k = params["router"][router_leaves[0]].shape[0]
    sel = (jnp.arange(k) == dst) & enabled

    def copy(leaf):
        return jnp.where(_bcast(sel, leaf), jnp.take(leaf, src, axis=0)[None], leaf)

    router = {n: copy(v) if n in router_leaves else v for n, v in params["router"].items()}
    return {**params, "router": router, "experts": jax.tree.map(copy, params["experts"])}


def _simple_key(entry) -> object:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey/FlattenedIndexKey
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return entry


def reset_slot_moments(opt_state, slot_mask: Array, paths: Sequence[tuple] = DEFAULT_SLOT_PATHS,
                       *, fields: Sequence[str] = ("mu", "nu")):
    """Zeroes the optimizer statistics of the slots in `slot_mask` for the given param paths.

    A leaf is reset when its key path holds an attribute named in `fields` (optax Adam/AdamW
    `ScaleByAdamState.mu`/`.nu`, at any depth of chain/inject_hyperparams/masked/multi_transform)
    and the rest of its path after that attribute equals one of `paths` (tuples of dict keys /
    list indices, e.g. `("moe", "experts", "w_up")`). Matching is structural, so a same-shaped
    leaf elsewhere is never touched; `count` is left alone. `slot_mask`: `<bool>[K]`.

    Raises:
      ValueError: nothing matched while `fields` is non-empty, or a matched leaf's leading
        dimension is not K.
    """
    wanted, fields = {tuple(p) for p in paths}, set(fields)
    matched = []

    def reset(path, leaf):
        names = [_simple_key(e) for e in path]
        hit = [i for i, e in enumerate(path)
               if isinstance(e, jax.tree_util.GetAttrKey) and e.name in fields]
        if not hit or tuple(names[hit[0] + 1:]) not in wanted:
            return leaf
        if leaf.ndim == 0 or leaf.shape[0] != slot_mask.shape[0]:
            raise ValueError(f"optimizer leaf {jax.tree_util.keystr(path)} has shape "
                             f"{leaf.shape}, expected leading dim K={slot_mask.shape[0]}")
        matched.append(path)
        return jnp.where(_bcast(slot_mask, leaf), jnp.zeros_like(leaf), leaf)

    out = jax.tree_util.tree_map_with_path(reset, opt_state)
    if fields and not matched:
        raise ValueError(f"no optimizer-state leaf under fields {sorted(fields)} matches any of "
                         f"the param paths {sorted(wanted, key=str)}")
    return out


def project_gradients(grads: dict, params: dict, exp_state: dict) -> dict:
    """Keeps, for every clone source, only the gradient component along its own weights.

    For a source slot e (all its bank leaves as one vector W): `∇ ← (⟨∇, W⟩ / ‖W‖²) W`; every
    other slot, the copies included, and all non-bank leaves (gate, shared) keep the full
    gradient. `grads` and `params` are MoE-layer trees; returns `grads` with the same structure.
    """
    src, active = exp_state["clone_src"], exp_state["active"]
    is_src = jnp.any((src[None, :] == jnp.arange(src.shape[0])[:, None]) & active, axis=1)
    coef = _slot_dot(grads["experts"], params["experts"]) / jnp.maximum(
        _slot_dot(params["experts"], params["experts"]), 1e-30)

    def proj(g, w):
        radial = (_bcast(coef, w) * w.astype(jnp.float32)).astype(g.dtype)
        return jnp.where(_bcast(is_src, g), radial, g)

    return {**grads, "experts": jax.tree.map(proj, grads["experts"], params["experts"])}


def redundancy_loss(params: dict, exp_state: dict, *, weight: float = 0.01,
                    leaf: str = "w_g") -> Array:
    """`weight·Σ cos²(w_g[src], w_g[copy])` over active clone pairs; `<float32>[]`."""
    w = params["router"][leaf].astype(jnp.float32)
    src, active = exp_state["clone_src"], exp_state["active"]
    ws = w[jnp.clip(src, 0)]
    pair = active & (src >= 0) & active[jnp.clip(src, 0)]
    dot = jnp.sum(w * ws, axis=-1)
    cos2 = dot**2 / ((jnp.sum(w * w, -1) + 1e-12) * (jnp.sum(ws * ws, -1) + 1e-12))
    return weight * jnp.sum(jnp.where(pair, cos2, 0.0))


def removal_update(exp_state: dict, loss: Array, loss_masked: Array, step: Array,
                   cfg: ExpansionConfig) -> dict:
    """Removes the newest clone after `removal_patience` checks where masking it did not hurt.

    Judged only from the second clone on (`n_clones ≥ 2`) and during the expansion phase
    (`step < cfg.expand_until`). Each call with `loss_masked ≤ loss` (the caller's loss with
    `with_active(..., drop_newest=True)`) adds a strike, any other resets them; at `patience`
    strikes the slot is deactivated, its clone pair dropped and `newest` set to -1 (older clones
    are never judged again).
    """
    newest, strikes = exp_state["newest"], exp_state["strikes"]
    judge = (newest >= 0) & (exp_state["n_clones"] >= 2) & (step < cfg.expand_until)
    strikes = jnp.where(judge, jnp.where(loss_masked <= loss, strikes + 1, 0), strikes)
    remove = judge & (strikes >= cfg.removal_patience)
    sel = (jnp.arange(exp_state["active"].shape[0]) == newest) & remove
    return {
        **exp_state, "active": exp_state["active"] & ~sel,
        "clone_src": jnp.where(sel, -1, exp_state["clone_src"]),
        "age": jnp.where(sel, 0, exp_state["age"]), "newest": jnp.where(remove, -1, newest),
        "strikes": jnp.where(remove, 0, strikes).astype(jnp.int32),
        "n_removed": exp_state["n_removed"] + remove.astype(jnp.int32),
    }


def _slot_paths(params: dict, cfg: ExpansionConfig) -> list[tuple]:
    bank = jax.tree_util.tree_flatten_with_path(params["experts"])[0]
    paths = [cfg.opt_prefix + ("experts",) + tuple(_simple_key(e) for e in p) for p, _ in bank]
    return paths + [cfg.opt_prefix + ("router", n) for n in cfg.router_leaves]


def expansion_step(params: dict, grads: dict, opt_state, exp_state: dict, step: Array,
                   cfg: ExpansionConfig) -> tuple[dict, object, dict, dict]:
    """One MASS growth step: drift test, cosine gate, at most one clone; fixed shapes, jittable.

    Args:
      params: MoE layer params (`router.w_g` `[K, d]`, `experts` leaves `[K, ...]`).
      grads: the *raw* (unprojected) gradients of `params`, same structure.
      opt_state: optax state; the layer's moments sit at `cfg.opt_prefix`.
      exp_state: from `init_expansion_state`.
      step: `<int>[]` global training step.
      cfg: static `ExpansionConfig`.

    Returns:
      `(params, opt_state, exp_state, info)`. When an active slot drifted, |cos(∇W_e, W_e)| <
      δ, the step is in the expansion phase and a slot is free, the drifted slot with the
      smallest p-value is cloned into the lowest free slot, whose moments are zeroed; both
      histories restart. `info`: `grad_norm`, `p_value`, `cos` `<float32>[K]`, `drift`
      `<bool>[K]`, `cloned` `<bool>[]`, `src`, `dst`, `n_active` `<int32>[]` (src/dst -1 if none).
    """
    k = exp_state["active"].shape[0]
    g = fc1_grad_norms(grads["experts"])
    exp_state, p_value, drift = drift_test(exp_state, g, cfg)
    cos = slot_cosine(grads["experts"], params["experts"])
    active = exp_state["active"]
    cand = drift & (jnp.abs(cos) < cfg.cos_delta) & (step < cfg.expand_until) & ~jnp.all(active)
    do = jnp.any(cand)
    src = jnp.argmin(jnp.where(cand, p_value, jnp.inf)).astype(jnp.int32)
    dst = jnp.argmax(~active).astype(jnp.int32)
    params = clone_expert(params, src, dst, router_leaves=cfg.router_leaves, enabled=do)
    slots = jnp.arange(k)
    sel = (slots == dst) & do
    if cfg.moment_fields:
        opt_state = reset_slot_moments(opt_state, sel, _slot_paths(params, cfg),
                                       fields=cfg.moment_fields)
    i32 = lambda v: jnp.asarray(v, jnp.int32)
    exp_state = {
        **exp_state, "active": active | sel,
        "clone_src": jnp.where(sel, src, exp_state["clone_src"]),
        "age": jnp.where(sel | ((slots == src) & do), 0, exp_state["age"]),
        "newest": jnp.where(do, dst, exp_state["newest"]),
        "n_clones": exp_state["n_clones"] + i32(do),
        "strikes": jnp.where(do, 0, exp_state["strikes"]),
    }
    info = {"grad_norm": g, "p_value": p_value, "cos": cos, "drift": drift, "cloned": do,
            "src": jnp.where(do, src, -1), "dst": jnp.where(do, dst, -1),
            "n_active": jnp.sum(exp_state["active"], dtype=jnp.int32)}
    return params, opt_state, exp_state, info


# ---------------------------------------------------------------------------------------------
# The training-loop hooks.

PROJECTIONS = ("always", "expansion")


@functools.cache
def mass_hooks(loss_fn: Callable, cfgs: tuple[ExpansionConfig, ...], *, removal: bool = True,
               projection: str = "always") -> StepHooks:
    """MASS as step hooks of the library loop, for the MoE layers `0 .. len(cfgs) - 1` of a
    `moejax.models.lm` model (`moejax.models.trees` paths; `cfgs[i].opt_prefix` must be
    `trees.ffn_path(i)`). `TrainState.extra["expansion"]` holds one `init_expansion_state` per
    layer, and each layer's router state carries its `active` mask (set at init and after every
    step, so the step's state structure never changes). Per step:

      loss            + Σ_layers `redundancy_loss` (the model loss is left as is)
      transform_grads `removal_update` (judging the newest clone with the model loss against
                      `loss_fn` with it masked, on the same batch and params; when `removal`),
                      then `project_gradients`; with `projection="expansion"` only while
                      `step < expand_until` (the raw gradient after)
      after_update    `expansion_step` on the raw gradient, the new active masks into the model
                      state; metrics `mass/n_active` (mean over layers), `mass/cloned` (clones
                      this step), `mass/p_min`, `mass/abs_cos_min` (over tested slots)

    The step is `state.step` before the update (0-based), as `expansion_step` counts it.

    Args:
      loss_fn: `loss_fn(params, model_state, batch) -> loss` of the model in eval mode (e.g.
        `lambda p, s, b: lm.loss_fn(p, s, b, cfg=cfg, train=False)[0]`); hashable, as the
        hooks are cached by their arguments.
      cfgs: one `ExpansionConfig` per MoE layer.
      removal: judge and remove the newest clone (`removal_update`).
      projection: "always" or "expansion" (see above).
    """
    check_choice("projection", projection, PROJECTIONS)
    if not cfgs:
        raise ValueError("cfgs must hold one ExpansionConfig per MoE layer, got none")
    for i, c in enumerate(cfgs):
        if tuple(c.opt_prefix) != trees.ffn_path(i):
            raise ValueError(f"cfgs[{i}].opt_prefix must be {trees.ffn_path(i)} (the layer's "
                             f"params path), got {c.opt_prefix}")
    layers = range(len(cfgs))

    def sync_active(model_state, exp_states, *, drop_newest=False):
        for i in layers:
            model_state = trees.replace_moe_state(model_state, i, with_active(
                trees.moe_state(model_state, i), exp_states[i], drop_newest=drop_newest))
        return model_state

    def init(state: TrainState) -> TrainState:
        exp_states = [init_expansion_state(c) for c in cfgs]
        return dataclasses.replace(state, model_state=sync_active(state.model_state, exp_states),
                                   extra={**state.extra, "expansion": exp_states})

    def loss(params, state: TrainState, batch):
        terms = [redundancy_loss(trees.ffn_params(params, i), state.extra["expansion"][i],
                                 weight=c.redundancy_weight) for i, c in enumerate(cfgs)]
        return sum(terms), {}

    def transform_grads(ctx: StepContext):
        state, grads, step = ctx.state, ctx.grads, ctx.state.step
        exp_states = list(state.extra["expansion"])
        if removal:
            masked = loss_fn(state.params, sync_active(state.model_state, exp_states,
                                                       drop_newest=True), ctx.batch)
            exp_states = [removal_update(e, ctx.loss, masked, step, c)
                          for e, c in zip(exp_states, cfgs, strict=True)]
        proj = grads
        for i in layers:
            proj = trees.replace_ffn_params(proj, i, project_gradients(
                trees.ffn_params(grads, i), trees.ffn_params(state.params, i), exp_states[i]))
        if projection == "expansion":
            in_phase = step < cfgs[0].expand_until
            proj = jax.tree.map(lambda a, b: jnp.where(in_phase, a, b), proj, grads)
        return proj, {**state.extra, "expansion": exp_states}, {}

    def after_update(state: TrainState, ctx: StepContext):
        params, opt_state, step = state.params, state.opt_state, ctx.state.step
        exp_states, n_active, cloned, p_min, cos_min = [], [], [], [], []
        for i, c in enumerate(cfgs):
            ffn, opt_state, e, info = expansion_step(
                trees.ffn_params(params, i), trees.ffn_params(ctx.grads, i), opt_state,
                state.extra["expansion"][i], step, c)
            params = trees.replace_ffn_params(params, i, ffn)
            exp_states.append(e)
            n_active.append(info["n_active"])
            cloned.append(info["cloned"])
            p_min.append(jnp.min(info["p_value"]))
            cos_min.append(jnp.min(jnp.where(e["active"], jnp.abs(info["cos"]), jnp.inf)))
        metrics = {"mass/n_active": jnp.mean(jnp.stack(n_active).astype(jnp.float32)),
                   "mass/cloned": jnp.sum(jnp.stack(cloned).astype(jnp.int32)),
                   "mass/p_min": jnp.min(jnp.stack(p_min)),
                   "mass/abs_cos_min": jnp.min(jnp.stack(cos_min))}
        state = dataclasses.replace(
            state, params=params, opt_state=opt_state,
            model_state=sync_active(state.model_state, exp_states),
            extra={**state.extra, "expansion": exp_states})
        return state, metrics

    return StepHooks(init=init, loss=loss, transform_grads=transform_grads,
                     after_update=after_update)
