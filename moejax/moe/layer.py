"""The sparse MoE layer: router → dispatcher → expert bank → combine (+ shared experts).

Axis letters: N tokens (all leading axes of `x` flattened), d model width, E experts, f expert
hidden width, C capacity slots, K experts per token kept by the dropless dispatcher.

  y_n = Σ_{e in mask_n} weights[n, e] · expert_e(x_n)  +  shared(x_n)

The router (chosen by name from `moejax.routers`) decides `weights`/`mask`; the dispatcher
(`moejax.moe.dispatch`: "capacity" or "dropless") moves tokens; the bank
(`moejax.moe.experts`) computes. Assignments dropped by the capacity dispatcher contribute
nothing (the model's residual carries the token); the share dropped is reported.

Non-finite tokens: a token whose row of `x` holds any NaN or Inf is routed to no expert and its
output row is exactly 0, shared experts included (they run on the zeroed row; having no biases,
they give 0), so the layer neither spreads the bad values to other tokens (through capacity
slots, expert choice's or Sinkhorn's coupling of the batch, router state or losses) nor produces
NaN gradients; the model's residual stream still carries the token as it was. The token counts in
no expert's load, no loss, no router state statistic (STAR's `V`, aux-free biases, ...) and no
metric; `aux["metrics"]["nonfinite_tokens"]` is how many there were, and `checked_moe_apply`
raises on any.

Params: `{"router": router params (top-k style: {"w_g": [E, d]}), "experts": bank,
"shared": {"bank": ..., "gate": [d]?}}` ("shared" only if `num_shared > 0`).
State: `{"router": router state}`; MASS expansion may set `state["router"]["active"]` (`<bool>[E]`)
to switch expert slots off without changing shapes.

Example:
  >>> cfg = MoEConfig(d_model=16, d_ff=32, num_experts=4, top_k=2)
  >>> params, state = init(jax.random.key(0), cfg)
  >>> y, state, aux = moe_apply(params, state, jnp.ones((2, 3, 16)), cfg=cfg, train=True)
  >>> y.shape, aux["top1"].shape
  ((2, 3, 16), (6,))
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from moejax.kernels.gmm import IMPL_NAMES as GMM_IMPL_NAMES
from moejax.moe import dispatch, experts, metrics
from moejax.routers import base as router_base
from moejax.routers import common as router_common
from moejax.validation import ArgumentTypeError, check_array, check_bool, check_int, check_number

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """MoE layer options (hashable: pass it as a static argument of `jit`).

    Attributes:
      d_model: d, token width.
      d_ff: f, hidden width of each routed expert (fine-grained experts: more, narrower ones).
      num_experts: E, routed expert slots (including inactive MASS slots).
      router: registry name (`moejax.routers.ROUTER_NAMES`).
      top_k: experts per token for top-k style routers (passed to the router config).
      router_kwargs: extra router config fields, as `(key, value)` pairs or a mapping; stored
        as a sorted tuple of pairs so the config stays hashable.
      dispatcher: "dropless" (sort + grouped matmul, never drops) or "capacity".
      capacity_factor: cf > 0; capacity dispatcher slots `C = ⌈cf·N·k/E⌉` with
        k = the router's `max_assignments` (its static bound on experts per token).
      num_shared: always-on shared experts (0 = none).
      d_ff_shared: hidden width of each shared expert; default `d_ff`.
      shared_gate: scale the shared output by a per-token sigmoid gate (Qwen1.5-MoE).
      activation: "swiglu" or "gelu" (all experts).
      gmm_impl: grouped-matmul backend of the dropless dispatcher (`moejax.kernels.gmm`).
      dtype: expert parameter (and expert matmul) dtype; routing is always float32.
      check_numerics: add `checkify` checks that `x` holds no non-finite token and that the
        router's probabilities hold no NaN (from NaN router params). Run the layer through
        `checked_moe_apply` (or your own `checkify.checkify`) to get the error; under a plain
        `jit` leave it off (non-finite tokens are then only counted in the metrics).
      parallel: None (one device / plain data parallelism) or a
        `moejax.parallel.ExpertParallel` (its mesh): the same `moe_apply` then runs
        expert-parallel — tokens split over the mesh, experts over its expert axis, moved by
        `all_to_all` (the dispatcher sets the buffer capacity; see that module).
    """

    d_model: int
    d_ff: int
    num_experts: int
    router: str = "topk"
    top_k: int = 2
    router_kwargs: tuple[tuple[str, Any], ...] | Mapping[str, Any] = ()
    dispatcher: str = "dropless"
    capacity_factor: float = 1.25
    num_shared: int = 0
    d_ff_shared: int | None = None
    shared_gate: bool = False
    activation: str = "swiglu"
    gmm_impl: str = "auto"
    dtype: Any = jnp.float32
    check_numerics: bool = False
    parallel: Any = None

    def __post_init__(self):
        for name in ("d_model", "d_ff", "num_experts"):
            check_int(name, getattr(self, name), lo=1)
        check_int("num_shared", self.num_shared, lo=0)
        if self.d_ff_shared is not None:
            check_int("d_ff_shared", self.d_ff_shared, lo=1)
        if self.router not in router_base.ROUTER_NAMES:  # None, non-str: "unknown router"
            raise ValueError(f"router: unknown router {self.router!r}; known routers: "
                             f"{', '.join(router_base.ROUTER_NAMES)}")
        if self.dispatcher not in dispatch.DISPATCHERS:
            raise ValueError(f"dispatcher must be one of {dispatch.DISPATCHERS}, "
                             f"got {self.dispatcher!r}")
        check_number("capacity_factor", self.capacity_factor)  # a finite number, not a str
        if not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0, got {self.capacity_factor!r}")
        check_bool("shared_gate", self.shared_gate)
        check_bool("check_numerics", self.check_numerics)
        experts.check_activation(self.activation)
        if self.gmm_impl not in GMM_IMPL_NAMES:
            raise ValueError(f"gmm_impl must be one of {GMM_IMPL_NAMES}, got {self.gmm_impl!r}")
        if self.dtype is None:
            raise ValueError("dtype: not a dtype: None (give e.g. jnp.float32)")
        try:
            object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        except TypeError as err:
            raise ValueError(f"dtype: not a dtype: {self.dtype!r}") from err
        if not jnp.issubdtype(self.dtype, jnp.floating):
            raise ValueError(f"dtype must be a float dtype, got {self.dtype}")
        pairs = _router_pairs(self.router_kwargs)
        object.__setattr__(self, "router_kwargs", pairs)
        fields = {f.name for f in dataclasses.fields(router_base.get_router(self.router).Config)}
        for key, _ in pairs:
            if key in ("d_model", "num_experts", "top_k"):
                raise ValueError(f"router_kwargs: set {key!r} on MoEConfig itself, not here")
            if key not in fields:
                own = sorted(fields - {"d_model", "num_experts", "top_k"})
                raise ValueError(f"router_kwargs: router {self.router!r} has no option {key!r}; "
                                 f"its options: {', '.join(own) or '(none)'}")
        router_base.make_config(  # validates; `router_config` builds it again on demand
            self.router, d_model=self.d_model, num_experts=self.num_experts, top_k=self.top_k,
            **dict(pairs))
        if self.parallel is not None:
            if not all(hasattr(self.parallel, hook) for hook in _PARALLEL_HOOKS):
                raise ArgumentTypeError(
                    f"parallel must be None or a moejax.parallel.ExpertParallel, got "
                    f"{type(self.parallel).__name__}")
            self.parallel.check_config(self)

    @property
    def router_config(self) -> router_base.RouterConfig:
        """The router's own frozen `Config`, built from the fields above (on demand, cached:
        every field of a `MoEConfig` is a declared, saved option)."""
        return _router_config(self.router, self.d_model, self.num_experts, self.top_k,
                              self.router_kwargs)

    @property
    def max_assignments(self) -> int:
        """The router's static bound on experts per token (k of the dispatchers)."""
        return int(router_base.get_router(self.router).max_assignments(self.router_config))


