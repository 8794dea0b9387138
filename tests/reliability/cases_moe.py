"""Bad-input cases of the MoE layer, its config, the router configs and the routers themselves."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from moejax.moe.expansion import ExpansionConfig
from moejax.moe.layer import MoEConfig, init, moe_apply
from moejax.routers import get_router
from moejax.validation import ArgumentTypeError
from tests.reliability.cases import Case

_BASE = dict(d_model=8, d_ff=16, num_experts=4, top_k=2)


@functools.cache
def _layer():
    cfg = MoEConfig(**_BASE)
    params, state = init(jax.random.key(0), cfg)
    return cfg, params, state


_DEFAULT = object()


def _apply(x=_DEFAULT, params=_DEFAULT, state=_DEFAULT):
    cfg, p, s = _layer()
    return moe_apply(p if params is _DEFAULT else params, s if state is _DEFAULT else state,
                     jnp.ones((3, 8)) if x is _DEFAULT else x, cfg=cfg, train=True)


def _router_cfg(router, **kwargs):
    return lambda: MoEConfig(**_BASE, router=router, router_kwargs=kwargs)


def _route_int_x():
    mod = get_router("topk")
    cfg = mod.Config(d_model=8, num_experts=4)
    params, state = mod.init(jax.random.key(0), cfg)
    return mod.route(params, state, jnp.ones((3, 8), jnp.int32), cfg=cfg, train=True)


CASES: list[Case] = [
    # moe_apply: the input.
    Case("moe-int-x", lambda: _apply(jnp.ones((3, 8), jnp.int32)), ArgumentTypeError,
         ("x", "float", "int32")),
    Case("moe-bool-x", lambda: _apply(jnp.ones((3, 8), jnp.bool_)), ArgumentTypeError,
         ("x", "float", "bool")),
    Case("moe-list-x", lambda: _apply([[1.0] * 8] * 3), ArgumentTypeError, ("x", "array")),
    Case("moe-numpy-int-x", lambda: _apply(np.ones((3, 8), np.int64)), ArgumentTypeError,
         ("x", "int64")),
    Case("moe-wrong-d-model", lambda: _apply(jnp.ones((3, 5))), ValueError, ("x", "d_model=8")),
    Case("moe-none-x", lambda: _apply(None), ArgumentTypeError, ("x", "array", "NoneType")),
    Case("moe-none-params", lambda: _apply(params=None), ArgumentTypeError,
         ("params", "init")),
    Case("moe-state-missing-router", lambda: _apply(state={"v": 1}), ArgumentTypeError,
         ("state", "router")),
    # MoEConfig fields.
    Case("moe-config-d-model-str", lambda: MoEConfig(**{**_BASE, "d_model": "8"}),
         ArgumentTypeError, ("d_model", "int")),
    Case("moe-config-num-experts-bool", lambda: MoEConfig(**{**_BASE, "num_experts": True}),
         ArgumentTypeError, ("num_experts", "int")),
    Case("moe-config-top-k-none", lambda: MoEConfig(**{**_BASE, "top_k": None}),
         ArgumentTypeError, ("top_k", "int")),
    Case("moe-config-capacity-factor-str", lambda: MoEConfig(**_BASE, capacity_factor="1.25"),
         ArgumentTypeError, ("capacity_factor", "number")),
    Case("moe-config-capacity-factor-nan",
         lambda: MoEConfig(**_BASE, capacity_factor=float("nan")), ValueError,
         ("capacity_factor", "finite")),
    Case("moe-config-shared-gate-str", lambda: MoEConfig(**_BASE, shared_gate="yes"),
         ArgumentTypeError, ("shared_gate", "bool")),
    Case("moe-config-unknown-router", lambda: MoEConfig(**_BASE, router="switch"), ValueError,
         ("router", "switch", "topk")),
    Case("moe-config-unknown-dispatcher", lambda: MoEConfig(**_BASE, dispatcher="scatter"),
         ValueError, ("dispatcher", "scatter", "dropless")),
    Case("moe-config-dtype-none", lambda: MoEConfig(**_BASE, dtype=None), ValueError,
         ("dtype",)),
    # Router configs, through MoEConfig(router_kwargs=...).
    Case("moe-router-eta-str", _router_cfg("star", eta="2e-5"), ArgumentTypeError,
         ("eta", "number")),
    Case("moe-router-top-p-nan", _router_cfg("top_p", top_p=float("nan")), ValueError,
         ("top_p",)),
    Case("moe-router-bias-rate-none", _router_cfg("aux_free", bias_update_rate=None),
         ArgumentTypeError, ("bias_update_rate", "number")),
    Case("moe-router-renormalize-str", _router_cfg("topk", renormalize="true"),
         ArgumentTypeError, ("renormalize", "bool")),
    Case("moe-router-num-iters-float", _router_cfg("sinkhorn", num_iters=3.0),
         ArgumentTypeError, ("num_iters", "int")),
    Case("moe-router-threshold-out-of-range", _router_cfg("dense_to_sparse", threshold=1.5),
         ValueError, ("threshold", "[0.0, 1.0)")),
    Case("moe-router-unknown-option", _router_cfg("star", etaa=1e-3), ValueError,
         ("router_kwargs", "etaa", "eta")),
    # MASS expansion.
    Case("moe-expansion-total-steps-none", lambda: ExpansionConfig(total_steps=None),
         ArgumentTypeError, ("total_steps", "int")),
    # A router called directly.
    Case("moe-route-int-x", _route_int_x, ArgumentTypeError, ("x", "float", "int32")),
]
