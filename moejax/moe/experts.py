"""Expert banks: E feed-forward experts stored as stacked weights (DESIGN §5).

Axis letters: N tokens, d model width, E experts, f expert hidden width, C capacity slots,
M grouped rows (dropless: the N·k assignments sorted by expert).

A bank is a dict of arrays:

  SwiGLU ("swiglu"):  {"w_gate": [E, d, f], "w_up": [E, d, f], "w_down": [E, f, d]}
                      expert_e(x) = (silu(x W_gate[e]) ⊙ x W_up[e]) W_down[e]
  GELU MLP ("gelu"):  {"w_up": [E, d, f], "w_down": [E, f, d]}
                      expert_e(x) = gelu(x W_up[e]) W_down[e]    (tanh-approximate GELU)

Fine-grained experts (DeepSeekMoE) are only a choice of (E, f): split each of E experts into m
narrower ones, `E' = m·E`, `f' = f/m`, and route with `top_k' = m·top_k`; active FLOPs stay the
same. Shared experts are a second, always-on bank (`apply_shared`), optionally scaled by a
per-token sigmoid gate `σ(x·w)` as in Qwen1.5-MoE's `shared_expert_gate`.

Weights use fan-in scaling (truncated normal, variance `1/fan_in` per expert: d for the input
projections, f for `w_down`). Matmuls run in the bank's dtype; the output takes the input's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.kernels import gmm as gmm_ops

Array = jax.Array

ACTIVATIONS: tuple[str, ...] = ("swiglu", "gelu")

_FAN_IN = jax.nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,)
)


def check_activation(activation: str) -> None:
    """Raises ValueError unless `activation` is one of `ACTIVATIONS`."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def bank_activation(bank: dict) -> str:
    """"swiglu" if the bank has a `w_gate`, else "gelu"."""
    return "swiglu" if "w_gate" in bank else "gelu"


def init_bank(key: Array, *, num_experts: int, d_model: int, d_ff: int,
              activation: str = "swiglu", dtype=jnp.float32) -> dict:
    """Initialises a bank of `num_experts` experts.

    Args:
      key: PRNG key.
      num_experts: E.
      d_model: d.
      d_ff: f, each expert's hidden width.
      activation: "swiglu" (3 matrices) or "gelu" (2 matrices).
      dtype: parameter dtype.

    Returns:
      `{"w_gate": [E, d, f], "w_up": [E, d, f], "w_down": [E, f, d]}` (no `w_gate` for "gelu").
    """
    check_activation(activation)
    k_gate, k_up, k_down = jax.random.split(key, 3)
    bank = {
        "w_up": _FAN_IN(k_up, (num_experts, d_model, d_ff), dtype),
        "w_down": _FAN_IN(k_down, (num_experts, d_ff, d_model), dtype),
    }
    if activation == "swiglu":
        bank["w_gate"] = _FAN_IN(k_gate, (num_experts, d_model, d_ff), dtype)
    return bank


def _hidden(up: Array, gate: Array | None) -> Array:
    if gate is None:
        return jax.nn.gelu(up, approximate=True)
    return jax.nn.silu(gate) * up


def apply_expert(bank: dict, e: int, x: Array) -> Array:
    """One expert on a batch of tokens: `x: [..., d]` -> `[..., d]` (used by test oracles)."""
    xb = x.astype(bank["w_up"].dtype)
    gate = xb @ bank["w_gate"][e] if "w_gate" in bank else None
    h = _hidden(xb @ bank["w_up"][e], gate)
    return (h @ bank["w_down"][e]).astype(x.dtype)


def apply_dense(bank: dict, xe: Array) -> Array:
    """Every expert on its own slots (capacity dispatch): `xe: [E, C, d]` -> `[E, C, d]`."""
    xb = xe.astype(bank["w_up"].dtype)
    up = jnp.einsum("ECd,Edf->ECf", xb, bank["w_up"])
    gate = jnp.einsum("ECd,Edf->ECf", xb, bank["w_gate"]) if "w_gate" in bank else None
    h = _hidden(up, gate)
    return jnp.einsum("ECf,Efd->ECd", h, bank["w_down"]).astype(xe.dtype)


def apply_grouped(bank: dict, xs: Array, group_sizes: Array, *, impl="auto") -> Array:
    """Experts on rows grouped by expert (dropless dispatch), via `gmm`.

    Args:
      bank: expert bank.
      xs: `[M, d]` rows sorted by expert: `group_sizes[0]` rows for expert 0, then expert 1, ...
      group_sizes: `<int32>[E]`, `sum ≤ M`.
      impl: gmm backend (see `moejax.kernels.gmm.gmm`).

    Returns:
      `[M, d]`; rows past `sum(group_sizes)` are zero.
    """
    xb = xs.astype(bank["w_up"].dtype)
    up = gmm_ops.gmm(xb, bank["w_up"], group_sizes, impl=impl)
    gate = gmm_ops.gmm(xb, bank["w_gate"], group_sizes, impl=impl) if "w_gate" in bank else None
    h = _hidden(up, gate)
    return gmm_ops.gmm(h, bank["w_down"], group_sizes, impl=impl).astype(xs.dtype)


def init_shared(key: Array, *, num_shared: int, d_model: int, d_ff: int,
                activation: str = "swiglu", gated: bool = False, dtype=jnp.float32) -> dict:
    """Initialises the always-on shared experts.

    Returns:
      `{"bank": <bank of num_shared experts of width d_ff>}` plus `"gate": [d]` (the sigmoid
      gate vector, variance `1/d`) when `gated`.
    """
    k_bank, k_gate = jax.random.split(key)
    params = {"bank": init_bank(k_bank, num_experts=num_shared, d_model=d_model, d_ff=d_ff,
                                activation=activation, dtype=dtype)}
    if gated:
        params["gate"] = (jax.random.normal(k_gate, (d_model,), jnp.float32)
                          * d_model**-0.5).astype(dtype)
    return params


def apply_shared(params: dict, x: Array) -> Array:
    """Sum of all shared experts on every token, times `σ(x·gate)` if gated.

    Args:
      params: from `init_shared`.
      x: `[N, d]`.

    Returns:
      `[N, d]` in `x.dtype`.
    """
    bank = params["bank"]
    xb = x.astype(bank["w_up"].dtype)
    up = jnp.einsum("Nd,Edf->NEf", xb, bank["w_up"])
    gate = jnp.einsum("Nd,Edf->NEf", xb, bank["w_gate"]) if "w_gate" in bank else None
    y = jnp.einsum("NEf,Efd->Nd", _hidden(up, gate), bank["w_down"])
    if "gate" in params:
        y = y * jax.nn.sigmoid(xb @ params["gate"])[:, None]
    return y.astype(x.dtype)