@functools.lru_cache(maxsize=512)
def _router_config(router: str, d_model: int, num_experts: int, top_k: int,
                   pairs: tuple[tuple[str, Any], ...]) -> router_base.RouterConfig:
    """`MoEConfig.router_config`, built once per distinct (equal) config."""
    return router_base.make_config(router, d_model=d_model, num_experts=num_experts,
                                   top_k=top_k, **dict(pairs))


_PARALLEL_HOOKS = ("check_config", "shard_tokens", "replicate", "dispatch")


def _router_pairs(kwargs: Any) -> tuple[tuple[str, Any], ...]:
    """`router_kwargs` as a sorted, hashable tuple of `(str, value)` pairs; ValueError if not."""
    if isinstance(kwargs, Mapping):
        items = tuple(kwargs.items())
    elif isinstance(kwargs, tuple | list) and all(
            isinstance(p, tuple | list) and len(p) == 2 for p in kwargs):
        items = tuple(tuple(p) for p in kwargs)
    else:
        raise ArgumentTypeError(f"router_kwargs must be a mapping or a tuple of (name, value) "
                                f"pairs, got {kwargs!r}")
    keys = [key for key, _ in items]
    if not all(isinstance(key, str) for key in keys):
        raise ArgumentTypeError(f"router_kwargs names must be str, got {items!r}")
    if len(set(keys)) != len(keys):
        raise ValueError(f"router_kwargs names a field twice: {items!r}")
    pairs = tuple(sorted(items, key=lambda pair: pair[0]))
    try:
        hash(pairs)
    except TypeError as err:
        raise ValueError(f"router_kwargs values must be hashable, got {pairs!r}") from err
    return pairs


