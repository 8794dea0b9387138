"""Shared router contract: `RouterOutput`, the base config, and the name → router registry.

Every router module under `moejax.routers` exposes:

  Config                       frozen dataclass subclassing `RouterConfig`
  init(key, cfg) -> (params, state)
  route(params, state, x, *, cfg, train, rng=None) -> (RouterOutput, new_state)
  max_assignments(cfg) -> int  static upper bound on experts per token (dropless buffers)

`x` is `[N, d]`, any float dtype. Routing math runs in float32 whatever the input dtype. `state`
is always a dict (possibly empty); if it holds `"active"` (`[E]` bool, MASS expansion slots)
inactive experts get `-inf` logits via `mask_inactive`, so they are never selected and shapes
never change.

Non-finite tokens: a row of `x` holding any NaN or Inf is routed to no expert (mask False,
weight 0) and takes part in no loss, metric or state statistic (loads, Sinkhorn's column sums,
expert choice's top-C, STAR's GHA sums): every router calls `finite_tokens` first, routes the
zeroed rows, and masks them out with `where` (never by multiplying), so neither the other tokens'
routing nor the gradients see a NaN. Their `probs` row is that of a zero input (meaningless).
Modules are imported lazily by name, so `get_router("star")` loads only `moejax.routers.star`.
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp

from moejax.validation import (  # noqa: F401  (check_bool, check_int, check_range re-exported)
    ArgumentTypeError,
    check_array,
    check_bool,
    check_int,
    check_range,
)

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RouterOutput:
    """What every router returns.

    Attributes:
      weights: `<float32>[N, E]` combine weights, 0 where not selected.
      mask: `<bool>[N, E]` selected experts (a variable count per token is allowed).
      probs: `<float32>[N, E]` full routing distribution, for losses and metrics.
      aux_loss: `<float32>[]` sum of this router's auxiliary losses (0 if none).
      metrics: dict of `<float32>[]` scalars (the individual loss terms and router diagnostics).
    """

    weights: Array
    mask: Array
    probs: Array
    aux_loss: Array
    metrics: dict


@dataclasses.dataclass(frozen=True, kw_only=True)
class RouterConfig:
    """Fields every router shares.

    Attributes:
      d_model: input width d (> 0).
      num_experts: number of expert slots E (> 0), including inactive MASS slots.
      top_k: experts per token for top-k style routers, 1 ≤ top_k ≤ num_experts.
    """

    d_model: int
    num_experts: int
    top_k: int = 2

    def __post_init__(self):
        check_int("d_model", self.d_model, lo=1)
        check_int("num_experts", self.num_experts, lo=1)
        check_int("top_k", self.top_k, lo=1)
        if self.top_k > self.num_experts:
            raise ValueError(
                f"top_k={self.top_k} must be <= num_experts={self.num_experts}"
            )


def check_axis_name(name: str, value: Any) -> None:
    """Raises unless `value` is None, a str or a non-empty tuple of str (mapped axis names)."""
    names = (value,) if isinstance(value, str) else value
    if names is not None and not (isinstance(names, tuple) and names
                                  and all(isinstance(a, str) for a in names)):
        raise ArgumentTypeError(f"{name} must be a str, a tuple of str or None, got {value!r}")


# name -> module path. Adding a router = adding a file and a line here.
_ROUTER_MODULES: dict[str, str] = {
    "topk": "moejax.routers.topk",
    "noisy_topk": "moejax.routers.noisy_topk",
    "expert_choice": "moejax.routers.expert_choice",
    "sinkhorn": "moejax.routers.sinkhorn",
    "aux_free": "moejax.routers.aux_free",
    "top_p": "moejax.routers.top_p",
    "top_any": "moejax.routers.top_any",
    "null_experts": "moejax.routers.null_experts",
    "dense_to_sparse": "moejax.routers.dense_to_sparse",
    "star": "moejax.routers.star",
}

ROUTER_NAMES: tuple[str, ...] = tuple(_ROUTER_MODULES)


def get_router(name: str) -> ModuleType:
    """Returns the router module registered under `name` (see the module docstring)."""
    if name not in _ROUTER_MODULES:
        raise ValueError(f"router: unknown router {name!r}; known routers: "
                         f"{', '.join(ROUTER_NAMES)}")
    return importlib.import_module(_ROUTER_MODULES[name])


def make_config(name: str, **kwargs) -> RouterConfig:
    """Builds the frozen `Config` of router `name` from keyword arguments."""
    return get_router(name).Config(**kwargs)


def router_name(cfg: RouterConfig) -> str:
    """The registry name of a router config (the module its `Config` class lives in)."""
    module = type(cfg).__module__
    for name, path in _ROUTER_MODULES.items():
        if path == module:
            return name
    raise ValueError(f"{type(cfg).__name__} from {module} is not a registered router config")


def mask_inactive(logits: Array, state: dict) -> Array:
    """Sets logits of inactive expert slots (`state["active"]` False) to -inf."""
    active = state.get("active") if isinstance(state, dict) else None
    if active is None:
        return logits
    return jnp.where(active[None, :], logits, -jnp.inf)


def topk_mask(scores: Array, k: int) -> Array:
    """`<bool>[N, E]`, True at the k largest entries of each row (ties: lowest index)."""
    _, idx = jax.lax.top_k(scores, k)
    return jnp.any(jax.nn.one_hot(idx, scores.shape[-1], dtype=jnp.bool_), axis=-2)


def masked_weights(scores: Array, mask: Array, *, renormalize: bool) -> Array:
    """`scores` where `mask`, else 0; with `renormalize`, rescaled to sum to 1 per token."""
    weights = jnp.where(mask, scores, 0.0)
    if renormalize:
        weights = weights / jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), 1e-30)
    return weights


def check_input(x: Array, cfg: RouterConfig) -> None:
    """Validates router input `x: [N, d]` (a float array) against the config (static only)."""
    check_array("x", x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ArgumentTypeError(f"router input x must be a float array, got dtype {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"router input x must be [N, d_model], got shape {x.shape}")
    if x.shape[-1] != cfg.d_model:
        raise ValueError(
            f"router input x has d_model={x.shape[-1]}, config d_model={cfg.d_model}"
        )


def finite_tokens(x: Array) -> tuple[Array, Array]:
    """Splits off the non-finite tokens of `x: [N, d]`.

    Returns:
      `(x_safe, finite)`: `finite` is `<bool>[N]`, True where the row holds no NaN or Inf;
      `x_safe` is `x` with the other rows set to 0 (same dtype). Route on `x_safe` and mask with
      `finite`: the zeroed rows keep NaN out of every sum over tokens and out of the gradients
      (`where` passes a zero cotangent to the bad rows; `0 * NaN` would not).
    """
    finite = jnp.all(jnp.isfinite(x), axis=-1)
    return jnp.where(finite[:, None], x, jnp.zeros((), x.dtype)), finite


def valid_mean(values: Array, valid: Array) -> Array:
    """Mean of `values: [N, ...]` over the tokens where `valid: <bool>[N]` (0 if there are none).

    Returns an array of shape `values.shape[1:]` (float32).
    """
    values = values.astype(jnp.float32)
    keep = valid.reshape(valid.shape + (1,) * (values.ndim - 1))
    total = jnp.sum(jnp.where(keep, values, 0.0), axis=0)
    return total / jnp.maximum(jnp.sum(valid, dtype=jnp.float32), 1.0)


def init_gate(key: Array, cfg: RouterConfig) -> Array:
    """`<float32>[E, d]` gate matrix, normal with std `d**-0.5` (logits start at O(1) scale)."""
    shape = (cfg.num_experts, cfg.d_model)
    return jax.random.normal(key, shape, jnp.float32) * cfg.d_model**-0.5


def gate_logits(params: dict, x: Array, *, name: str = "w_g") -> Array:
    """`<float32>[N, E]` logits `x W^T` for `W = params[name]` (`[E, d]`), at full f32 precision."""
    w = params[name].astype(jnp.float32)
    return jnp.einsum(
        "nd,ed->ne", x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST
    )
