"""Dense-to-sparse router: an annealed Gumbel-softmax gate that drops low-weight experts.

EvoMoE (Nie et al. 2021, "EvoMoE: An Evolutional Mixture-of-Experts Training Framework via
Dense-To-Sparse Gate"): `g = softmax((x W_g^T + ζ) / τ)` with Gumbel noise ζ at training, the
temperature decayed linearly from `tau_start` (2.0) to `tau_end` (0.3) over `anneal_steps`
training calls; experts with `g < threshold` are dropped (the arg-max is always kept). A high τ
spreads weight over all experts (dense), a low τ concentrates it (sparse). The step counter is
router state, advanced by every `train=True` call. Weights are `g` on the kept experts, not
renormalised (option `renormalize`). Axis letters: N tokens, d width, E experts.

Example:
  >>> cfg = Config(d_model=16, num_experts=4)
  >>> params, state = init(jax.random.key(0), cfg)
  >>> out, state = route(params, state, jnp.ones((8, 16)), cfg=cfg, train=True,
  ...                    rng=jax.random.key(1))
  >>> int(state["step"])
  1
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from moejax.routers import base, common, losses
from moejax.validation import check_bool, check_int, check_range

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(base.RouterConfig):
    """Dense-to-sparse options (plus the `RouterConfig` fields; `top_k` is unused).

    Attributes:
      tau_start: temperature at step 0 (> 0).
      tau_end: temperature from `anneal_steps` on (> 0).
      anneal_steps: length of the linear schedule, in training calls (≥ 1).
      threshold: experts whose gate weight is below it are dropped, in [0, 1).
      renormalize: rescale the kept weights to sum to 1 per token.
      load_balance_weight: α of the Switch loss on `softmax(logits)` (≥ 0; 0 disables).
    """

    tau_start: float = 2.0
    tau_end: float = 0.3
    anneal_steps: int = 10_000
    threshold: float = 1e-2
    renormalize: bool = False
    load_balance_weight: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        inf = float("inf")
        check_range("tau_start", self.tau_start, 0.0, inf, hi_open=True)
        check_range("tau_end", self.tau_end, 0.0, inf, hi_open=True)
        check_int("anneal_steps", self.anneal_steps, lo=1)
        check_range("threshold", self.threshold, 0.0, 1.0, lo_open=False, hi_open=True)
        check_bool("renormalize", self.renormalize)
        check_range("load_balance_weight", self.load_balance_weight, 0.0, inf,
                    lo_open=False, hi_open=True)


def init(key: Array, cfg: Config) -> tuple[dict, dict]:
    """Returns `({"w_g": <float32>[E, d]}, {"step": <int32>[]})`."""
    return {"w_g": common.init_gate(key, cfg)}, {"step": jnp.zeros((), jnp.int32)}


def temperature(step: Array, cfg: Config) -> Array:
    """`<float32>[]` τ at `step`: linear from `tau_start` to `tau_end`, then constant."""
    frac = jnp.minimum(jnp.asarray(step, jnp.float32) / cfg.anneal_steps, 1.0)
    return cfg.tau_start + (cfg.tau_end - cfg.tau_start) * frac


def route(params: dict, state: dict, x: Array, *, cfg: Config, train: bool,
          rng: Array | None = None) -> tuple[base.RouterOutput, dict]:
    """Routes `x: [N, d]` through the annealed gate; advances `state["step"]` when training.

    Args:
      params: `{"w_g": [E, d]}`.
      state: `{"step": <int32>[]}` (may also hold `"active": <bool>[E]`).
      x: `[N, d]` tokens, any float dtype (routing runs in float32); rows with NaN/Inf are
        routed nowhere and left out of every loss, metric and statistic.
      cfg: `Config`.
      train: add Gumbel noise and advance the step; at eval the gate is noiseless at the
        current temperature and the state is returned unchanged.
      rng: PRNG key, required when `train`.

    Returns:
      `(RouterOutput, new_state)`; probs = `softmax(logits)`, metrics `tau` and `avg_k`.
    """
    base.check_input(x, cfg)
    if train and rng is None:
        raise ValueError("rng is required when train=True (Gumbel noise)")
    x, valid = common.finite_tokens(x)
    logits = common.mask_inactive(common.gate_logits(params, x), state)
    tau = temperature(state["step"], cfg)
    noisy = logits + jax.random.gumbel(rng, logits.shape, jnp.float32) if train else logits
    gate = jax.nn.softmax(noisy / tau, axis=-1)
    argmax = jax.nn.one_hot(jnp.argmax(gate, axis=-1), cfg.num_experts, dtype=jnp.bool_)
    mask = ((gate >= cfg.threshold) | argmax) & jnp.isfinite(logits) & valid[:, None]
    weights = common.masked_weights(gate, mask, renormalize=cfg.renormalize)
    probs = jax.nn.softmax(logits, axis=-1)
    switch = losses.switch_load_balance_loss(probs, mask, weight=cfg.load_balance_weight,
                                             valid=valid)
    metrics = {"switch_loss": switch, "tau": tau,
               "avg_k": common.valid_mean(jnp.sum(mask, axis=-1, dtype=jnp.float32), valid)}
    new_state = {**state, "step": state["step"] + 1} if train else state
    return base.RouterOutput(weights=weights, mask=mask, probs=probs, aux_loss=switch,
                             metrics=metrics), new_state


def max_assignments(cfg: Config) -> int:
    """Any number of experts, up to all E (dense early in training)."""
    return cfg.num_experts
