"""Noisy top-k gating (Shazeer et al. 2017, "Outrageously Large Neural Networks", eq. 4).

At train time `logits = x W_g^T + ε ⊙ softplus(x W_noise^T)` with `ε ~ N(0, 1)` drawn per token
and expert; at eval the noise is off, so routing is deterministic. Selection, weights and losses
are those of `topk` on the (noisy) logits. Axis letters: N tokens, d model width, E experts.
"""

from __future__ import annotations

import dataclasses

import jax

from moejax.routers import base, common, topk

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(topk.Config):
    """Same fields as `topk.Config` (renormalize, load_balance_weight, z_loss_weight)."""


def init(key: Array, cfg: Config) -> tuple[dict, dict]:
    """Returns `({"w_g": <float32>[E, d], "w_noise": <float32>[E, d]}, {})`."""
    k_g, k_noise = jax.random.split(key)
    return {"w_g": common.init_gate(k_g, cfg), "w_noise": common.init_gate(k_noise, cfg)}, {}


def route(params: dict, state: dict, x: Array, *, cfg: Config, train: bool,
          rng: Array | None = None) -> tuple[base.RouterOutput, dict]:
    """Routes `x: [N, d]` to the top-k experts of the noisy logits.

    Args:
      params: `{"w_g": [E, d], "w_noise": [E, d]}`.
      state: dict, returned unchanged (may hold `"active": <bool>[E]`).
      x: `[N, d]` tokens, any float dtype (routing runs in float32); rows with NaN/Inf are
        routed nowhere and left out of the losses.
      cfg: `Config`.
      train: add the learned-scale Gaussian noise (requires `rng`).
      rng: PRNG key for ε; required when `train=True`, ignored otherwise.

    Returns:
      `(RouterOutput, state)`; `probs` is the softmax of the logits that were routed on.
    """
    base.check_input(x, cfg)
    x, valid = common.finite_tokens(x)
    logits = common.gate_logits(params, x)
    if train:
        if rng is None:
            raise ValueError("noisy_topk.route needs rng (a PRNG key) when train=True")
        noise_std = jax.nn.softplus(common.gate_logits(params, x, name="w_noise"))
        logits = logits + jax.random.normal(rng, logits.shape, logits.dtype) * noise_std
    logits = common.mask_inactive(logits, state)
    return topk.route_from_logits(logits, cfg=cfg, valid=valid), state


def max_assignments(cfg: Config) -> int:
    """Each token selects at most `top_k` experts."""
    return cfg.top_k
