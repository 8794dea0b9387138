r"""DARS: DisAlignment-Regularized Sparse fine-tuning (channel selection + masked updates).

**Reconstructed from the paper's abstract only** (DESIGN §7; "DARS: Robust sparse fine-tuning with
regularized subspace disalignment", ICLR 2025 SCOPE workshop). The abstract says: build the
principal subspace of the pre-trained network from its in-distribution (pre-training) data;
unfreeze two disjoint subsets of channels — one with the highest gradient projections onto that
subspace, one drawn at random — with a ratio between them that sets the strength of the subspace
regularisation. Every detail below (which layers, how the gradient is aggregated, per-weight
budgets, rounding) is our choice, not the authors'.

Steps, for each selected linear weight `W` of layout `[..., d_in, d_out]` (`y = x @ W`; leading
axes, e.g. the expert axis `E` of MoE experts, are batched channels):

1. `collect_activations`: the inputs `x` `[N, d_in]` of the weight on in-distribution batches
   (pure function; for the LM, the RMS-normed residual entering each block's mixer or FFN).
2. `principal_subspace`: `U` `[d_in, r]`, the top-r right singular vectors of the (uncentred)
   activation matrix, i.e. the top-r eigenvectors of the second-moment matrix `XᵀX / N`.
3. `channel_scores`: with `G = ∇_W L` (fine-tuning data), output channel `j` owns the column
   `G[..., :, j]` (`[d_in]`); score_j = ‖Uᵀ G[..., :, j]‖₂. The paper (PyTorch layout
   `[d_out, d_in]`) calls this the gradient *row* of channel j; in our `[d_in, d_out]` layout it is
   the column. Channels of a `[E, d_in, d_out]` weight are the `E · d_out` pairs `(e, j)`.
4. `select_channels`: a budget of `m` channels: the top `m − round(ρ m)` by score plus
   `round(ρ m)` drawn uniformly without replacement from the rest (numpy `default_rng(seed)`).
5. `channel_mask` / `masked`: a boolean pytree over params (True only on the selected channels'
   entries `W[..., :, j]` of the selected weights; every other parameter frozen) and an optax
   wrapper that zeroes gradients before and updates after the inner optimizer, so frozen entries
   get exactly zero update (weight decay included) and stay bit-identical.

Baselines with the same machinery: full fine-tuning (`mask=None`), random channels (`ρ = 1`),
top-score only (`ρ = 0`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from moejax.train.steps import StepContext, StepHooks, TrainState
from moejax.validation import (
    ArgumentTypeError,
    as_float_array,
    check_choice,
    check_int,
    check_range,
)

Array = jax.Array
PyTree = Any
Path = tuple  # a tuple of dict keys / list indices into the params pytree

METHODS = ("full", "random", "top", "dars")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class DarsConfig:
    """Channel selection hyperparameters. Hashable; validated on construction.

    Attributes:
      budget: fraction of each selected weight's output channels to unfreeze, in (0, 1];
        m = max(1, round(budget · C)) channels for a weight of C channels.
      rho: share of the budget drawn at random, in [0, 1]; 0 = top-score only, 1 = random.
      rank: r, the dimension of the principal subspace, ≥ 1 (capped at d_in).
      seed: seed of the random part, ≥ 0.

    Raises (on construction):
      ValueError / ArgumentTypeError (also a `TypeError`): naming the field.
    """

    budget: float = 0.05
    rho: float = 0.1
    rank: int = 8
    seed: int = 0

    def __post_init__(self):
        check_range("budget", self.budget, 0.0, 1.0)
        check_range("rho", self.rho, 0.0, 1.0, lo_open=False)
        check_int("rank", self.rank, lo=1)
        check_int("seed", self.seed, lo=0)


# ---------------------------------------------------------------------------------------------
# 1. Activations of the LM's block inputs.


def lm_block_inputs(params: dict, state: dict, tokens: Array, *, cfg) -> dict[tuple, Array]:
    """Inputs of every block's mixer and FFN projections for `moejax.models.lm` (pure).

    Returns:
      `{("mixer", i): [B·T, d], ("ffn", i): [B·T, d]}`: the RMS-normed residual stream entering
      block i's mixer (input of w_q, w_k, w_v, ...) and FFN (input of w_gate/w_up, also of every
      expert; for MoE we use all tokens, i.e. the layer's input distribution).
    """
    from moejax.models import lm

    lm.check_tokens(tokens, cfg)
    h = lm.embed(params, tokens, cfg)
    out = {}
    for i, block in enumerate(params["blocks"]):
        x = lm.norm(block["norm1"], h, cfg)
        out[("mixer", i)] = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
        y, _ = lm.mixer_apply(block["mixer"], x, cfg, i)
        h = h + y
        x = lm.norm(block["norm2"], h, cfg)
        out[("ffn", i)] = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
        y, _, _ = lm.ffn_apply(block["ffn"], state["blocks"][i], x, cfg, i, train=False, rng=None)
        h = h + y
    return out


def collect_activations(fn: Callable[[Array], Mapping[Any, Array]], batches: Sequence[Array]
                        ) -> dict[Any, np.ndarray]:
    """Concatenates `fn(tokens)` (a dict of `[N_b, d]` arrays) over `batches` → `{site: [N, d]}`."""
    if not batches:
        raise ValueError("collect_activations needs at least one batch")
    parts: dict[Any, list] = {}
    for b in batches:
        for k, v in fn(b).items():
            parts.setdefault(k, []).append(np.asarray(v, np.float32))
    return {k: np.concatenate(v, axis=0) for k, v in parts.items()}


# ---------------------------------------------------------------------------------------------
# 2-3. Subspace and scores.




def principal_subspace(acts: Any, rank: int) -> np.ndarray:
    """Top-`rank` principal directions `U` `[d, r]` (orthonormal columns) of `acts` `[N, d]`.

    Uncentred (the second-moment matrix `XᵀX/N`, whose eigenvectors are the right singular
    vectors of X): the span a linear layer's gradient columns live in. `r = min(rank, N, d)`.
    """
    x = as_float_array("acts", acts)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"acts must be [N, d] with N > 0, got shape {x.shape}")
    check_int("rank", rank, lo=1)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    r = min(int(rank), vt.shape[0])
    return vt[:r].T.astype(np.float32)


def channel_scores(grad: Any, u: Any) -> np.ndarray:
    """‖Uᵀ G[..., :, j]‖₂ per output channel: `grad` `[..., d_in, d_out]`, `u` `[d_in, r]`.

    Returns `[..., d_out]` scores (flatten for channel indices).
    """
    g = as_float_array("grad", grad)
    u = as_float_array("u", u)
    if g.ndim < 2 or u.ndim != 2 or u.shape[0] != g.shape[-2]:
        raise ValueError(f"grad [..., d_in, d_out] and u [d_in, r] disagree: {g.shape}, {u.shape}")
    proj = np.einsum("ir,...ij->...rj", u, g)
    return np.linalg.norm(proj, axis=-2).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# 4. Budget split.


class Selection(NamedTuple):
    """Chosen channel indices (flat, into `scores.reshape(-1)`): `top` and `random`, disjoint."""

    top: np.ndarray
    random: np.ndarray

    @property
    def all(self) -> np.ndarray:
        return np.sort(np.concatenate([self.top, self.random]))


def budget_sizes(num_channels: int, budget: float, rho: float) -> tuple[int, int]:
    """`(n_top, n_random)` with m = max(1, round(budget·C)), n_random = round(ρ m)."""
    m = min(num_channels, max(1, int(round(budget * num_channels))))
    n_rand = int(round(rho * m))
    return m - n_rand, n_rand


def select_channels(scores: Any, cfg: DarsConfig, *, salt: int = 0) -> Selection:
    """Top `(1−ρ)m` channels by score plus `ρm` uniformly from the rest (deterministic per
    `cfg.seed` and `salt`, e.g. the weight's index). Ties broken by the lower index."""
    s = np.asarray(scores, np.float64).reshape(-1)
    n_top, n_rand = budget_sizes(s.size, cfg.budget, cfg.rho)
    order = np.lexsort((np.arange(s.size), -s))  # descending score, stable
    top = np.sort(order[:n_top])
    rest = np.sort(order[n_top:])
    rng = np.random.default_rng([cfg.seed, salt])
    rand = np.sort(rng.choice(rest, size=n_rand, replace=False)) if n_rand else rest[:0]
    return Selection(top=top.astype(np.int64), random=rand.astype(np.int64))


# ---------------------------------------------------------------------------------------------
# 5. Masks and masked optimizer.


def get_path(tree: PyTree, path: Path) -> Any:
    """`tree[path[0]][path[1]]...`; a ValueError names the path and the missing step."""
    node = tree
    for i, k in enumerate(path):
        try:
            node = node[k]
        except (KeyError, IndexError, TypeError) as e:
            raise ValueError(f"path {path!r} is not in the params tree: no {k!r} under "
                             f"{path[:i]!r}") from e
    return node


def lm_targets(params: dict) -> dict[Path, tuple]:
    """Default DARS weights of an LM: `{param path: activation site}`.

    Every block's mixer input projections (`w_*` of shape `[d, ·]` except the output projection)
    and FFN input projections (`w_gate`, `w_up`; `[E, d, d_ff]` for experts).
    """
    d = params["embed"].shape[1]
    out: dict[Path, tuple] = {}
    for i, block in enumerate(params["blocks"]):
        for name in sorted(block["mixer"]):
            w = block["mixer"][name]
            if (name.startswith("w_") and name not in ("w_out", "w_o") and hasattr(w, "ndim")
                    and w.ndim == 2 and w.shape[0] == d):
                out[("blocks", i, "mixer", name)] = ("mixer", i)
        ffn = block["ffn"].get("experts", block["ffn"])
        prefix = ("blocks", i, "ffn") + (("experts",) if "experts" in block["ffn"] else ())
        for name in ("w_gate", "w_up"):
            if name in ffn:
                out[(*prefix, name)] = ("ffn", i)
    return out


def channel_mask(params: PyTree, selections: Mapping[Path, np.ndarray]) -> PyTree:
    """Bool pytree like `params`: True on `W[..., :, j]` for the selected flat channels
    (`[..., d_out]` flattened) of each weight in `selections`, False everywhere else."""
    mask = jax.tree.map(lambda p: np.zeros(np.shape(p), bool), params)
    for path, idx in selections.items():
        w = get_path(params, path)
        lead, d_in, d_out = w.shape[:-2], w.shape[-2], w.shape[-1]
        ch = np.zeros(int(np.prod(lead, dtype=np.int64)) * d_out, bool)
        ch[np.asarray(idx, np.int64)] = True
        ch = ch.reshape(*lead, 1, d_out)
        m = np.broadcast_to(ch, (*lead, d_in, d_out)).copy()
        parent = get_path(mask, path[:-1])
        parent[path[-1]] = m
    return mask


def mask_tree(tree: PyTree, mask: PyTree | None) -> PyTree:
    """`where(mask, x, 0)` leafwise (exact zeros even where x is inf/nan); None = identity."""
    if mask is None:
        return tree
    return jax.tree.map(lambda x, m: jnp.where(m, x, jnp.zeros_like(x)), tree, mask)


def zero_frozen(mask: PyTree) -> optax.GradientTransformation:
    """Stateless transform: zeroes updates where `mask` is False."""

    def update(updates, state, params=None):
        del params
        return mask_tree(updates, mask), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def masked(inner: optax.GradientTransformation, mask: PyTree | None
           ) -> optax.GradientTransformation:
    """`inner` restricted to `mask`: gradients zeroed before (clipping norms and Adam moments see
    only trainable entries), updates zeroed after (so decoupled weight decay cannot move a frozen
    entry). `mask=None` returns `inner` (full fine-tuning)."""
    if mask is None:
        return inner
    return optax.chain(zero_frozen(mask), inner, zero_frozen(mask))


# ---------------------------------------------------------------------------------------------
# Driver: from activations and gradients to a mask.


def select(method: str, params: PyTree, targets: Mapping[Path, Any], cfg: DarsConfig, *,
           acts: Mapping[Any, Any] | None = None, grads: PyTree | None = None
           ) -> tuple[PyTree | None, dict]:
    """Mask for `method` ∈ METHODS, plus a summary `{"selected", "channels", "params"}`.

    Args:
      method: "full" (None mask), "random" (ρ = 1), "top" (ρ = 0) or "dars" (cfg.rho).
      targets: `{weight path: activation site}` (e.g. `lm_targets(params)`).
      acts: `{site: [N, d_in]}` in-distribution activations (needed unless "random"/"full").
      grads: gradient pytree on the fine-tuning data (needed unless "random"/"full").
    """
    check_choice("method", method, METHODS)
    if not isinstance(cfg, DarsConfig):
        raise ArgumentTypeError(f"cfg must be a DarsConfig, got {type(cfg).__name__}")
    if not isinstance(targets, Mapping):
        raise ArgumentTypeError(f"targets must be a dict {{weight path: activation site}}, got "
                                f"{type(targets).__name__}")
    if method == "full":
        n = sum(int(np.size(x)) for x in jax.tree.leaves(params))
        return None, {"selected": None, "channels": None, "params": n}
    rho = {"random": 1.0, "top": 0.0, "dars": cfg.rho}[method]
    cfg = dataclasses.replace(cfg, rho=rho)
    if rho < 1.0 and (acts is None or grads is None):
        raise ValueError(f"method {method!r} needs acts and grads")
    subspaces: dict = {}
    sels: dict[Path, np.ndarray] = {}
    total = chosen = 0
    for salt, (path, site) in enumerate(sorted(targets.items(), key=lambda kv: str(kv[0]))):
        w = get_path(params, path)
        if np.ndim(w) < 2:
            raise ValueError(f"target {path!r} must be a [..., d_in, d_out] weight, got shape "
                             f"{np.shape(w)}")
        if rho < 1.0:
            if site not in acts:
                raise ValueError(f"acts has no activations for site {site!r} (of weight "
                                 f"{path!r}); it holds {sorted(map(str, acts))}")
            if site not in subspaces:
                subspaces[site] = principal_subspace(acts[site], cfg.rank)
            scores = channel_scores(get_path(grads, path), subspaces[site])
        else:
            scores = np.zeros(w.shape[:-2] + w.shape[-1:], np.float32)
        sel = select_channels(scores, cfg, salt=salt)
        sels[path] = sel.all
        total += scores.size
        chosen += sel.all.size
    mask = channel_mask(params, sels)
    n = int(sum(int(np.sum(m)) for m in jax.tree.leaves(mask)))
    return mask, {"selected": chosen, "channels": total, "params": n}


# ---------------------------------------------------------------------------------------------
# Masked training in the library loop.


def _masked_grads(ctx: StepContext) -> tuple[PyTree, PyTree, dict]:
    return mask_tree(ctx.grads, ctx.state.extra["mask"]), ctx.state.extra, {}


def _keep_frozen(state: TrainState, ctx: StepContext) -> tuple[TrainState, dict]:
    mask = state.extra["mask"]
    params = jax.tree.map(lambda new, old, m: jnp.where(m, new, old), state.params,
                          ctx.state.params, mask)
    return dataclasses.replace(state, params=params), {}


def _all_trainable(state: TrainState) -> TrainState:
    return with_mask(state, None)


# Step hooks of sparse fine-tuning: the `<bool>` mask (params' structure) in
# `TrainState.extra["mask"]` (`with_mask`) zeroes the gradient of frozen entries before the
# optimizer (clipping and Adam moments see only trainable ones) and keeps frozen params as they
# were after it (decoupled weight decay cannot move them) — `masked(opt, mask)` with the mask as
# state, so every mask (and full fine-tuning, an all-True mask) shares one compiled step. Their
# `init` puts an all-True mask in a fresh state, so the loop's compiled steps (whose shardings
# follow the initial state's structure) take the mask that `with_mask` swaps in.
MASK_HOOKS = StepHooks(init=_all_trainable, transform_grads=_masked_grads,
                       after_update=_keep_frozen)


def with_mask(state: TrainState, mask: PyTree | None) -> TrainState:
    """`state` to fine-tune under `MASK_HOOKS` with `mask` (None: every entry trainable)."""
    if mask is None:
        mask = jax.tree.map(lambda p: jnp.ones(jnp.shape(p), bool), state.params)
    return dataclasses.replace(state, extra={**state.extra, "mask": mask})
