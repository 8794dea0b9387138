"""The router contract: `RouterOutput`, the base config, the input check and the name → router
registry. The gate helpers the routers share live in `moejax.routers.common`.

Every router module under `moejax.routers` exposes:

  Config                       frozen dataclass subclassing `RouterConfig`
  init(key, cfg) -> (params, state)
  route(params, state, x, *, cfg, train, rng=None) -> (RouterOutput, new_state)
  max_assignments(cfg) -> int  static upper bound on experts per token (dropless buffers)

`x` is `[N, d]`, any float dtype. Routing math runs in float32 whatever the input dtype. `state`
is always a dict (possibly empty); if it holds `"active"` (`[E]` bool, MASS expansion slots)
inactive experts get `-inf` logits via `common.mask_inactive`, so they are never selected and
shapes never change.

Non-finite tokens: a row of `x` holding any NaN or Inf is routed to no expert (mask False,
weight 0) and takes part in no loss, metric or state statistic (loads, Sinkhorn's column sums,
expert choice's top-C, STAR's GHA sums): every router calls `common.finite_tokens` first, routes
the zeroed rows, and masks them out with `where` (never by multiplying), so neither the other
tokens' routing nor the gradients see a NaN. Their `probs` row is that of a zero input
(meaningless).
Modules are imported lazily by name, so `get_router("star")` loads only `moejax.routers.star`.
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType

import jax
import jax.numpy as jnp

from moejax import validation  # module-qualified: base re-exports no checker

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
        validation.check_int("d_model", self.d_model, lo=1)
        validation.check_int("num_experts", self.num_experts, lo=1)
        validation.check_int("top_k", self.top_k, lo=1)
        if self.top_k > self.num_experts:
            raise ValueError(
                f"top_k={self.top_k} must be <= num_experts={self.num_experts}"
            )


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


def check_input(x: Array, cfg: RouterConfig) -> None:
    """Validates router input `x: [N, d]` (a float array) against the config (static only)."""
    validation.check_array("x", x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise validation.ArgumentTypeError(
            f"router input x must be a float array, got dtype {x.dtype}"
        )
    if x.ndim != 2:
        raise ValueError(f"router input x must be [N, d_model], got shape {x.shape}")
    if x.shape[-1] != cfg.d_model:
        raise ValueError(
            f"router input x has d_model={x.shape[-1]}, config d_model={cfg.d_model}"
        )
