"""MASS expansion: grow a MoE layer from K_init to K_max experts on fixed slots (DESIGN §5).

MASS (Park & Park 2025, "How Many Experts Are Enough?"; follows the authors' psmiz/MASS
`tutel/impls/moe_layer_mass.py` and `Language/search_glue_no_trainer_mass.py`): a drift test on
each expert's first-matrix gradient norm, gated by |cos(∇W_fc1, W_fc1)| < δ, clones the first
expert that passes (expert + gate row) into a free slot; at that step only, the source keeps the
radial part of its gradient (per hidden unit) and the copy gets the source's original gradient;
a redundancy loss pushes the gate rows of clone pairs apart during the expansion phase. Axis
letters: K = K_max slots, d model width, f expert hidden width, W = window ω.

All K slots exist from the start; `exp_state["active"]` (`<bool>[K]`) reaches the router through
`with_active` (inactive slots get -inf logits), so growth changes no shape and never recompiles.
Every function is pure and jittable (`cfg` static). `mass_hooks` puts all of it into the
library's training loop (`moejax.train.steps.StepHooks`, the expansion states in
`TrainState.extra`) for `moejax.models.lm`. One training step of one MoE layer, by hand:

    loss, grads = jax.value_and_grad(loss_fn)(params)     # loss_fn: with_active + redundancy_loss
    params, grads, opt_state, exp_state, info = expansion_step(
        params, grads, opt_state, exp_state, step, cfg, loss_gap=gap_fn)   # before the update
    if cfg.alignment != "once": grads = project_gradients(grads, params, exp_state)
    updates, opt_state = opt.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)

`params` is the layer's `{"router": {"w_g": [K, d], ...}, "experts": {...}}`; `opt_state` may cover
a larger tree, in which the layer sits at `cfg.opt_prefix`. `gap_fn()` returns
`loss(newest clone masked) − loss` on the step's batch (the authors' removal test).

Drift statistic (`statistic="authors"`, the default, as theirs). Per active slot and step in the
expansion phase: count += 1 and g_t = ‖∇W_fc1‖ joins a window of the last ω norms; once
count ≥ T_warm, `z_t = (g_t − mean(window))/std(window, ddof 1)` (the window *including* g_t, as
it is at step t) joins a second window of the last ω z's. A slot is tested only when
count ≥ T_warm and its g-window is full: `s̃ = Σ z-window / √ω`, drift iff `1 − Φ(s̃) < p`.
A clone restarts only the source's count (its windows are kept); the copy starts empty.
`statistic="previous"` is this library's earlier reading: z against the previous min(age, ω)
norms (excluding g_t), `s̃ = Σ z / √m` over the m ≤ ω z's since the slot's (re)start, tested as
soon as m ≥ 1, and a clone restarts both histories.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import optax
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
STATISTICS = ("authors", "previous")
ALIGNMENTS = ("once", "always", "expansion")
REMOVALS = ("authors", "strikes", "none")
COS_LEAVES = ("fc1", "all")
SOURCES = ("first", "min_p")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExpansionConfig:
    """MASS growth options; hashable, pass it as a static argument. Defaults: the authors'.

    Attributes:
      total_steps: training steps (≥ 1); the phase lengths below are fractions of it.
      k_init: experts active at the start, 1 ≤ k_init ≤ k_max (authors: 8).
      k_max: expert slots K allocated up front (authors: 16).
      warm_steps: T_warm, the count a slot needs before its z's are recorded and it is tested
        (None: max(30, 5% of total_steps)).
      window: ω, length of the g and z windows, ≥ 2 (None: max(60, 9% of total_steps)).
      p_threshold: drift when the one-sided p-value 1 − Φ(s̃) is below this, in (0, 1) (the
        authors' scripts: 0.01).
      cos_delta: δ; only clone when |cos(∇W_e, W_e)| < δ, in [0, 1] (authors: 1e-3).
      expand_fraction: tracking, cloning, removal and the redundancy loss only while
        step < expand_fraction·total_steps (authors: 0.1).
      redundancy_weight: weight of `redundancy_loss` (≥ 0; authors: 0.01).
      removal_patience: the authors' patience (≥ 1): a new drift with ≥ 2 clones masks the newest
        clone; if the loss does not rise, the new clone replaces it and patience drops by one;
        a no-rise at patience 0 masks it for good and stops expansion. ("strikes": the number of
        consecutive no-rise checks that remove the newest clone.)
      statistic: "authors" or "previous" (see the module docstring).
      alignment: "once" (authors: per-hidden-unit projection of the source's fc1 gradient and of
        its gate-row gradient at the clone step only), "always" (this library's earlier rule: a
        clone source's whole-expert gradient is projected onto its weights on every step while
        its pair is active; `project_gradients`) or "expansion" ("always", during the expansion
        phase only).
      removal: "authors" (the rule of `removal_patience`, judged only when a new drift is
        found), "strikes" (the earlier rule, `removal_update`, judged every step) or "none".
      cos_leaves: "fc1" (authors: cosine over the first expert matrix) or "all" (every leaf of
        the expert).
      source: "first" (authors: the lowest-index slot that passes both tests) or "min_p" (the
        passing slot with the smallest p-value).
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
    statistic: str = "authors"
    alignment: str = "once"
    removal: str = "authors"
    cos_leaves: str = "fc1"
    source: str = "first"
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
        for name, valid in (("statistic", STATISTICS), ("alignment", ALIGNMENTS),
                            ("removal", REMOVALS), ("cos_leaves", COS_LEAVES),
                            ("source", SOURCES)):
            check_choice(name, getattr(self, name), valid)
        for name in ("router_leaves", "moment_fields", "opt_prefix"):
            value = getattr(self, name)
            if not isinstance(value, tuple):
                raise ValueError(f"{name} must be a tuple, got {value!r}")
        if not self.router_leaves:
            raise ValueError("router_leaves must name at least one router leaf (e.g. 'w_g')")
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
        """First step at which tracking, cloning, removal and the redundancy loss stop."""
        return int(self.expand_fraction * self.total_steps)


def init_expansion_state(cfg: ExpansionConfig) -> dict[str, Array]:
    """Fixed-shape expansion state.

    Returns:
      dict with `active` `<bool>[K]` (first k_init True); `clone_src` `<int32>[K]` (source slot
      of each active clone, -1 if none); per slot `count` (the authors' grad_count; "previous":
      steps since the slot's (re)start), the ring buffers `g_win`, `z_win` `<float32>[W, K]` of
      gradient norms and z-scores with their write positions `g_ptr`, `z_ptr` and fill levels
      `g_len`, `z_len` `<int32>[K]`; and scalars `newest` (slot of the latest clone, -1 if
      none), `n_clones` (clones made), `n_removed` (clones removed or masked), `patience`
      (left), `strikes` ("strikes" removal) `<int32>[]`, `stopped` `<bool>[]` (expansion over
      for good: patience spent or all slots active).
    """
    k, w = cfg.k_max, cfg.omega
    i32 = lambda v: jnp.asarray(v, jnp.int32)
    zk = jnp.zeros((k,), jnp.int32)
    return {
        "active": jnp.arange(k) < cfg.k_init, "clone_src": jnp.full((k,), -1, jnp.int32),
        "count": zk, "g_win": jnp.zeros((w, k), jnp.float32), "g_ptr": zk, "g_len": zk,
        "z_win": jnp.zeros((w, k), jnp.float32), "z_ptr": zk, "z_len": zk,
        "newest": i32(-1), "n_clones": i32(0), "n_removed": i32(0),
        "patience": i32(cfg.removal_patience), "strikes": i32(0),
        "stopped": jnp.asarray(cfg.k_init >= cfg.k_max),
    }


def with_active(moe_state: dict, exp_state: dict, *, drop_newest: bool = False) -> dict:
    """MoE layer state with `state["router"]["active"]` from `exp_state` (`drop_newest`: minus
    the newest clone, for the removal test's masked loss)."""
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


def _fc1(bank: dict) -> dict:
    fc1 = {k: v for k, v in bank.items() if k in _FC1_LEAVES}
    if not fc1:
        raise ValueError(f"expert bank has none of {_FC1_LEAVES}: {sorted(bank)}")
    return fc1


def fc1_grad_norms(expert_grads: dict) -> Array:
    """`<float32>[K]` g = ‖∇W_fc1‖_F per slot: sqrt(‖∇w_gate‖² + ‖∇w_up‖²) (GELU bank: ‖∇w_up‖)."""
    fc1 = _fc1(expert_grads)
    return jnp.sqrt(_slot_dot(fc1, fc1))


def slot_cosine(expert_grads: dict, expert_params: dict, *, leaves: str = "fc1") -> Array:
    """`<float32>[K]` cos(∇W_e, W_e), over the fc1 leaves (`leaves="fc1"`: w_gate and w_up as
    one vector, the authors' `batched_fc1_w`) or over every leaf of the expert ("all")."""
    check_choice("leaves", leaves, COS_LEAVES)
    if leaves == "fc1":
        expert_grads, expert_params = _fc1(expert_grads), _fc1(expert_params)
        expert_params = {k: expert_params[k] for k in expert_grads}
    gw = _slot_dot(expert_grads, expert_params)
    gg, ww = _slot_dot(expert_grads, expert_grads), _slot_dot(expert_params, expert_params)
    return gw / jnp.sqrt(jnp.maximum(gg * ww, 1e-30))


def _ring_valid(ptr: Array, length: Array, w: int) -> Array:
    """`<bool>[W, K]`: the last `length[k]` entries written before `ptr[k]` (per-slot rings)."""
    pos = jnp.arange(w)[:, None]
    return (ptr[None, :] - 1 - pos) % w < length[None, :]


def _ring_push(win: Array, ptr: Array, length: Array, value: Array, mask: Array):
    w = win.shape[0]
    hit = (jnp.arange(w)[:, None] == ptr[None, :]) & mask[None, :]
    win = jnp.where(hit, value[None, :].astype(win.dtype), win)
    return (win, jnp.where(mask, (ptr + 1) % w, ptr),
            jnp.where(mask, jnp.minimum(length + 1, w), length))


def _window_stats(win: Array, valid: Array) -> tuple[Array, Array]:
    """Mean and unbiased std `[K]` of the valid entries (std floored: rounding noise)."""
    n = jnp.sum(valid, axis=0)
    mean = jnp.sum(jnp.where(valid, win, 0.0), axis=0) / jnp.maximum(n, 1)
    var = jnp.sum(jnp.where(valid, (win - mean) ** 2, 0.0), axis=0) / jnp.maximum(n - 1, 1)
    return mean, jnp.maximum(jnp.sqrt(var), 1e-6 * jnp.abs(mean) + 1e-12)


def drift_test(exp_state: dict, g: Array, cfg: ExpansionConfig, *,
               in_phase: Array | bool = True) -> tuple[dict, Array, Array]:
    """Records one step of gradient norms and tests the active slots for upward drift.

    Args:
      exp_state: from `init_expansion_state`.
      g: `<float32>[K]` this step's gradient norms (ignored for inactive slots).
      cfg: `ExpansionConfig` (ω, T_warm, p_threshold, statistic).
      in_phase: `<bool>[]`; "authors" tracks (and tests) only during the expansion phase, as the
        authors' gradient hooks run only then ("previous" ignores it).

    Returns:
      `(exp_state, p_value, drift)`: `p_value` `<float32>[K]` = 1 − Φ(s̃) (1 where untested),
      `drift` `<bool>[K]` (see the module docstring for both statistics).
    """
    w = cfg.omega
    g = g.astype(jnp.float32)
    active, count = exp_state["active"], exp_state["count"]
    st = dict(exp_state)
    if cfg.statistic == "authors":
        track = active & in_phase
        count = count + track.astype(jnp.int32)
        st["g_win"], st["g_ptr"], st["g_len"] = _ring_push(
            exp_state["g_win"], exp_state["g_ptr"], exp_state["g_len"], g, track)
        mean, std = _window_stats(st["g_win"], _ring_valid(st["g_ptr"], st["g_len"], w))
        warm = count >= cfg.t_warm
        record = track & warm & (st["g_len"] >= 2)  # one norm has no std
        z = jnp.where(record, (g - mean) / std, 0.0)
        st["z_win"], st["z_ptr"], st["z_len"] = _ring_push(
            exp_state["z_win"], exp_state["z_ptr"], exp_state["z_len"], z, record)
        zs = jnp.sum(jnp.where(_ring_valid(st["z_ptr"], st["z_len"], w), st["z_win"], 0.0), 0)
        s = zs / jnp.sqrt(jnp.float32(w))
        tested = track & warm & (st["g_len"] >= w)
    else:
        track = active
        start = max(cfg.t_warm, 2)  # z-scores need a reference of at least T_warm (≥ 2) norms
        mean, std = _window_stats(exp_state["g_win"],
                                  _ring_valid(exp_state["g_ptr"], exp_state["g_len"], w))
        record = track & (count >= start)
        z = jnp.where(record, (g - mean) / std, 0.0)
        st["g_win"], st["g_ptr"], st["g_len"] = _ring_push(
            exp_state["g_win"], exp_state["g_ptr"], exp_state["g_len"], g, track)
        st["z_win"], st["z_ptr"], st["z_len"] = _ring_push(
            exp_state["z_win"], exp_state["z_ptr"], exp_state["z_len"], z, record)
        count = jnp.where(active, count + 1, 0)
        m = st["z_len"]
        zs = jnp.sum(jnp.where(_ring_valid(st["z_ptr"], m, w), st["z_win"], 0.0), 0)
        s = zs / jnp.sqrt(jnp.maximum(m, 1).astype(jnp.float32))
        tested = track & (m >= 1)
    st["count"] = count
    p_value = jnp.where(tested, norm.sf(s), 1.0)  # sf = 1 − Φ, accurate in the tail
    drift = tested & (p_value < cfg.p_threshold)
    return st, p_value, drift


def _reset_tracking(exp_state: dict, sel: Array, *, windows: bool = True) -> dict:
    """Restarts the count of the slots in `sel` (and, with `windows`, empties their windows)."""
    st = {**exp_state, "count": jnp.where(sel, 0, exp_state["count"])}
    if windows:
        for name in ("g_ptr", "g_len", "z_ptr", "z_len"):
            st[name] = jnp.where(sel, 0, exp_state[name])
    return st


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


def upcycle(moe_params: dict, dense_ffn: dict) -> dict:
    """MoE layer params with every expert slot a copy of one dense FFN (the authors' language
    start: all experts upcycled from the pretrained FFN, so they are identical at step 0).

    Args:
      moe_params: `{"router": ..., "experts": {"w_gate"?, "w_up", "w_down": [K, ...]}, ...}`.
      dense_ffn: `moejax.layers.ffn` params of the same activation and width
        (`{"w_gate"?, "w_up": [d, f], "w_down": [f, d]}`).

    Returns:
      `moe_params` with the bank replaced; router and shared experts unchanged.

    Raises:
      ValueError: the dense FFN's leaves do not match the bank's (names or per-expert shapes).
    """
    bank = moe_params["experts"]
    if set(bank) != set(dense_ffn):
        raise ValueError(f"dense FFN leaves {sorted(dense_ffn)} do not match the expert bank's "
                         f"{sorted(bank)}")
    out = {}
    for name, leaf in bank.items():
        if tuple(dense_ffn[name].shape) != tuple(leaf.shape[1:]):
            raise ValueError(f"dense FFN {name} has shape {tuple(dense_ffn[name].shape)}, the "
                             f"bank's experts {tuple(leaf.shape[1:])}")
        out[name] = jnp.broadcast_to(jnp.asarray(dense_ffn[name], leaf.dtype), leaf.shape)
    return {**moe_params, "experts": out}


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
    """The earlier removal rule (`removal="strikes"`, not the authors'): removes the newest clone
    after `removal_patience` consecutive checks where masking it did not hurt.

    Judged every call from the second clone on (`n_clones ≥ 2`) during the expansion phase
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
    st = _reset_tracking(exp_state, sel)
    return {
        **st, "active": exp_state["active"] & ~sel,
        "clone_src": jnp.where(sel, -1, exp_state["clone_src"]),
        "newest": jnp.where(remove, -1, newest),
        "strikes": jnp.where(remove, 0, strikes).astype(jnp.int32),
        "n_removed": exp_state["n_removed"] + remove.astype(jnp.int32),
    }


def align_gradients(grads: dict, params: dict, src: Array, dst: Array, *,
                    router_leaves: Sequence[str] = ("w_g",), enabled: Array | bool = True,
                    project_source: bool = True) -> dict:
    """The authors' gradient alignment at a clone step (`_edit_grad_align`).

    With `project_source`, the source's fc1 gradient is replaced, per hidden unit r, by its
    projection onto that unit's weights, `ĝ_r = (g_r·w_r / (‖w_r‖² + 1e-12)) w_r` (the columns
    `[:, r]` of w_gate and of w_up, each its own unit, as the rows of the authors' fused fc1),
    and each `router_leaves` row of the source by its projection onto that row. The copy `dst`
    gets the source's original fc1 and router-row gradients and a zero gradient for its other
    bank leaves (w_down: the authors leave it as computed, zero for a slot that was inactive).
    Other slots and leaves are untouched.

    Args:
      grads, params: MoE-layer trees (`params` before the clone: the source's weights).
      src, dst: `<int>[]` slots (may be traced).
      router_leaves: router params with a leading K axis.
      enabled: `<bool>[]`; False returns `grads` unchanged.
      project_source: False leaves the source's gradient as it is (only the copy's is set).
    """
    k = params["router"][router_leaves[0]].shape[0]
    slots = jnp.arange(k)
    is_src, is_dst = (slots == src) & enabled, (slots == dst) & enabled

    def edit(g, w, axis):
        g_src = jnp.take(g, src, axis=0)
        w_src = jnp.take(w, src, axis=0).astype(jnp.float32)
        g32 = g_src.astype(jnp.float32)
        coef = jnp.sum(g32 * w_src, axis=axis, keepdims=True) / (
            jnp.sum(w_src * w_src, axis=axis, keepdims=True) + 1e-12)
        out = g
        if project_source:
            out = jnp.where(_bcast(is_src, g), (coef * w_src).astype(g.dtype)[None], out)
        return jnp.where(_bcast(is_dst, g), g_src[None], out)

    experts = {}
    for name, g in grads["experts"].items():
        if name in _FC1_LEAVES:  # [K, d, f]: hidden unit r is column r (sum over d)
            experts[name] = edit(g, params["experts"][name], axis=0)
        else:
            experts[name] = jnp.where(_bcast(is_dst, g), jnp.zeros_like(g), g)
    router = dict(grads["router"])
    for name in router_leaves:
        g = router[name]  # [K, ...]: each slot's row as one vector
        axes = tuple(range(g.ndim - 1))
        router[name] = edit(g, params["router"][name], axis=axes) if axes else g
    return {**grads, "router": router, "experts": experts}


def _slot_paths(params: dict, cfg: ExpansionConfig) -> list[tuple]:
    bank = jax.tree_util.tree_flatten_with_path(params["experts"])[0]
    paths = [cfg.opt_prefix + ("experts",) + tuple(_simple_key(e) for e in p) for p, _ in bank]
    return paths + [cfg.opt_prefix + ("router", n) for n in cfg.router_leaves]


def expansion_step(params: dict, grads: dict, opt_state, exp_state: dict, step: Array,
                   cfg: ExpansionConfig, *, loss_gap: Callable[[], Array] | None = None,
                   ) -> tuple[dict, dict, object, dict, dict]:
    """One MASS growth step, *before* the optimizer update; fixed shapes, jittable.

    In order (the authors' training loop): `drift_test` on ‖∇W_fc1‖; the source is the first
    active slot (`source="first"`) with drift and |cos(∇W_e, W_e)| < δ, while in the expansion
    phase, not stopped and with a free slot. With `removal="authors"` and ≥ 2 clones alive, the
    newest clone is judged (`loss_gap()` = loss with it masked − loss, evaluated only then): no
    rise (gap ≤ 0) with patience left removes it (patience − 1) and the new clone takes its
    place; no rise at patience 0 masks it for good, stops expansion and makes no clone; a rise
    keeps it. Then the source is cloned into the lowest free slot (moments zeroed), its count
    restarts (`statistic="previous"`: both histories restart), the copy starts empty, and the
    gradients are aligned (`align_gradients`; `alignment="once"` projects the source's, else only
    the copy's is set and the caller applies `project_gradients`). All slots active also stops
    expansion.

    Args:
      params: MoE layer params (`router.w_g` `[K, d]`, `experts` leaves `[K, ...]`).
      grads: their raw gradients (of the task loss: add the redundancy term's after), same tree.
      opt_state: optax state; the layer's moments sit at `cfg.opt_prefix`.
      exp_state: from `init_expansion_state`.
      step: `<int>[]` global training step (0-based, the update about to be applied).
      cfg: static `ExpansionConfig`.
      loss_gap: `() -> <float32>[]`, traced under `lax.cond` (None: the removal test never
        removes, as if every gap were positive).

    Returns:
      `(params, grads, opt_state, exp_state, info)`: params with the clone, the gradients to
      apply, the optimizer state with the copy's moments zeroed, the new state, and `info`:
      `grad_norm`, `p_value`, `cos` `<float32>[K]`, `drift` `<bool>[K]`, `found`, `checked`,
      `removed`, `stopped_now`, `cloned` `<bool>[]`, `src`, `dst`, `n_active` `<int32>[]`
      (src/dst -1 if no clone), `loss_gap` `<float32>[]` (0 if not checked).
    """
    k = exp_state["active"].shape[0]
    slots = jnp.arange(k)
    i32 = lambda v: jnp.asarray(v, jnp.int32)
    in_phase = step < cfg.expand_until
    g = fc1_grad_norms(grads["experts"])
    exp_state, p_value, drift = drift_test(exp_state, g, cfg, in_phase=in_phase)
    cos = slot_cosine(grads["experts"], params["experts"], leaves=cfg.cos_leaves)
    active = exp_state["active"]
    cand = (drift & (jnp.abs(cos) < cfg.cos_delta) & in_phase & ~exp_state["stopped"]
            & ~jnp.all(active))
    found = jnp.any(cand)
    if cfg.source == "first":
        src = jnp.argmax(cand).astype(jnp.int32)
    else:
        src = jnp.argmin(jnp.where(cand, p_value, jnp.inf)).astype(jnp.int32)

    # The authors' removal test of the newest clone.
    newest = exp_state["newest"]
    alive = exp_state["n_clones"] - exp_state["n_removed"]
    checked = found & (alive >= 2) & (newest >= 0)
    if cfg.removal != "authors":
        checked = jnp.zeros((), bool)
    if loss_gap is None or cfg.removal != "authors":
        gap = jnp.zeros((), jnp.float32)
        no_gain = jnp.zeros((), bool)
    else:
        gap = jax.lax.cond(checked, lambda: jnp.asarray(loss_gap(), jnp.float32),
                           lambda: jnp.zeros((), jnp.float32))
        no_gain = checked & (gap <= 0)
    patience = exp_state["patience"]
    removed = no_gain & (patience > 0)
    stop_now = no_gain & (patience <= 0)
    drop = (slots == newest) & (removed | stop_now)
    exp_state = _reset_tracking(exp_state, drop)
    active = active & ~drop
    exp_state = {
        **exp_state, "active": active,
        "clone_src": jnp.where(drop, -1, exp_state["clone_src"]),
        "patience": patience - removed.astype(jnp.int32),
        "n_removed": exp_state["n_removed"] + (removed | stop_now).astype(jnp.int32),
        "newest": jnp.where(stop_now, -1, newest),
        "stopped": exp_state["stopped"] | stop_now,
    }

    # Clone into the lowest free slot. (If the source was the newest clone and was just removed,
    # the authors would re-add it as a copy of itself; we make no clone then.)
    do = found & ~stop_now & ~(removed & (src == newest))
    dst = jnp.argmax(~active).astype(jnp.int32)
    grads = align_gradients(grads, params, src, dst, router_leaves=cfg.router_leaves,
                            enabled=do, project_source=cfg.alignment == "once")
    params = clone_expert(params, src, dst, router_leaves=cfg.router_leaves, enabled=do)
    sel = (slots == dst) & do
    if cfg.moment_fields:
        opt_state = reset_slot_moments(opt_state, sel, _slot_paths(params, cfg),
                                       fields=cfg.moment_fields)
    src_sel = (slots == src) & do
    if cfg.statistic == "authors":
        exp_state = _reset_tracking(_reset_tracking(exp_state, src_sel, windows=False), sel)
    else:
        exp_state = _reset_tracking(exp_state, sel | src_sel)
    active = active | sel
    exp_state = {
        **exp_state, "active": active,
        "clone_src": jnp.where(sel, src, exp_state["clone_src"]),
        "newest": jnp.where(do, dst, exp_state["newest"]),
        "n_clones": exp_state["n_clones"] + i32(do),
        "strikes": jnp.where(do, 0, exp_state["strikes"]).astype(jnp.int32),
        "stopped": exp_state["stopped"] | jnp.all(active),
    }
    info = {"grad_norm": g, "p_value": p_value, "cos": cos, "drift": drift, "found": found,
            "checked": checked, "removed": removed, "stopped_now": stop_now, "cloned": do,
            "src": jnp.where(do, src, -1), "dst": jnp.where(do, dst, -1), "loss_gap": gap,
            "n_active": jnp.sum(active, dtype=jnp.int32)}
    return params, grads, opt_state, exp_state, info


# ---------------------------------------------------------------------------------------------
# The training-loop hooks.


@functools.cache
def mass_hooks(loss_fn: Callable, cfgs: tuple[ExpansionConfig, ...],
               optimizer: optax.GradientTransformation) -> StepHooks:
    """MASS as step hooks of the library loop, for the MoE layers `0 .. len(cfgs) - 1` of a
    `moejax.models.lm` model (`moejax.models.trees` paths; `cfgs[i].opt_prefix` must be
    `trees.ffn_path(i)`). `TrainState.extra["expansion"]` holds one `init_expansion_state` per
    layer, and each layer's router state carries its `active` mask (set at init and after every
    step, so the step's state structure never changes). Per step:

      loss            + Σ_layers `redundancy_loss` while step < expand_until (the model loss
                      is left as is)
      transform_grads `project_gradients` for `alignment="always"` (and "expansion" in the
                      phase); identity for "once"
      after_update    per layer `expansion_step` on the step's *pre-update* params, optimizer
                      state and gradient (the redundancy term's gradient taken out before the
                      alignment and added back after), the removal test's `loss_gap` from
                      `loss_fn` on the same batch (newest clone masked − not masked); if any
                      layer cloned, the update is recomputed from the pre-update state with
                      `optimizer` (the clone, its zeroed moments and the aligned gradients: the
                      authors clone before their optimizer step); `removal="strikes"` judges
                      with `removal_update` first. The new active masks go into the model state.
                      Metrics: `mass/n_active` (mean over layers), `mass/cloned` (clones this
                      step), `mass/removed`, `mass/p_min`, `mass/abs_cos_min` (over active slots)

    The step is `state.step` before the update (0-based), as `expansion_step` counts it.

    Args:
      loss_fn: `loss_fn(params, model_state, batch) -> loss` of the model (e.g. the eval-mode
        `lambda p, s, b: lm.loss_fn(p, s, b, cfg=cfg, train=False)[0]`); hashable, as the
        hooks are cached by their arguments.
      cfgs: one `ExpansionConfig` per MoE layer (the same alignment and removal in all).
      optimizer: the run's optimizer (`moejax.train.optim.make_optimizer(...)[0]` of the run's
        `optimizer_settings`: its update must be the one the loop applies).
    """
    if not cfgs:
        raise ValueError("cfgs must hold one ExpansionConfig per MoE layer, got none")
    for i, c in enumerate(cfgs):
        if tuple(c.opt_prefix) != trees.ffn_path(i):
            raise ValueError(f"cfgs[{i}].opt_prefix must be {trees.ffn_path(i)} (the layer's "
                             f"params path), got {c.opt_prefix}")
    if len({(c.alignment, c.removal) for c in cfgs}) != 1:
        raise ValueError("all layers' ExpansionConfigs must share alignment and removal")
    if not hasattr(optimizer, "update"):
        raise ValueError(f"optimizer must be an optax GradientTransformation, got {optimizer!r}")
    layers = range(len(cfgs))
    alignment, removal = cfgs[0].alignment, cfgs[0].removal

    def sync_active(model_state, exp_states, *, drop_newest=None):
        for i in layers:
            model_state = trees.replace_moe_state(model_state, i, with_active(
                trees.moe_state(model_state, i), exp_states[i],
                drop_newest=drop_newest == i or drop_newest == "all"))
        return model_state

    def init(state: TrainState) -> TrainState:
        exp_states = [init_expansion_state(c) for c in cfgs]
        return dataclasses.replace(state, model_state=sync_active(state.model_state, exp_states),
                                   extra={**state.extra, "expansion": exp_states})

    def redundancy(params, exp_states, step):
        return sum(jnp.where(step < c.expand_until, redundancy_loss(
            trees.ffn_params(params, i), exp_states[i], weight=c.redundancy_weight), 0.0)
            for i, c in enumerate(cfgs))

    def loss(params, state: TrainState, batch):
        return redundancy(params, state.extra["expansion"], state.step), {}

    def project(grads, params, exp_states, step):
        if alignment == "once":
            return grads
        proj = grads
        for i in layers:
            proj = trees.replace_ffn_params(proj, i, project_gradients(
                trees.ffn_params(grads, i), trees.ffn_params(params, i), exp_states[i]))
        if alignment == "expansion":
            in_phase = step < cfgs[0].expand_until
            proj = jax.tree.map(lambda a, b: jnp.where(in_phase, a, b), proj, grads)
        return proj

    def transform_grads(ctx: StepContext):
        state = ctx.state
        return project(ctx.grads, state.params, state.extra["expansion"], state.step), \
            state.extra, {}

    def after_update(new_state: TrainState, ctx: StepContext):
        pre, step, batch = ctx.state, ctx.state.step, ctx.batch
        exp_states = list(pre.extra["expansion"])
        if removal == "strikes":
            masked = loss_fn(pre.params, sync_active(pre.model_state, exp_states,
                                                     drop_newest="all"), batch)
            exp_states = [removal_update(e, ctx.loss, masked, step, c)
                          for e, c in zip(exp_states, cfgs, strict=True)]
        red_grads = jax.grad(redundancy)(pre.params, pre.extra["expansion"], step)
        grads = jax.tree.map(jnp.subtract, ctx.grads, red_grads)
        params, opt_state = pre.params, pre.opt_state
        judged = tuple(exp_states)  # every layer's masks as the pre-update params saw them
        infos = []
        for i, c in enumerate(cfgs):
            def gap(i=i):
                base = loss_fn(pre.params, sync_active(pre.model_state, judged), batch)
                return loss_fn(pre.params, sync_active(pre.model_state, judged,
                                                       drop_newest=i), batch) - base
            ffn, ffn_grads, opt_state, e, info = expansion_step(
                trees.ffn_params(params, i), trees.ffn_params(grads, i), opt_state,
                exp_states[i], step, c, loss_gap=gap)
            params = trees.replace_ffn_params(params, i, ffn)
            grads = trees.replace_ffn_params(grads, i, ffn_grads)
            exp_states[i] = e
            infos.append(info)
        grads = jax.tree.map(jnp.add, grads, red_grads)
        any_clone = jnp.any(jnp.stack([info["cloned"] for info in infos]))

        def redo():
            g = project(grads, params, exp_states, step)
            updates, new_opt = optimizer.update(g, opt_state, params)
            return optax.apply_updates(params, updates), new_opt

        out_params, out_opt = jax.lax.cond(
            any_clone, redo, lambda: (new_state.params, new_state.opt_state))
        metrics = {
            "mass/n_active": jnp.mean(jnp.stack([i["n_active"] for i in infos]
                                                ).astype(jnp.float32)),
            "mass/cloned": jnp.sum(jnp.stack([i["cloned"] for i in infos]).astype(jnp.int32)),
            "mass/removed": jnp.sum(jnp.stack([i["removed"] | i["stopped_now"] for i in infos]
                                              ).astype(jnp.int32)),
            "mass/p_min": jnp.min(jnp.stack([jnp.min(i["p_value"]) for i in infos])),
            "mass/abs_cos_min": jnp.min(jnp.stack([
                jnp.min(jnp.where(e["active"], jnp.abs(i["cos"]), jnp.inf))
                for i, e in zip(infos, exp_states, strict=True)]))}
        state = dataclasses.replace(
            new_state, params=out_params, opt_state=out_opt,
            model_state=sync_active(new_state.model_state, exp_states),
            extra={**new_state.extra, "expansion": exp_states})
        return state, metrics

    return StepHooks(init=init, loss=loss, transform_grads=transform_grads,
                     after_update=after_update)
