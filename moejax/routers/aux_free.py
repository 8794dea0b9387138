"""Auxiliary-loss-free load balancing (DeepSeek-AI 2024, "DeepSeek-V3 Technical Report", §2.1.2).

Affinities `s = σ(x W_g^T)`; each token selects the top-k experts of `s + b`, where the bias
`b ∈ R^E` lives in router state and only steers selection: the combine weights are `s` over the
selected experts, normalised to sum 1. After each training forward
`b_e += γ · sign(mean_load − load_e)` with loads counted from this batch's assignments (mean over
active slots only; inactive slots keep their bias; a token with NaN/Inf input selects nothing, so
it is in no load). No auxiliary loss and no gradient into `b`.

DeepSeek-V3's full router (transformers' `DeepseekV3TopkRouter`; `b` is its
`e_score_correction_bias`) adds, as options: group-limited selection (`n_group` groups of
E / n_group experts; a group scores the sum of its two largest `s + b`, only the `topk_group`
best groups are eligible), `norm_topk_prob` (False: the weights are the raw `s` of the selected
experts) and `routed_scaling_factor` (the weights are multiplied by it). The defaults
(`n_group=1`, normalised, factor 1) are the plain aux-free router above.
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
from moejax.validation import check_axis_name, check_bool, check_int, check_range

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
    n_group: int = 1
    topk_group: int | None = None
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        check_range("bias_update_rate", self.bias_update_rate, 0.0, float("inf"),
                    lo_open=False, hi_open=True)
        check_axis_name("axis_name", self.axis_name)
        check_groups(self)
        check_bool("norm_topk_prob", self.norm_topk_prob)
        check_range("routed_scaling_factor", self.routed_scaling_factor, 0.0, float("inf"),
                    hi_open=True)


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
    choice = jnp.where(valid, s + bias, -jnp.inf)
    if cfg.topk_group < cfg.n_group:
        choice = jnp.where(eligible_groups(choice, cfg), choice, -jnp.inf)
    mask = common.topk_mask(choice, cfg.top_k) & jnp.isfinite(choice)
    weights = common.masked_weights(s, mask, renormalize=cfg.norm_topk_prob)
    if cfg.routed_scaling_factor != 1.0:
        weights = cfg.routed_scaling_factor * weights
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


def check_groups(cfg) -> None:
    """Validates a config's `n_group` / `topk_group` (DeepSeek-V3's group-limited top-k) against
    its `num_experts` and `top_k`, naming the field; an unset `topk_group` becomes `n_group`
    (every group eligible). Shared with STAR's aux-free options."""
    check_int("n_group", cfg.n_group, lo=1)
    E = cfg.num_experts
    if E % cfg.n_group or (cfg.n_group > 1 and E // cfg.n_group < 2):
        raise ValueError(f"n_group={cfg.n_group} must divide num_experts={E} into groups of "
                         f">= 2 experts (a group scores its two best)")
    if cfg.topk_group is None:
        object.__setattr__(cfg, "topk_group", cfg.n_group)
    check_int("topk_group", cfg.topk_group, lo=1, hi=cfg.n_group)
    if cfg.top_k > cfg.topk_group * (E // cfg.n_group):
        raise ValueError(f"top_k={cfg.top_k} exceeds the topk_group={cfg.topk_group} "
                         f"eligible groups of {E // cfg.n_group} experts")


def eligible_groups(choice: Array, cfg: Config) -> Array:
    """`<bool>[N, E]`: the experts of each token's `topk_group` best groups, a group scored by
    the sum of its two largest selection scores (DeepSeek-V3)."""
    N, E = choice.shape
    grouped = choice.reshape(N, cfg.n_group, E // cfg.n_group)
    score = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)  # [N, n_group]
    best = common.topk_mask(score, cfg.topk_group)
    return jnp.repeat(best, E // cfg.n_group, axis=-1)


def max_assignments(cfg: Config) -> int:
    """Each token selects at most `top_k` experts."""
    return cfg.top_k
