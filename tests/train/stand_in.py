"""A tiny stand-in model with the `moejax.models.lm` contract, for the training-loop tests.

The stand-in compiles in well under a second, so loop mechanics (resume, NaN stop, data
parallelism) are tested without the real model's compile time:

  params, state = init(key, cfg)
  loss, (new_state, metrics) = loss_fn(params, state, batch, *, cfg, train, rng)

It embeds tokens, runs L residual tanh layers each with a softmax "router" over E experts whose
bias is router state (nudged towards balance at every training step, like aux-loss-free routing),
and reports `ce`, an aux loss and `load` `[L, E]`. `poison_id`: an input token that makes the
loss NaN (for the non-finite-loss test). Training adds tiny `rng` noise so that a resume which
drew different numbers would show.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax


@dataclasses.dataclass(frozen=True, kw_only=True)
class StandInConfig:
    """Stand-in model options (the fields the loop reads: `vocab_size`, `max_seq_len`)."""

    vocab_size: int = 256
    max_seq_len: int = 64
    d_model: int = 32
    num_layers: int = 2
    num_experts: int = 4
    poison_id: int | None = None


def init(key, cfg: StandInConfig):
    """`(params, state)`; the state is `{"router": {"bias": [L, E]}}`."""
    k_emb, k_g, k_w, k_out = jax.random.split(key, 4)
    d, L, E = cfg.d_model, cfg.num_layers, cfg.num_experts
    params = {
        "embed": jax.random.normal(k_emb, (cfg.vocab_size, d)) * 0.5,
        "w_g": jax.random.normal(k_g, (L, d, E)) / np.sqrt(d),
        "w": jax.random.normal(k_w, (L, d, d)) / np.sqrt(d),
        "scale": jnp.ones((L, d)),
        "out": jax.random.normal(k_out, (d, cfg.vocab_size)) / np.sqrt(d),
    }
    return params, {"router": {"bias": jnp.zeros((L, E))}}


def loss_fn(params, state, batch, *, cfg: StandInConfig, train: bool, rng=None):
    """`(loss, (new_state, metrics))` as `moejax.models.lm.loss_fn`; metrics: ce, aux_loss, load."""
    x = params["embed"][batch["inputs"]]
    if train:
        x = x + 1e-3 * jax.random.normal(rng, x.shape)
    bias = state["router"]["bias"]
    loads = []
    for layer in range(cfg.num_layers):
        gates = jax.nn.softmax(x @ params["w_g"][layer] + bias[layer], axis=-1)
        load = jnp.mean(gates.reshape(-1, cfg.num_experts), axis=0)
        loads.append(load)
        x = x + params["scale"][layer] * jnp.tanh(x @ params["w"][layer]) * jnp.max(
            gates, axis=-1, keepdims=True
        )
    load = jnp.stack(loads)
    logits = x @ params["out"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = batch.get("loss_mask")
    ce = jnp.mean(ce) if mask is None else jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1)
    aux = 0.01 * cfg.num_experts * jnp.sum(load**2)
    loss = ce + aux
    if cfg.poison_id is not None:
        loss = jnp.where(jnp.any(batch["inputs"] == cfg.poison_id), jnp.nan, loss)
    new_bias = bias - 0.01 * jnp.sign(jax.lax.stop_gradient(load) - 1.0 / cfg.num_experts)
    new_state = {"router": {"bias": new_bias if train else bias}}
    return loss, (new_state, {"ce": ce, "aux_loss": aux, "load": load})
