"""Auxiliary-loss-free load balancing (DeepSeek-AI 2024, "DeepSeek-V3 Technical Report", §2.1.2).

Affinities `s = σ(x W_g^T)`; each token selects the top-k experts of `s + b`, where the bias
`b ∈ R^E` lives in router state and only steers selection: the combine weights are `s` over the
selected experts, normalised to sum 1. After each training forward
`b_e += γ · sign(mean_load − load_e)` with loads counted from this batch's assignments (mean over
active slots only; inactive slots keep their bias; a token with NaN/Inf input selects nothing, so
it is in no load). No auxiliary loss and no gradient into `b`.
Shared (always-on) and fine-grained experts are expert-bank settings, not router ones.
Under data parallelism the loads must be summed over replicas before the update, so that every
replica holds the same `b`: set `axis_name` when routing inside `shard_map`/`pmap` (under `jit`
on global arrays, as `moejax.parallel` runs the router, the sum over N is already global).
Axis letters: N tokens, d model width, E experts.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from moejax.routers import base, common
from moejax.validation import check_axis_name, check_range

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(base.RouterConfig):
    """Aux-free router options (plus `d_model`, `num_experts`, `top_k` of `RouterConfig`).

    Attributes:
      bias_update_rate: γ of the bias update (≥ 0; 0 freezes the bias).
      axis_name: mapped axis name (or tuple of names) over which the loads are summed before
        the bias update (None: this batch only).
    """

    bias_update_rate: float = 1e-3
    axis_name: str | tuple[str, ...] | None = None

    def __post_init__(self):
        super().__post_init__()
        check_range("bias_update_rate", self.bias_update_rate, 0.0, float("inf"),
                    lo_open=False, hi_open=True)
        check_axis_name("axis_name", self.axis_name)


def init(key: Array, cfg: Config) -> tuple[dict, dict]:
    """Returns `({"w_g": <float32>[E, d]}, {"bias": <float32>[E] zeros})`."""
    return {"w_g": common.init_gate(key, cfg)}, {"bias": jnp.zeros((cfg.num_experts,), jnp.float32)}


def update_bias(bias: Array, mask: Array, active: Array, rate: float,
                axis_name: str | tuple[str, ...] | None = None) -> Array:
    """`b + γ·sign(mean_load − load)` on active slots; `mask: <bool>[N, E]`, `active: <bool>[E]`.

    With `axis_name`, the loads are summed over that mapped axis first (global loads).
    """
    load = jnp.sum(mask.astype(jnp.float32), axis=0)
    if axis_name is not None:
        load = jax.lax.psum(load, axis_name)
    mean_load = jnp.sum(load) / jnp.maximum(jnp.sum(active.astype(jnp.float32)), 1.0)
    return bias + rate * jnp.where(active, jnp.sign(mean_load - load), 0.0)


def route(params: dict, state: dict, x: Array, *, cfg: Config, train: bool,
          rng: Array | None = None) -> tuple[base.RouterOutput, dict]:
    """Routes `x: [N, d]` to the top-k experts of `σ(logits) + bias`.

    Args:
      params: `{"w_g": [E, d]}`.
      state: `{"bias": <float32>[E]}`, optionally with `"active": <bool>[E]`.
      x: `[N, d]` tokens, any float dtype (routing runs in float32); rows with NaN/Inf are
        routed nowhere and left out of every loss, metric and statistic.
      cfg: `Config`.
      train: when True the returned state carries the updated bias.
      rng: unused.

    Returns:
      `(RouterOutput, new_state)`; `probs = s / Σ_e s` (affinities as a distribution), weights sum
      to 1 over the selected experts, aux_loss 0. Metric `bias_abs_max`: `max_e |b_e|`.
    """
    del rng
    base.check_input(x, cfg)
    if "bias" not in state:
        raise ValueError("aux_free.route needs state['bias'] of shape [num_experts]; use init()")
    x, finite = common.finite_tokens(x)
    logits = common.mask_inactive(common.gate_logits(params, x), state)
    valid = jnp.isfinite(logits) & finite[:, None]
    bias = jax.lax.stop_gradient(state["bias"].astype(jnp.float32))
    s = jax.nn.sigmoid(logits)  # sigmoid(-inf) = 0 on inactive slots
    mask = common.topk_mask(jnp.where(valid, s + bias, -jnp.inf), cfg.top_k) & valid
    selected = jnp.where(mask, s, 0.0)
    weights = selected / jnp.maximum(jnp.sum(selected, axis=-1, keepdims=True), 1e-30)
    probs = s / jnp.maximum(jnp.sum(s, axis=-1, keepdims=True), 1e-30)
    new_state = state
    if train:
        active = state.get("active", jnp.ones((cfg.num_experts,), jnp.bool_))
        new_state = {**state, "bias": update_bias(bias, mask, active, cfg.bias_update_rate,
                                                       cfg.axis_name)}
    out = base.RouterOutput(weights=weights, mask=mask, probs=probs,
                            aux_loss=jnp.zeros((), jnp.float32),
                            metrics={"bias_abs_max": jnp.max(jnp.abs(bias))})
    return out, new_state


def max_assignments(cfg: Config) -> int:
    """Each token selects at most `top_k` experts."""
    return cfg.top_k
