"""STAR: structure-aware routing on a principal subspace tracked online by GHA (DESIGN §4).

The router state `V` (`[E, d]`, unit rows) follows the top-E principal subspace of the inputs by
one step of the generalised Hebbian algorithm (Sanger 1989) per training forward, on
`x̄ = stop_gradient(x)`:

  y  = x̄ V^T                                   [N, E]
  ΔV = (y^T x̄ − tril(y^T y) V) / N              Sanger's rule, inputs not centred
  V ← normalise_rows(V + η ΔV)

Routing then mixes a learned gate with a rotation of the subspace, `Z = R · stop_gradient(V)`:
`logits = σ(a) ⊙ (x W_g^T) + (1 − σ(a)) ⊙ (x Z^T)` (`gha_only`: `x Z^T` alone), and takes the
top-k of `softmax(logits)`. `R` is `expm(P − P^T)` (orthogonal by construction) or, with
`orthogonal_r=False`, a free matrix with orthogonal init (the authors' code). `a` starts at 0, so
σ(a) = 0.5. No gradient ever reaches `V`; it is state, not a parameter. Test-time updates
(`test_time_update`) follow the paper's text; its released code updates only in training. With
`axis_name` set, the means over N are global (`psum` over that axis), so every data-parallel
replica holds the same `V`. Tokens with NaN/Inf input are left out of the GHA sums (and of N),
are routed nowhere and count in no loss, so one bad token cannot poison `V` for the rest of
training. Axis letters: N tokens, d width, E experts.

Example:
  >>> cfg = Config(d_model=16, num_experts=4, top_k=1)
  >>> params, state = init(jax.random.key(0), cfg)
  >>> out, state = route(params, state, jnp.ones((8, 16)), cfg=cfg, train=True)
  >>> state["v"].shape
  (4, 16)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from moejax.routers import base, common, losses
from moejax.validation import check_axis_name, check_bool, check_range

Array = jax.Array
_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(base.RouterConfig):
    """STAR options (plus `d_model`, `num_experts`, `top_k` of `RouterConfig`).

    Attributes:
      eta: GHA step size η > 0 (2e-5; 5e-5 was best in the paper).
      orthogonal_r: parametrise `R = expm(P − P^T)`; else `R` is a free `[E, E]` matrix.
      test_time_update: also take the GHA step at eval (`train=False`).
      gha_only: route by `x Z^T` alone (no learned gate term).
      renormalize: rescale the k selected probabilities to sum to 1 per token.
      load_balance_weight: α of the Switch loss (≥ 0; 0, the default, disables it; the authors'
        LM pre-training uses top-1 with 1e-2).
      axis_name: mapped axis (pmap / shard_map / vmap), or tuple of axes, over which the means
        over N are global.
    """

    eta: float = 2e-5
    orthogonal_r: bool = True
    test_time_update: bool = False
    gha_only: bool = False
    renormalize: bool = False
    load_balance_weight: float = 0.0
    axis_name: str | tuple[str, ...] | None = None

    def __post_init__(self):
        super().__post_init__()
        check_range("eta", self.eta, 0.0, float("inf"), hi_open=True)
        for name in ("orthogonal_r", "test_time_update", "gha_only", "renormalize"):
            check_bool(name, getattr(self, name))
        check_range("load_balance_weight", self.load_balance_weight, 0.0, float("inf"),
                    lo_open=False, hi_open=True)
        check_axis_name("axis_name", self.axis_name)


def _normalise_rows(v: Array) -> Array:
    return v * jax.lax.rsqrt(jnp.maximum(jnp.sum(v * v, axis=-1, keepdims=True), 1e-30))


def init(key: Array, cfg: Config) -> tuple[dict, dict]:
    """Returns params `{"w_g": [E, d], "p" | "r": [E, E], "a": [E]}` and state `{"v": [E, d]}`.

    `V` has random orthonormal rows (QR; unit-norm random rows if E > d). `P` starts at 0
    (`R = I`); a free `R` starts random orthogonal.
    """
    E, d = cfg.num_experts, cfg.d_model
    k_g, k_v, k_r = jax.random.split(key, 3)
    g = jax.random.normal(k_v, (d, E), jnp.float32)
    v = jnp.linalg.qr(g)[0].T if E <= d else _normalise_rows(g.T)
    params = {"w_g": common.init_gate(k_g, cfg), "a": jnp.zeros((E,), jnp.float32)}
    if cfg.orthogonal_r:
        params["p"] = jnp.zeros((E, E), jnp.float32)
    else:
        params["r"] = jax.nn.initializers.orthogonal()(k_r, (E, E), jnp.float32)
    return params, {"v": v}


def rotation(params: dict, cfg: Config) -> Array:
    """`<float32>[E, E]` R: `expm(P − P^T)` if `cfg.orthogonal_r`, else `params["r"]`."""
    if cfg.orthogonal_r:
        p = params["p"].astype(jnp.float32)
        return jax.scipy.linalg.expm(p - p.T)
    return params["r"].astype(jnp.float32)


def gha_step(v: Array, x: Array, *, eta: float,
             axis_name: str | tuple[str, ...] | None = None) -> Array:
    """One Sanger (GHA) step `V ← normalise_rows(V + η ΔV)` on `x: [N, d]` (no gradient).

    Rows of `x` holding NaN/Inf are left out of the sums, and N counts only the others. With
    `axis_name`, `y^T x̄`, `y^T y` and N are summed over that mapped axis first.
    """
    x, valid = common.finite_tokens(x)  # under jit, one computation with `route`'s
    x = jax.lax.stop_gradient(x.astype(jnp.float32))
    v = jax.lax.stop_gradient(v.astype(jnp.float32))
    y = jnp.einsum("nd,ed->ne", x, v, precision=_HI)
    yx = jnp.einsum("ne,nd->ed", y, x, precision=_HI)
    yy = jnp.einsum("ne,nf->ef", y, y, precision=_HI)
    n = jnp.sum(valid, dtype=jnp.float32)
    if axis_name is not None:
        yx, yy, n = jax.lax.psum((yx, yy, n), axis_name)
    dv = (yx - jnp.einsum("ef,fd->ed", jnp.tril(yy), v, precision=_HI)) / jnp.maximum(n, 1.0)
    return _normalise_rows(v + eta * dv)


def route(params: dict, state: dict, x: Array, *, cfg: Config, train: bool,
          rng: Array | None = None) -> tuple[base.RouterOutput, dict]:
    """GHA-updates `V` (train, or eval with `test_time_update`), then routes `x: [N, d]` top-k.

    Args:
      params: `{"w_g": [E, d], "p" or "r": [E, E], "a": [E]}`.
      state: `{"v": [E, d]}` (may also hold `"active": <bool>[E]`).
      x: `[N, d]` tokens, any float dtype (routing runs in float32); rows with NaN/Inf are
        routed nowhere and left out of every loss, metric and statistic.
      cfg: `Config`.
      train: take the GHA step (at eval only with `cfg.test_time_update`).
      rng: unused.

    Returns:
      `(RouterOutput, new_state)`; metrics `mix_mean` (mean σ(a)), `v_update_norm`
      (‖V_new − V‖_F), `switch_loss`.
    """
    del rng
    base.check_input(x, cfg)
    v_old = state["v"].astype(jnp.float32)
    update = train or cfg.test_time_update
    v = gha_step(v_old, x, eta=cfg.eta, axis_name=cfg.axis_name) if update else v_old
    x, valid = common.finite_tokens(x)
    z = rotation(params, cfg) @ jax.lax.stop_gradient(v)  # [E, d]
    sub = common.gate_logits({"z": z}, x, name="z")
    mix = jax.nn.sigmoid(params["a"].astype(jnp.float32))
    if cfg.gha_only:
        logits = sub
    else:
        logits = mix * common.gate_logits(params, x) + (1.0 - mix) * sub
    logits = common.mask_inactive(logits, state)
    probs = jax.nn.softmax(logits, axis=-1)
    mask = common.topk_mask(probs, cfg.top_k) & jnp.isfinite(logits) & valid[:, None]
    weights = common.masked_weights(probs, mask, renormalize=cfg.renormalize)
    switch = losses.switch_load_balance_loss(probs, mask, weight=cfg.load_balance_weight,
                                             valid=valid)
    metrics = {"switch_loss": switch, "mix_mean": jnp.mean(mix),
               "v_update_norm": jnp.linalg.norm(v - v_old)}
    new_state = {**state, "v": v} if update else state
    return base.RouterOutput(weights=weights, mask=mask, probs=probs, aux_loss=switch,
                             metrics=metrics), new_state


def max_assignments(cfg: Config) -> int:
    """Each token selects at most `top_k` experts."""
    return cfg.top_k