def init(key: Array, cfg: MoEConfig) -> tuple[dict, dict]:
    """Initialises router, expert bank and shared experts.

    Returns:
      `(params, state)`: params `{"router", "experts", ("shared")}`, state `{"router"}`.
    """
    k_router, k_experts, k_shared = jax.random.split(key, 3)
    router_params, router_state = router_base.get_router(cfg.router).init(
        k_router, cfg.router_config)
    params = {
        "router": router_params,
        "experts": experts.init_bank(k_experts, num_experts=cfg.num_experts,
                                     d_model=cfg.d_model, d_ff=cfg.d_ff,
                                     activation=cfg.activation, dtype=cfg.dtype),
    }
    if cfg.num_shared:
        params["shared"] = experts.init_shared(
            k_shared, num_shared=cfg.num_shared, d_model=cfg.d_model,
            d_ff=cfg.d_ff_shared or cfg.d_ff, activation=cfg.activation,
            gated=cfg.shared_gate, dtype=cfg.dtype)
    return params, {"router": router_state}


def _capacity(bank: dict, x: Array, out: router_base.RouterOutput, cfg: MoEConfig):
    n, e = out.mask.shape
    c = dispatch.compute_capacity(n, e, cfg.max_assignments, cfg.capacity_factor)
    plan = dispatch.capacity_plan(out.weights, out.mask, capacity=c)
    ye = experts.apply_dense(bank, dispatch.capacity_dispatch(plan, x))
    return dispatch.capacity_combine(plan, ye), plan.stats


def _dropless(bank: dict, x: Array, out: router_base.RouterOutput, cfg: MoEConfig):
    plan = dispatch.sort_plan(out.weights, out.mask, k=cfg.max_assignments)
    ys = experts.apply_grouped(bank, dispatch.permute(plan, x), plan.group_sizes,
                               impl=cfg.gmm_impl)
    return dispatch.unpermute(plan, ys), plan.stats


_DISPATCH = MappingProxyType({"capacity": _capacity, "dropless": _dropless})


