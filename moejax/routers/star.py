"""STAR: structure-aware routing on a principal subspace tracked online by GHA (DESIGN §4).

Follows the authors' `megatron/core/transformer/moe/star.py` and `router.py` (psmiz/STAR). The
router state `V` (`[E, d]`, unit rows) follows the top-E principal subspace of the inputs by
one step of the generalised Hebbian algorithm (Sanger 1989) per training forward, on
`x̄ = stop_gradient(x)`, *before* routing (this forward's routing sees the updated `V`):

  y  = x̄ V^T                                   [N, E]
  ΔV = (y^T x̄ − tril(y^T y) V) / N              Sanger's rule, inputs not centred
  V ← normalise_rows(V + η ΔV)

Routing then mixes a learned gate with a rotation of the subspace, `Z = R · stop_gradient(V)`:
`logits = σ(a) ⊙ (x W_g^T) + (1 − σ(a)) ⊙ (x Z^T)` (`gha_only`: `x Z^T` alone), and takes the
top-k of `softmax(logits)` (weights = those probabilities, the authors' pre-softmax top-k; the
Switch loss, if on, is on these mixed-logit probabilities). Defaults are the authors':
`W_g ~ N(0, 0.01²)` (`--init-method-std 0.01`; `gate_init_std=None` gives the 1/√d init of
the other routers), `R` a free `[E, E]` matrix with orthogonal init (decayed like any matrix
by `moejax.train.optim`; `orthogonal_r=True` keeps it orthogonal as `expm(P − P^T)`, P = 0 at
init), `V = normalise_rows(randn)` (`v_init="orthonormal"`: QR), `a = 0` (σ(a) = 0.5). No
gradient ever reaches `V`; it is state, not a parameter. η = 0 never moves `V` (a frozen random
subspace, the control of the experiments).

The authors' LM recipe is `lm_recipe(...)`: top-1, Switch loss 1e-2, no z-loss, η = 5e-5; with
`quirks=True` also the two artefacts of their runs: `V` held in bf16 (`v_dtype="bfloat16"`: at
η = 5e-5 most entries then never change) and two GHA steps per micro-batch (`gha_steps=2`, the
activation recomputation of `--recompute-modules moe` runs the step again).

DeepSeek-V3-style scoring and selection, for routers upcycled from `aux_free` (DeepSeek-V3,
Kimi Linear; `moejax.interop.upcycle.to_star`), are options whose defaults are the behaviour
above: `score_fn="sigmoid"` scores each expert `s = σ(logits)` instead of `softmax(logits)`
(probs `s / Σ s`); `selection_bias` keeps a bias `b` (`[E]`, the checkpoint's
`e_score_correction_bias`) in router state that is added to the scores for selection only, the
weights being the unbiased scores (with `bias_update_rate` γ > 0, `b` follows the aux-free
update `b += γ sign(mean_load − load)` after each training forward); `n_group` / `topk_group`
limit selection to the `topk_group` best of `n_group` expert groups (a group scored by the sum
of its two largest biased scores); `routed_scaling_factor` multiplies the weights (after
`renormalize`, aux-free's `norm_topk_prob`). With these set as the aux-free router's, the learned
gate carrying its `W_g` and σ(a) → 1, STAR routes exactly as that router does.

Test-time updates (`test_time_update`) follow the paper's text; the released code updates only
in training. With `axis_name` set, the means over N are global (`psum` over that axis), so every
data-parallel replica holds the same `V` (the authors' buffer is not synced across ranks). Tokens
with NaN/Inf input are left out of the GHA sums (and of N), are routed nowhere and count in no
loss, so one bad token cannot poison `V` for the rest of training; a step whose result is not
finite anyway (finite inputs whose products overflow) leaves `V` as it was. Axis letters: N
tokens, d width, E experts.

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

from moejax.routers import aux_free, base, common, losses
from moejax.validation import check_axis_name, check_bool, check_choice, check_int, check_range

Array = jax.Array
_HI = jax.lax.Precision.HIGHEST
V_INITS = ("normal", "orthonormal")
V_DTYPES = ("float32", "bfloat16")
SCORE_FNS = ("softmax", "sigmoid")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(base.RouterConfig):
    """STAR options (plus `d_model`, `num_experts`, `top_k` of `RouterConfig`).

    Attributes:
      eta: GHA step size η ≥ 0 (2e-5, the authors' code default; 5e-5 in their scripts and
        `lm_recipe`). 0 never moves `V` (frozen random subspace).
      gate_init_std: std of the normal init of `W_g` (> 0; 0.01, the authors'
        `--init-method-std`), or None for `d**-0.5` (the other routers' init).
      orthogonal_r: parametrise `R = expm(P − P^T)` (P = 0 at init, R = I); False (the
        authors'): `R` is a free `[E, E]` matrix with random orthogonal init.
      v_init: `"normal"` (the authors': rows of a standard normal matrix, normalised) or
        `"orthonormal"` (random orthonormal rows by QR; unit-norm random rows if E > d).
      v_dtype: storage dtype of `V`: `"float32"`, or `"bfloat16"` (the authors' runs: their buffer
        is cast with the model; every GHA step is rounded to bf16 after the add and after the
        normalisation, so steps smaller than half an ulp are lost).
      gha_steps: GHA steps per forward (≥ 1), all on the same tokens, before routing (the
        authors' runs with MoE recomputation take 2).
      test_time_update: also take the GHA step(s) at eval (`train=False`).
      gha_only: route by `x Z^T` alone (no learned gate term).
      renormalize: rescale the k selected probabilities to sum to 1 per token (the authors'
        pre-softmax top-k does not).
      load_balance_weight: α of the Switch loss on the mixed logits' probabilities (≥ 0; 0, the
        default, disables it; the authors' LM pre-training uses top-1 with 1e-2).
      axis_name: mapped axis (pmap / shard_map / vmap), or tuple of axes, over which the means
        over N (and, with `bias_update_rate`, the loads) are global.
      score_fn: `"softmax"` (the authors': scores `softmax(logits)`, which are also the probs) or
        `"sigmoid"` (DeepSeek-V3's affinities `s = σ(logits)`; probs `s / Σ s`).
      selection_bias: keep a bias `b: [E]` in router state (`state["bias"]`, zeros at init; no
        gradient) added to the scores for selection only (aux-free's `e_score_correction_bias`).
      bias_update_rate: γ ≥ 0 of the aux-free bias update after each training forward (0, the
        default, keeps `b` fixed; > 0 needs `selection_bias`).
      n_group: expert groups for group-limited selection (≥ 1; 1, the default, is plain top-k);
        must divide `num_experts` into groups of ≥ 2.
      topk_group: groups a token may select from (1..n_group; None: all `n_group`).
      routed_scaling_factor: > 0, multiplies the weights after `renormalize` (1, the default).
    """

    eta: float = 2e-5
    gate_init_std: float | None = 0.01
    orthogonal_r: bool = False
    v_init: str = "normal"
    v_dtype: str = "float32"
    gha_steps: int = 1
    test_time_update: bool = False
    gha_only: bool = False
    renormalize: bool = False
    load_balance_weight: float = 0.0
    axis_name: str | tuple[str, ...] | None = None
    score_fn: str = "softmax"
    selection_bias: bool = False
    bias_update_rate: float = 0.0
    n_group: int = 1
    topk_group: int | None = None
    routed_scaling_factor: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        check_range("eta", self.eta, 0.0, float("inf"), lo_open=False, hi_open=True)
        if self.gate_init_std is not None:
            check_range("gate_init_std", self.gate_init_std, 0.0, float("inf"), hi_open=True)
        for name in ("orthogonal_r", "test_time_update", "gha_only", "renormalize"):
            check_bool(name, getattr(self, name))
        check_choice("v_init", self.v_init, V_INITS)
        check_choice("v_dtype", self.v_dtype, V_DTYPES)
        check_int("gha_steps", self.gha_steps, lo=1)
        check_range("load_balance_weight", self.load_balance_weight, 0.0, float("inf"),
                    lo_open=False, hi_open=True)
        check_axis_name("axis_name", self.axis_name)
        check_choice("score_fn", self.score_fn, SCORE_FNS)
        check_bool("selection_bias", self.selection_bias)
        check_range("bias_update_rate", self.bias_update_rate, 0.0, float("inf"),
                    lo_open=False, hi_open=True)
        if self.bias_update_rate > 0 and not self.selection_bias:
            raise ValueError(f"bias_update_rate={self.bias_update_rate} updates the selection "
                             "bias: set selection_bias=True")
        aux_free.check_groups(self)
        check_range("routed_scaling_factor", self.routed_scaling_factor, 0.0, float("inf"),
                    hi_open=True)


def lm_recipe(d_model: int, num_experts: int, *, quirks: bool = False, **overrides) -> Config:
    """The authors' LM pre-training router (`scripts/train_llama_*_star.sh`): top-1, Switch loss
    1e-2 on the mixed logits, no z-loss (STAR has none), η = 5e-5, no renormalisation.

    `quirks=True` adds the two artefacts of their runs: `v_dtype="bfloat16"`, `gha_steps=2`.
    `overrides` replace any field (e.g. `eta=0.0`).
    """
    check_bool("quirks", quirks)
    fields = dict(top_k=1, load_balance_weight=1e-2, eta=5e-5, renormalize=False)
    if quirks:
        fields.update(v_dtype="bfloat16", gha_steps=2)
    return Config(d_model=d_model, num_experts=num_experts, **{**fields, **overrides})


def _normalise_rows(v: Array) -> Array:
    return v * jax.lax.rsqrt(jnp.maximum(jnp.sum(v * v, axis=-1, keepdims=True), 1e-30))


def _storage(cfg: Config):
    return jnp.bfloat16 if cfg.v_dtype == "bfloat16" else jnp.float32


def init(key: Array, cfg: Config) -> tuple[dict, dict]:
    """Returns params `{"w_g": [E, d], "r" | "p": [E, E], "a": [E]}` and state `{"v": [E, d]}`
    (with `selection_bias` also `"bias": <float32>[E]` zeros).

    `W_g ~ N(0, gate_init_std²)` (or `d**-0.5` std); `V` per `cfg.v_init`, stored as
    `cfg.v_dtype` (bf16: the normalised rows rounded); a free `R` starts random orthogonal, `P`
    at 0 (`R = I`).
    """
    E, d = cfg.num_experts, cfg.d_model
    k_g, k_v, k_r = jax.random.split(key, 3)
    if cfg.v_init == "normal":
        v = _normalise_rows(jax.random.normal(k_v, (E, d), jnp.float32))
    else:
        g = jax.random.normal(k_v, (d, E), jnp.float32)
        v = jnp.linalg.qr(g)[0].T if E <= d else _normalise_rows(g.T)
    if cfg.gate_init_std is None:
        w_g = common.init_gate(k_g, cfg)
    else:
        w_g = jax.random.normal(k_g, (E, d), jnp.float32) * cfg.gate_init_std
    params = {"w_g": w_g, "a": jnp.zeros((E,), jnp.float32)}
    if cfg.orthogonal_r:
        params["p"] = jnp.zeros((E, E), jnp.float32)
    else:
        params["r"] = jax.nn.initializers.orthogonal()(k_r, (E, E), jnp.float32)
    state = {"v": v.astype(_storage(cfg))}
    if cfg.selection_bias:
        state["bias"] = jnp.zeros((E,), jnp.float32)
    return params, state


def rotation(params: dict, cfg: Config) -> Array:
    """`<float32>[E, E]` R: `expm(P − P^T)` if `cfg.orthogonal_r`, else `params["r"]`."""
    if cfg.orthogonal_r:
        p = params["p"].astype(jnp.float32)
        return jax.scipy.linalg.expm(p - p.T)
    return params["r"].astype(jnp.float32)


def gha_step(v: Array, x: Array, *, eta: float, axis_name: str | tuple[str, ...] | None = None,
             dtype=jnp.float32) -> Array:
    """One Sanger (GHA) step `V ← normalise_rows(V + η ΔV)` on `x: [N, d]` (no gradient).

    Rows of `x` holding NaN/Inf are left out of the sums, and N counts only the others; if the
    step is not finite anyway (overflow), `V` is returned unchanged. With `axis_name`, `y^T x̄`,
    `y^T y` and N are summed over that mapped axis first. `dtype` is the storage dtype of `V`
    (float32 or bfloat16): the sum `V + η ΔV` and the normalised rows are rounded to it, as
    an in-place update of a bf16 buffer does (ΔV itself is computed in float32).

    Returns:
      the new `V` as `dtype`.
    """
    x, valid = common.finite_tokens(x)  # under jit, one computation with `route`'s
    x = jax.lax.stop_gradient(x.astype(jnp.float32))
    v = jax.lax.stop_gradient(v.astype(dtype)).astype(jnp.float32)
    y = jnp.einsum("nd,ed->ne", x, v, precision=_HI)
    yx = jnp.einsum("ne,nd->ed", y, x, precision=_HI)
    yy = jnp.einsum("ne,nf->ef", y, y, precision=_HI)
    n = jnp.sum(valid, dtype=jnp.float32)
    if axis_name is not None:
        yx, yy, n = jax.lax.psum((yx, yy, n), axis_name)
    dv = (yx - jnp.einsum("ef,fd->ed", jnp.tril(yy), v, precision=_HI)) / jnp.maximum(n, 1.0)
    step = (eta * dv).astype(dtype).astype(jnp.float32)
    new = _normalise_rows((v + step).astype(dtype).astype(jnp.float32)).astype(dtype)
    ok = jnp.all(jnp.isfinite(new.astype(jnp.float32)))
    return jnp.where(ok, new, v.astype(dtype))


def route(params: dict, state: dict, x: Array, *, cfg: Config, train: bool,
          rng: Array | None = None) -> tuple[base.RouterOutput, dict]:
    """GHA-updates `V` (train, or eval with `test_time_update`), then routes `x: [N, d]` top-k
    (of the scores plus the selection bias, within the eligible groups, if set).

    Args:
      params: `{"w_g": [E, d], "r" or "p": [E, E], "a": [E]}`.
      state: `{"v": [E, d]}` (with `selection_bias` also `"bias": [E]`; may also hold
        `"active": <bool>[E]`).
      x: `[N, d]` tokens, any float dtype (routing runs in float32); rows with NaN/Inf are
        routed nowhere and left out of every loss, metric and statistic.
      cfg: `Config`.
      train: take the GHA step(s) (at eval only with `cfg.test_time_update`).
      rng: unused.

    Returns:
      `(RouterOutput, new_state)` (`new_state["v"]` keeps `cfg.v_dtype`; with
      `bias_update_rate` > 0 and `train`, `new_state["bias"]` is the updated bias, from this
      forward's selection); metrics `mix_mean` (mean σ(a)), `v_update_norm` (‖V_new − V‖_F),
      `switch_loss`, and with `selection_bias` `bias_abs_max` (max |b| used here).
    """
    del rng
    base.check_input(x, cfg)
    dtype = _storage(cfg)
    v_old = state["v"].astype(dtype)
    v = v_old
    if (train or cfg.test_time_update) and cfg.eta > 0:
        for _ in range(cfg.gha_steps):  # the routing below sees the updated V
            v = gha_step(v, x, eta=cfg.eta, axis_name=cfg.axis_name, dtype=dtype)
    x, valid = common.finite_tokens(x)
    z = rotation(params, cfg) @ jax.lax.stop_gradient(v.astype(jnp.float32))  # [E, d]
    sub = common.gate_logits({"z": z}, x, name="z")
    mix = jax.nn.sigmoid(params["a"].astype(jnp.float32))
    if cfg.gha_only:
        logits = sub
    else:
        logits = mix * common.gate_logits(params, x) + (1.0 - mix) * sub
    logits = common.mask_inactive(logits, state)
    if cfg.score_fn == "sigmoid":
        scores = jax.nn.sigmoid(logits)  # σ(−inf) = 0 on inactive slots
        probs = scores / jnp.maximum(jnp.sum(scores, axis=-1, keepdims=True), 1e-30)
    else:
        scores = probs = jax.nn.softmax(logits, axis=-1)
    bias = None
    if cfg.selection_bias:
        if "bias" not in state:
            raise ValueError("star.route with selection_bias=True needs state['bias'] of shape "
                             "[num_experts]; use init()")
        bias = jax.lax.stop_gradient(state["bias"].astype(jnp.float32))
    if bias is None and cfg.topk_group == cfg.n_group:
        mask = common.topk_mask(scores, cfg.top_k) & jnp.isfinite(logits) & valid[:, None]
    else:  # aux-free's selection: biased scores, eligible groups only
        choice = scores if bias is None else scores + bias
        choice = jnp.where(jnp.isfinite(logits) & valid[:, None], choice, -jnp.inf)
        if cfg.topk_group < cfg.n_group:
            choice = jnp.where(aux_free.eligible_groups(choice, cfg), choice, -jnp.inf)
        mask = common.topk_mask(choice, cfg.top_k) & jnp.isfinite(choice)
    weights = common.masked_weights(scores, mask, renormalize=cfg.renormalize)
    if cfg.routed_scaling_factor != 1.0:
        weights = cfg.routed_scaling_factor * weights
    switch = losses.switch_load_balance_loss(probs, mask, weight=cfg.load_balance_weight,
                                             valid=valid)
    metrics = {"switch_loss": switch, "mix_mean": jnp.mean(mix),
               "v_update_norm": jnp.linalg.norm(v.astype(jnp.float32)
                                                - v_old.astype(jnp.float32))}
    new_state = {**state, "v": v}
    if bias is not None:
        metrics["bias_abs_max"] = jnp.max(jnp.abs(bias))
        if train and cfg.bias_update_rate > 0:
            active = state.get("active", jnp.ones((cfg.num_experts,), jnp.bool_))
            new_state["bias"] = aux_free.update_bias(bias, mask, active, cfg.bias_update_rate,
                                                     cfg.axis_name)
    return base.RouterOutput(weights=weights, mask=mask, probs=probs, aux_loss=switch,
                             metrics=metrics), new_state


def max_assignments(cfg: Config) -> int:
    """Each token selects at most `top_k` experts."""
    return cfg.top_k
