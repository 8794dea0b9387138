"""Flax NNX wrappers over the pure layers: `MoE` and `DeltaMixer`.

Thin shells, no math: each module holds the pytrees of the pure `init` as NNX variables and calls
the pure function. Trainable arrays are `nnx.Param`; the router's state (STAR's subspace `V`, the
aux-loss-free bias, the dense-to-sparse step, MASS's `active` mask) is `RouterState`, an
`nnx.Variable` that is *not* a `Param`, so `nnx.grad`, `nnx.value_and_grad` and `nnx.Optimizer`
with their default `wrt=nnx.Param` never differentiate or update it; `MoE.__call__` writes the
router's new state back in place (under `nnx.jit` / `nnx.grad` too: NNX carries the update out).

The parameter trees keep the pure layout (`moejax.moe.layer` and `moejax.layers.delta_mixer`
docstrings), so `as_pure()` and `from_pure(...)` move a layer between the two worlds losslessly.

Example:
  >>> from flax import nnx
  >>> from moejax.moe.layer import MoEConfig
  >>> moe = MoE(MoEConfig(d_model=16, d_ff=32, num_experts=4, router="star"), rngs=nnx.Rngs(0))
  >>> y, aux = moe(jnp.ones((2, 3, 16)), train=True)   # also updates moe.router_state["v"]
  >>> y.shape
  (2, 3, 16)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.layers import delta_mixer
from moejax.moe import layer as moe_layer

Array = jax.Array

__all__ = ["DeltaMixer", "MoE", "RouterState"]


class RouterState(nnx.Variable):
    """Non-trainable router state (no gradient, not touched by `nnx.Optimizer(wrt=nnx.Param)`)."""


def _is_var(v: Any) -> bool:
    return isinstance(v, nnx.Variable)


def _wrap(tree: Any, cls: type[nnx.Variable]) -> Any:
    """A pytree of arrays -> the same pytree of `cls` variables."""
    return jax.tree.map(cls, tree)


def _unwrap(tree: Any) -> Any:
    """A pytree of variables -> the same pytree of their values."""
    return jax.tree.map(lambda v: v.get_value(), tree, is_leaf=_is_var)


def _assign(tree: Any, new: Any, what: str) -> None:
    """Writes the arrays of `new` into the variables of `tree` (same structure required)."""
    old_def = jax.tree.structure(tree, is_leaf=_is_var)
    new_def = jax.tree.structure(new)
    if old_def != new_def:
        raise ValueError(f"{what}: got a tree of structure {new_def}, "
                         f"but the module holds {old_def}")
    jax.tree.map(lambda v, a: v.set_value(a), tree, new, is_leaf=_is_var)


def _key(rng: Array | nnx.Rngs | None) -> Array | None:
    """A PRNG key from `rng` (a key, an `nnx.Rngs` to draw one from, or None)."""
    return rng() if isinstance(rng, nnx.Rngs) else rng


class MoE(nnx.Module):
    """Sparse MoE layer (`moejax.moe.layer.moe_apply`) as an NNX module.

    Attributes:
      cfg: the layer's `MoEConfig` (static).
      params: `{"router", "experts", ("shared")}` of the pure `init`, leaves `nnx.Param`.
      router_state: `{"router": ...}` of the pure `init`, leaves `RouterState`.
    """

    def __init__(self, cfg: moe_layer.MoEConfig, *, rngs: nnx.Rngs):
        """Initialises with `moejax.moe.layer.init(rngs.params(), cfg)`.

        Args:
          cfg: `MoEConfig`.
          rngs: `nnx.Rngs`; one key is drawn from its `params` stream.
        """
        params, state = moe_layer.init(rngs.params(), cfg)
        self._set(cfg, params, state)

    def _set(self, cfg: moe_layer.MoEConfig, params: dict, state: dict) -> None:
        self.cfg = cfg
        self.params = nnx.data(_wrap(params, nnx.Param))
        self.router_state = nnx.data(_wrap(state, RouterState))

    @classmethod
    def from_pure(cls, cfg: moe_layer.MoEConfig, params: dict, state: dict) -> MoE:
        """Wraps existing pure `(params, state)` (e.g. from `moe.layer.init` or a checkpoint)."""
        module = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))  # shapes only, no init
        _assign(module.params, params, "params")
        _assign(module.router_state, state, "state")
        return module

    def as_pure(self) -> tuple[dict, dict]:
        """The current `(params, state)` as plain array pytrees for `moe_apply`."""
        return _unwrap(self.params), _unwrap(self.router_state)

    def __call__(self, x: Array, *, train: bool, rng: Array | nnx.Rngs | None = None
                 ) -> tuple[Array, dict]:
        """Applies the layer and stores the router's new state.

        Args:
          x: `[..., d]` tokens.
          train: training mode (router noise and state updates such as STAR's GHA step).
          rng: PRNG key, or an `nnx.Rngs` to draw one from; needed by stochastic routers
            (noisy top-k, dense-to-sparse) when `train`.

        Returns:
          `(y, aux)`: `y` like `x`; `aux` as returned by `moe_apply` (aux_loss, metrics, load,
          top1). A token of `x` holding NaN/Inf is routed nowhere (zero output row), leaves the
          stored router state untouched, and is counted in `aux["metrics"]["nonfinite_tokens"]`.
        """
        params, state = self.as_pure()
        y, new_state, aux = moe_layer.moe_apply(params, state, x, cfg=self.cfg, train=train,
                                                rng=_key(rng))
        _assign(self.router_state, new_state, "state")
        return y, aux


class DeltaMixer(nnx.Module):
    """Delta-rule token mixer (`moejax.layers.delta_mixer`) as an NNX module.

    The decode cache is passed in and out explicitly (it belongs to a sequence, not the layer).

    Attributes:
      cfg: the layer's `DeltaMixerConfig` (static).
      params: the pure `init` tree, leaves `nnx.Param`.
    """

    def __init__(self, cfg: delta_mixer.DeltaMixerConfig, *, rngs: nnx.Rngs):
        """Initialises with `moejax.layers.delta_mixer.init(rngs.params(), cfg)`.

        Args:
          cfg: `DeltaMixerConfig`.
          rngs: `nnx.Rngs`; one key is drawn from its `params` stream.
        """
        self.cfg = cfg
        self.params = nnx.data(_wrap(delta_mixer.init(rngs.params(), cfg), nnx.Param))

    @classmethod
    def from_pure(cls, cfg: delta_mixer.DeltaMixerConfig, params: dict) -> DeltaMixer:
        """Wraps an existing pure parameter tree."""
        module = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))  # shapes only, no init
        _assign(module.params, params, "params")
        return module

    def as_pure(self) -> dict:
        """The current parameters as a plain array pytree for `delta_mixer.apply`."""
        return _unwrap(self.params)

    def init_cache(self, batch: int, dtype: Any = jnp.float32) -> dict:
        """A fresh decode cache for `batch` sequences (`delta_mixer.init_cache`)."""
        return delta_mixer.init_cache(self.cfg, batch, dtype)

    def __call__(self, x: Array, cache: dict | None = None,
                 segment_ids: Array | None = None, cu_seqlens: Array | None = None
                 ) -> tuple[Array, dict]:
        """Mixes a sequence; with `cache`, continues the sequence the cache came from.

        Args:
          x: `[B, T, d]`.
          cache: from `init_cache`, a previous call or `step`; None starts a fresh sequence.
          segment_ids: `[B, T]` int document ids of packed rows (`delta_mixer.apply`), or None.
          cu_seqlens: `[N + 1]` boundaries of sequences packed in one row, each continuing
            its own row of an N-row cache (`delta_mixer.apply`), or None.

        Returns:
          `(y [B, T, d] in x's dtype, new_cache)`.
        """
        return delta_mixer.apply(self.as_pure(), x, cfg=self.cfg, cache=cache,
                                 segment_ids=segment_ids, cu_seqlens=cu_seqlens)

    def step(self, x_t: Array, cache: dict) -> tuple[Array, dict]:
        """Decodes one token with `delta_rule_step`.

        Args:
          x_t: `[B, d]`.
          cache: from `init_cache`, `__call__` or a previous `step`.

        Returns:
          `(y_t [B, d], new_cache)`.
        """
        return delta_mixer.step(self.as_pure(), x_t, cache, cfg=self.cfg)