def _validate(params: dict, state: dict, x: Array, cfg: MoEConfig) -> None:
    if not isinstance(cfg, MoEConfig):
        raise ArgumentTypeError(f"cfg must be a MoEConfig, got {type(cfg).__name__}")
    for name, tree, keys in (("params", params, ("router", "experts")),
                             ("state", state, ("router",))):
        if not isinstance(tree, Mapping) or any(k not in tree for k in keys):
            got = sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__
            raise ArgumentTypeError(f"{name} must be the dict from init(key, cfg) with keys "
                                    f"{list(keys)}, got {got}")
    check_array("x", x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ArgumentTypeError(f"x must be a float array, got dtype {x.dtype}")
    if x.ndim < 1 or x.shape[-1] != cfg.d_model:
        raise ValueError(f"x must be [..., d_model] with d_model={cfg.d_model}, got shape "
                         f"{x.shape}")
    want = (cfg.num_experts, cfg.d_model, cfg.d_ff)
    if not isinstance(params["experts"], Mapping) or "w_up" not in params["experts"]:
        raise ArgumentTypeError("params['experts'] must be the expert bank from init(key, cfg)")
    got = tuple(params["experts"]["w_up"].shape)
    if got != want:
        raise ValueError(f"params['experts']['w_up'] has shape {got}, but the config "
                         f"(num_experts, d_model, d_ff) gives {want}")


def moe_apply(params: dict, state: dict, x: Array, *, cfg: MoEConfig, train: bool,
              rng: Array | None = None) -> tuple[Array, dict, dict]:
    """Applies the MoE layer.

    Args:
      params: from `init`.
      state: from `init` or the previous call.
      x: `[..., d]` tokens, a float array; leading axes are flattened to N. A token whose row
        holds NaN or Inf is routed nowhere and gets a zero output row (module docstring).
      cfg: `MoEConfig` (static).
      train: training mode (passed to the router: noise, state updates).
      rng: PRNG key for stochastic routers.

    Returns:
      `(y, new_state, aux)`: `y` like `x`; `aux = {"aux_loss": <float32>[] sum of router
      losses, "metrics": dict of float32 scalars, "load": <float32>[E] share of assignments,
      "top1": <int32>[N] top-1 expert (for a non-finite token that of a zero input, which
      means nothing)}`. The metrics are the
      DESIGN §6 suite over the finite tokens — `cv`, `max_vio`, `load_entropy`,
      `dead_experts`, `avg_k` (assignments per finite token), `active_experts`,
      `dropped_fraction` (share of assignments dropped), `dropped_token_fraction` (share of
      finite tokens with every assignment dropped) — plus `nonfinite_tokens` (the number of
      tokens, out of N, whose row of `x` held NaN/Inf) and the router's own metrics prefixed
      "router/".

    Raises:
      ArgumentTypeError (a TypeError and a ValueError): `x` not a float array, `params` /
        `state` not the dicts of `init`.
      ValueError: `x`'s last axis is not `d_model`, or params do not match `cfg`.
    """
    _validate(params, state, x, cfg)
    xf = x.reshape(-1, cfg.d_model)
    if cfg.parallel is not None:
        xf = cfg.parallel.shard_tokens(xf)
    # The routers split off non-finite tokens the same way (`finite_tokens` on the same `xf`;
    # under jit the two computations are one), and route them nowhere.
    x_safe, finite = router_common.finite_tokens(xf)
    num_finite = jnp.sum(finite, dtype=jnp.float32)
    num_nonfinite = xf.shape[0] - num_finite
    if cfg.check_numerics:
        checkify.check(num_nonfinite == 0,
                       f"moe_apply: {{count}} of the {xf.shape[0]} tokens of x hold NaN or Inf "
                       f"(metric nonfinite_tokens); they were routed to no expert and their "
                       f"output rows set to 0",
                       count=num_nonfinite.astype(jnp.int32))
    route = router_base.get_router(cfg.router).route
    out, router_state = route(params["router"], state["router"], xf, cfg=cfg.router_config,
                              train=train, rng=rng)
    if out.weights.shape != (xf.shape[0], cfg.num_experts):
        raise ValueError(f"router {cfg.router!r} returned weights of shape {out.weights.shape}, "
                         f"expected [N, num_experts] = {(xf.shape[0], cfg.num_experts)}")
    if cfg.check_numerics:
        checkify.check(~jnp.any(jnp.isnan(out.probs)),
                       f"router {cfg.router!r} produced NaN routing logits/probabilities "
                       f"(check the layer input x and params['router'])")
    if cfg.parallel is None:
        y, dispatch_stats = _DISPATCH[cfg.dispatcher](params["experts"], x_safe, out, cfg)
    else:
        y, dispatch_stats = cfg.parallel.dispatch(params["experts"], x_safe, out, cfg)
        router_state = cfg.parallel.replicate(router_state)
    if "shared" in params:
        y = y + experts.apply_shared(params["shared"], x_safe).astype(y.dtype)
    # A non-finite token's row of y is exactly 0 without a mask: it has no routed weight, and
    # the shared experts (no biases) map its zeroed row to 0.
    active = router_state.get("active") if isinstance(router_state, dict) else None
    load, suite = metrics.load_metrics(out.mask, active=active, valid=finite)
    suite.update(dispatch_stats)
    # The dispatchers divide by all N tokens; the non-finite ones cannot lose an assignment.
    suite["dropped_token_fraction"] = (dispatch_stats["dropped_token_fraction"] * xf.shape[0]
                                       / jnp.maximum(num_finite, 1.0))
    suite["nonfinite_tokens"] = num_nonfinite
    suite.update({f"router/{name}": value for name, value in out.metrics.items()})
    aux = {
        "aux_loss": jnp.asarray(out.aux_loss, jnp.float32),
        "metrics": suite,
        "load": load,
        "top1": metrics.top1_expert(out.weights, out.mask, out.probs),
    }
    return y.astype(x.dtype).reshape(x.shape), {**state, "router": router_state}, aux


def checked_moe_apply(params: dict, state: dict, x: Array, *, cfg: MoEConfig, train: bool,
                      rng: Array | None = None):
    """`moe_apply` with the numerics checks on, functionalised by `checkify`.

    Returns:
      `(err, (y, new_state, aux))`; `err.throw()` raises `checkify.JaxRuntimeError` if tokens
      of `x` held NaN/Inf (the message gives their number; the outputs are still those of
      `moe_apply`: those tokens routed nowhere) or, failing that, if the router's
      probabilities held NaN (NaN router params).
    """
    cfg = dataclasses.replace(cfg, check_numerics=True)
    fn = functools.partial(moe_apply, cfg=cfg, train=train)
    return checkify.checkify(fn)(params, state, x, rng=rng)
