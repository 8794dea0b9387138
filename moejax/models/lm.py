"""Decoder-only language model: pre-norm blocks of (mixer × FFN), byte-level vocabulary.

    h_0 = Embed(tokens)
    h  ← h + Mixer(RMSNorm(h))          mixer ∈ qdelta, gated_qdelta, deltanet, gated_deltanet,
                                         softmax, gated_softmax
    h  ← h + FFN(RMSNorm(h))            ffn ∈ dense (SwiGLU), moe (any router of moejax.routers),
                                         none (no FFN sublayer, as Zoology's MQAR models)
    logits = RMSNorm(h) · Eᵀ            (tied embeddings by default)

Pure functions: `init`, `apply`, `loss_fn` (and `checked_apply` / `checked_loss_fn`). Decoding
(`init_cache` / `prefill` / `decode_step` / `generate`) lives in `moejax.models.decode`. Axis
letters: B batch, T time, d width, V vocabulary, L layers, E experts.

The MoE layers' options are one nested `moejax.moe.layer.MoEConfig`, `LMConfig.moe`:

  >>> cfg = LMConfig(d_model=64, d_ff=128, moe=dict(num_experts=4, top_k=1, router="star"))
  >>> cfg.moe.num_experts, cfg.moe.d_model
  (4, 64)

Token ids must lie in [0, V). Called eagerly (concrete ids) `apply`, `prefill`, `decode_step`,
`generate` and `loss_fn` raise `ValueError` naming the argument and the range; under `jit` the
ids are traced and cannot be checked there, so they are clamped (`embed`: ids < 0 read row 0,
ids ≥ V row V − 1) — run `checked_apply` / `checked_loss_fn` (`jax.experimental.checkify`) to
have them reported under `jit` as well.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.experimental import checkify

from moejax.kernels.delta_rule import ops as delta_rule_ops
from moejax.layers import attention, delta_mixer, ffn, mla
from moejax.layers.norms import rms_norm, rms_norm_init
from moejax.layers.segments import check_segment_ids
from moejax.moe import layer as moe_layer
from moejax.parallel import mesh as mesh_lib
from moejax.parallel.expert_parallel import ExpertParallel
from moejax.validation import (
    ArgumentTypeError,
    check_array,
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_range,
)

Array = jax.Array

DELTA_MIXERS = delta_mixer.MODES
# The layer module of each mixer: its `init(key, mixer_cfg)` and `apply(params, x, cfg=, cache=,
# segment_ids=)`.
MIXER_MODULES: dict[str, ModuleType] = {
    **{mode: delta_mixer for mode in DELTA_MIXERS},
    "softmax": attention,
    "gated_softmax": attention,
    "mla": mla,
}
MIXERS = tuple(MIXER_MODULES)
FFNS = ("moe", "dense", "none")
DTYPES = ("float32", "bfloat16")
DELTA_IMPLS = delta_rule_ops.IMPL_NAMES

# The MoE options LMConfig held as its own fields before they nested under `moe` (the old flat
# JSON layout `from_dict` still reads), and the LM's defaults MoEConfig does not have itself.
FLAT_MOE_FIELDS = ("num_experts", "top_k", "router", "router_kwargs", "dispatcher",
                   "capacity_factor", "num_shared", "d_ff_shared", "shared_gate")
MOE_DEFAULTS: dict[str, Any] = {"num_experts": 8}
# MoEConfig fields the LM sets (its widths), so a `moe` mapping need not repeat them.
_MOE_WIDTHS = ("d_model", "d_ff")

_INT_FIELDS = (("vocab_size", 1), ("d_model", 1), ("num_layers", 1), ("num_heads", 1),
               ("head_dim", 1), ("d_ff", 1), ("conv_size", 1), ("chunk_size", 1),
               ("max_seq_len", 1))
_OPTIONAL_INT_FIELDS = ("dense_d_ff", "num_key_heads", "attn_num_heads", "attn_head_dim",
                        "num_kv_heads", "mla_q_lora_rank", "mla_qk_nope_head_dim",
                        "mla_v_head_dim")  # value_head_dim: resolve_value_dim
_BOOL_FIELDS = ("allow_neg_eigval", "qk_norm", "zero_centered_norm", "tie_embeddings",
                "learnable_lam_bias")
# Fields added after configs were first saved, with the value that reproduces how a model saved
# without them was built and run (`from_dict` fills them in): the fan-in init, A ~ U(1, 16) and
# the trained λ bias every Q-Delta layer then had.
_LEGACY_DEFAULTS: dict[str, Any] = {"init_std": None, "a_init_min": 1.0,
                                    "learnable_lam_bias": True}
_POSITIVE_FLOAT_FIELDS = ("rope_theta", "norm_eps")


def _moe_field_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(moe_layer.MoEConfig) if f.init)


def moe_options(moe: moe_layer.MoEConfig) -> dict[str, Any]:
    """`moe`'s fields except the widths the LM sets (`d_model`, `d_ff`): what a `moe` mapping
    of `LMConfig` holds."""
    return {name: getattr(moe, name) for name in _moe_field_names() if name not in _MOE_WIDTHS}


def _reraise(where: str, e: Exception):
    """`e` again, its message prefixed by `where` (ArgumentTypeError stays one)."""
    cls = ArgumentTypeError if isinstance(e, ArgumentTypeError) else ValueError
    return cls(f"{where}: {e}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LMConfig:
    """Model configuration (frozen, hashable, validated at construction).

    Attributes:
      vocab_size: V (256 for bytes).
      d_model: d, the residual width; also the `d_model` of `moe`.
      num_layers: L.
      num_heads: heads of the mixer (delta mixers: value heads, one state each).
      head_dim: key/query head dim (delta mixers) or head dim (softmax mixers).
      expand_v: delta mixers' value head dim = expand_v · head_dim when `value_head_dim` is None
        (the product must be an integer up to float rounding). With `value_head_dim` it is set
        to `value_head_dim / head_dim` (a value other than the default must agree with it).
      value_head_dim: delta mixers' value head dim as an integer (exact for any pair, e.g.
        Qwen3-Next's key/value head dims 22 and 30); None = expand_v · head_dim. See
        `value_dim`.
      mixer: one of MIXERS, used by every layer unless `layer_mixers` is given.
      ffn: "moe", "dense" or "none" (no FFN sublayer and no second norm: the block is the
        mixer alone, as Zoology's MQAR models with an identity state mixer), used by every
        layer unless `layer_ffns` is given.
      layer_mixers: per-layer mixers (length L), e.g. Qwen3-Next's three Gated DeltaNet layers
        then one gated softmax layer; () = `mixer` everywhere.
      layer_ffns: per-layer FFN kinds (length L); () = `ffn` everywhere.
      d_ff: hidden width of each routed expert (the `d_ff` of `moe`) and of the dense FFNs
        unless `dense_d_ff`.
      dense_d_ff: hidden width of the dense FFN layers; None = d_ff.
      moe: the MoE layers' options, a `moejax.moe.layer.MoEConfig` (num_experts, top_k, router,
        router_kwargs, dispatcher, capacity_factor, shared experts, ...). The LM owns the
        widths: `moe.d_model == d_model` and `moe.d_ff == d_ff` always. Give it as
          - a mapping of MoEConfig fields without the widths, e.g.
            `moe=dict(num_experts=4, router="star")` (num_experts defaults to 8, the rest to
            MoEConfig's defaults; widths, if given, must equal the LM's);
          - a `MoEConfig` whose `d_model` / `d_ff` equal the LM's (else ValueError);
          - None (the default): the default options (`MOE_DEFAULTS`: 8 experts, top-2 "topk",
            dropless) when some layer is an MoE layer, and None for a model without any.
        Stored as a `MoEConfig` (or None). To change the widths of a config keep `moe` in step
        with `LMConfig.replace` (`dataclasses.replace(cfg, d_model=...)` refuses the old moe).
      conv_size, chunk_size, allow_neg_eigval, delta_impl: delta-mixer options.
      delta_pairing: the delta mixers' `DeltaMixerConfig.pairing` ("recurrence", or "authors"
        to run a model trained with the released Q-Delta kernel as trained; chunk_size 64).
      num_key_heads: delta mixers' query/key heads (grouped, divides num_heads); None = all.
      attn_num_heads, attn_head_dim: softmax mixers' heads and head dim; None = num_heads,
        head_dim (hybrid models give their attention layers other shapes).
      num_kv_heads: softmax mixers' key/value heads (grouped-query attention); None = all.
      qk_norm: RMSNorm on each query/key head of softmax mixers (Qwen3).
      rope_theta: rotary base of softmax mixers.
      rotary_fraction: share of each attention head's channels that rotate (Qwen3-Next: 0.25).
      mla_kv_lora_rank, mla_q_lora_rank, mla_qk_nope_head_dim, mla_qk_rope_head_dim,
        mla_v_head_dim, mla_rope: the "mla" mixer's `moejax.layers.mla.MLAConfig` fields (its
        heads are `attn_num_heads`); the head dims default (None) to `attn_head_dim` (Dn, Dv)
        and half of it (Dr).
      zero_centered_norm: every RMSNorm of the model except the delta mixers' output norm scales
        by `(1 + w)`, w starting at 0 (Qwen3-Next).
      max_seq_len: longest sequence the model accepts (positions of attention caches).
      tie_embeddings: share the input embedding with the output projection.
      dtype: compute dtype, "float32" or "bfloat16" (params stay float32; logits and losses are
        float32).
      norm_eps: RMSNorm epsilon.
      init_std: std of the N(0, init_std²) init of every projection (mixers, FFNs, output
        head), the delta mixers' short convs and the embedding (> 0; default 0.02, the Q-Delta
        authors' and fla's `initializer_range`). None = fan-in init: N(0, 1/fan_in) matrices,
        convs U(±1/√K), embedding N(0, 0.02²). MoE experts and routers keep their own init
        (`moejax.moe.layer`).
      learnable_lam_bias: Q-Delta layers get a trained per-head λ bias (`DeltaMixerConfig`);
        off by default (the authors' λ = σ(W_λ h − 0.9)); `upcycle.to_qdelta` turns it on.
      a_init_min: gated delta mixers draw A ~ U(a_init_min, 16) (default 0, the authors'; 1.0
        is moejax's earlier init).

    Every field is checked on construction, whether or not the model uses it (a `moe` given
    for a dense model too): ints must be ints (Python or NumPy, never bool or str), numbers real
    and finite, flags bools, names one of their choices. A value of the wrong kind raises
    `moejax.validation.ArgumentTypeError` (a `TypeError` and a `ValueError`), one out of range a
    `ValueError`; both name the field (`moe: ...` for the MoE options). Configs read from JSON
    go through `from_dict`, which also names unknown keys and reads the old flat layout.
    """

    vocab_size: int = 256
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    head_dim: int = 32
    expand_v: float = 2.0
    value_head_dim: int | None = None
    mixer: str = "qdelta"
    ffn: str = "moe"
    layer_mixers: tuple[str, ...] = ()
    layer_ffns: tuple[str, ...] = ()
    d_ff: int = 256
    dense_d_ff: int | None = None
    moe: moe_layer.MoEConfig | None = None
    conv_size: int = 4
    chunk_size: int = 64
    allow_neg_eigval: bool = False
    delta_impl: str = "auto"
    delta_pairing: str = "recurrence"
    num_key_heads: int | None = None
    attn_num_heads: int | None = None
    attn_head_dim: int | None = None
    num_kv_heads: int | None = None
    qk_norm: bool = False
    rope_theta: float = 10000.0
    rotary_fraction: float = 1.0
    zero_centered_norm: bool = False
    max_seq_len: int = 2048
    tie_embeddings: bool = True
    dtype: str = "float32"
    norm_eps: float = 1e-6
    init_std: float | None = delta_mixer.INIT_STD
    learnable_lam_bias: bool = False
    a_init_min: float = 0.0
    mla_kv_lora_rank: int = 64
    mla_q_lora_rank: int | None = None
    mla_qk_nope_head_dim: int | None = None
    mla_qk_rope_head_dim: int | None = None
    mla_v_head_dim: int | None = None
    mla_rope: str = "interleave"

    def __post_init__(self):
        for name, lo in _INT_FIELDS:
            check_int(name, getattr(self, name), lo=lo)
            object.__setattr__(self, name, int(getattr(self, name)))
        for name in _OPTIONAL_INT_FIELDS:
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), lo=1)
                object.__setattr__(self, name, int(getattr(self, name)))
        for name in _BOOL_FIELDS:
            check_bool(name, getattr(self, name))
            object.__setattr__(self, name, bool(getattr(self, name)))
        for name in _POSITIVE_FLOAT_FIELDS:
            value = getattr(self, name)
            check_number(name, value)
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
            object.__setattr__(self, name, float(value))
        check_range("rotary_fraction", self.rotary_fraction, 0.0, 1.0, lo_open=False)
        delta_mixer.check_init_std(self.init_std)
        if self.init_std is not None:
            object.__setattr__(self, "init_std", float(self.init_std))
        check_range("a_init_min", self.a_init_min, 0.0, delta_mixer.A_INIT_MAX, lo_open=False,
                    hi_open=True)
        object.__setattr__(self, "a_init_min", float(self.a_init_min))
        object.__setattr__(self, "rotary_fraction", float(self.rotary_fraction))
        _, expand_v = delta_mixer.resolve_value_dim(self.head_dim, self.expand_v,
                                                    self.value_head_dim)
        object.__setattr__(self, "expand_v", expand_v)
        # JSON round trips give lists: store tuples so the config stays hashable.
        for name in ("layer_mixers", "layer_ffns"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, list | tuple):
                raise ArgumentTypeError(f"{name} must be a list or tuple of names (one per "
                                        f"layer), got {value!r}")
            object.__setattr__(self, name, tuple(value))
        self._check_choices("mixer", (self.mixer,), MIXERS)
        self._check_choices("ffn", (self.ffn,), FFNS)
        self._check_choices("layer_mixers", self.layer_mixers, MIXERS, per_layer=True)
        self._check_choices("layer_ffns", self.layer_ffns, FFNS, per_layer=True)
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("delta_impl", self.delta_impl, DELTA_IMPLS)
        check_choice("delta_pairing", self.delta_pairing, delta_mixer.PAIRINGS)
        check_int("mla_kv_lora_rank", self.mla_kv_lora_rank, lo=1)
        if self.mla_qk_rope_head_dim is not None:
            check_int("mla_qk_rope_head_dim", self.mla_qk_rope_head_dim, lo=0)
        check_choice("mla_rope", self.mla_rope, mla.ROPE_LAYOUTS)
        object.__setattr__(self, "moe", self._resolve_moe(self.moe))
        for layer in range(self.num_layers):  # the mixer configs validate their own fields
            self.mixer_config(layer)

    def _resolve_moe(self, moe: Any) -> moe_layer.MoEConfig | None:
        """The `moe` field as a `MoEConfig` (or None), from any of its accepted forms."""
        if moe is None:
            return self._moe_from_options({}) if "moe" in self.ffns else None
        if isinstance(moe, moe_layer.MoEConfig):
            if (moe.d_model, moe.d_ff) != (self.d_model, self.d_ff):
                raise ValueError(
                    f"moe: d_model={moe.d_model}, d_ff={moe.d_ff} must equal the LM's "
                    f"d_model={self.d_model}, d_ff={self.d_ff} (the LM sets the experts' "
                    "widths: give moe as a dict of the other options, or change widths with "
                    "LMConfig.replace, which keeps moe in step)")
            return moe
        if isinstance(moe, Mapping):
            return self._moe_from_options(moe)
        raise ArgumentTypeError(f"moe must be a MoEConfig, a dict of its options or None, got "
                                f"{type(moe).__name__}")

    def _moe_from_options(self, options: Mapping[str, Any]) -> moe_layer.MoEConfig:
        known = _moe_field_names()
        unknown = sorted(str(k) for k in options if k not in known)
        if unknown:
            raise ValueError(f"moe: unknown MoEConfig field(s) {', '.join(unknown)}; known "
                             f"fields: {', '.join(known)}")
        for name in _MOE_WIDTHS:
            if name in options and options[name] != getattr(self, name):
                raise ValueError(f"moe: {name}={options[name]!r} must equal the LM's "
                                 f"{name}={getattr(self, name)} (the LM sets it; leave it out)")
        kw = {**MOE_DEFAULTS, **{k: v for k, v in options.items() if k not in _MOE_WIDTHS}}
        try:
            return moe_layer.MoEConfig(d_model=self.d_model, d_ff=self.d_ff, **kw)
        except ValueError as e:  # ArgumentTypeError too
            raise _reraise("moe", e) from e

    @classmethod
    def from_dict(cls, fields: Any, *, source: str = "model config") -> LMConfig:
        """The config of a JSON object (`to_dict`'s output, or an older saved one).

        Reads both layouts: today's, the MoE options nested under "moe" (an object of MoEConfig
        fields, or null), and the old flat one, `FLAT_MOE_FIELDS` at the top level (configs
        saved before `moe` existed: `model_config.json`, checkpoint `config.json`). Flat fields
        become `moe`, with the old defaults for any missing; for a model without MoE layers
        whose flat fields never formed a valid MoEConfig (they were not checked together
        then) `moe` is None. Configs saved before `value_head_dim` existed (only `expand_v`)
        load unchanged; configs saved before `init_std`, `a_init_min` and
        `learnable_lam_bias` existed get the values their models were built with (fan-in
        init, A ~ U(1, 16), a trained λ bias `b_lam`), so their checkpoints load.

        Args:
          fields: the parsed JSON object.
          source: what to name in messages (e.g. the file's path).

        Raises:
          ValueError / ArgumentTypeError: `fields` is not an object, holds an unknown key, or a
            field is invalid; the message starts with `source` and names the key.
        """
        if not isinstance(fields, Mapping):
            raise ArgumentTypeError(f"{source}: an LMConfig must be a JSON object of fields, got "
                                    f"{type(fields).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(str(k) for k in fields if k not in known and k not in FLAT_MOE_FIELDS)
        if unknown:
            raise ValueError(f"{source}: unknown LMConfig field(s) {', '.join(unknown)}; known "
                             f"fields: {', '.join(known)}")
        flat = {k: fields[k] for k in FLAT_MOE_FIELDS if k in fields}
        kw = {k: v for k, v in fields.items() if k not in FLAT_MOE_FIELDS}
        kw = {**{k: v for k, v in _LEGACY_DEFAULTS.items() if k not in kw}, **kw}
        if flat and "moe" in kw:
            raise ValueError(f"{source}: holds both 'moe' and the old top-level MoE field(s) "
                             f"{', '.join(flat)}; keep one layout")
        try:
            if not flat:
                return cls(**kw)
            try:
                return cls(**kw, moe=flat)
            except ValueError:
                dense = cls(**kw, moe=None)
                if dense.moe is not None or "moe" in dense.ffns:
                    raise
                return dense  # a dense model's never-checked-together MoE fields
        except ArgumentTypeError as e:
            raise ArgumentTypeError(f"{source}: {e}") from e
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from e

    def replace(self, **changes: Any) -> LMConfig:
        """A copy with `changes` (validated), keeping `moe` in step with the widths.

        Unlike `dataclasses.replace`: new `d_model` / `d_ff` carry over into `moe`, and a `moe`
        mapping updates the current MoE options (the others stay): `cfg.replace(moe=dict(
        router="star"))`. A `MoEConfig` or None for `moe` replaces it as is.
        """
        moe = changes.pop("moe", dataclasses.MISSING)
        if moe is dataclasses.MISSING or isinstance(moe, Mapping):
            current = {} if self.moe is None else moe_options(self.moe)
            if moe is dataclasses.MISSING:
                moe = current if self.moe is not None else None
            else:
                moe = {**current, **{k: v for k, v in moe.items() if k not in _MOE_WIDTHS}}
        return dataclasses.replace(self, **changes, moe=moe)

    def _check_choices(self, name, values, valid, *, per_layer=False):
        if per_layer and values and len(values) != self.num_layers:
            raise ValueError(f"{name} must list one entry per layer (num_layers="
                             f"{self.num_layers}), got {len(values)}")
        bad = [v for v in values if v not in valid]
        if bad:
            raise ValueError(f"{name} must be one of {valid}, got {bad[0]!r}")

    @property
    def mixers(self) -> tuple[str, ...]:
        """The mixer of each layer."""
        return self.layer_mixers or (self.mixer,) * self.num_layers

    @property
    def ffns(self) -> tuple[str, ...]:
        """The FFN kind of each layer."""
        return self.layer_ffns or (self.ffn,) * self.num_layers

    def mixer_module(self, layer: int) -> ModuleType:
        """The layer module (`MIXER_MODULES`) of layer `layer`'s mixer."""
        return MIXER_MODULES[self.mixers[layer]]

    def mixer_config(self, layer: int):
        """The `DeltaMixerConfig` or `AttentionConfig` of layer `layer` (built on demand from
        this config's fields; cached per distinct config)."""
        return _mixer_config(self, self.mixers[layer])

    @property
    def value_dim(self) -> int:
        """Delta mixers' value head dim Dv (an int: `value_head_dim`, or expand_v · head_dim)."""
        return delta_mixer.resolve_value_dim(self.head_dim, self.expand_v,
                                             self.value_head_dim)[0]

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def to_dict(self) -> dict:
        """JSON-able fields (for checkpoints and run directories), "moe" nested as an object of
        every MoEConfig field (or null); equal to `moejax.train.checkpoint.config_to_json(self)`.

        Raises:
          ValueError: `moe.parallel` is set (a device placement, not saved: attach it after
            loading).
        """
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["layer_mixers"], d["layer_ffns"] = list(self.layer_mixers), list(self.layer_ffns)
        if self.moe is not None:
            if self.moe.parallel is not None:
                raise ValueError("moe.parallel is a device placement and is not saved; save the "
                                 "config with parallel=None and set it after loading")
            moe = {name: getattr(self.moe, name) for name in _moe_field_names()}
            moe["router_kwargs"] = [list(p) for p in self.moe.router_kwargs]
            moe["dtype"] = str(self.moe.dtype)
            d["moe"] = moe
        return d


def _delta_mixer_config(cfg: LMConfig, mixer: str) -> delta_mixer.DeltaMixerConfig:
    return delta_mixer.DeltaMixerConfig(
        d_model=cfg.d_model, num_heads=cfg.num_heads, head_dim=cfg.head_dim,
        num_key_heads=cfg.num_key_heads, expand_v=cfg.expand_v,
        value_head_dim=cfg.value_dim, mode=mixer,
        conv_size=cfg.conv_size, allow_neg_eigval=cfg.allow_neg_eigval,
        chunk_size=cfg.chunk_size, impl=cfg.delta_impl, pairing=cfg.delta_pairing,
        norm_eps=cfg.norm_eps,
        init_std=cfg.init_std, learnable_lam_bias=cfg.learnable_lam_bias,
        a_init_min=cfg.a_init_min)


def _attention_config(cfg: LMConfig, mixer: str) -> attention.AttentionConfig:
    head_dim = cfg.attn_head_dim or cfg.head_dim
    rotary_dim = (head_dim if cfg.rotary_fraction == 1.0  # AttentionConfig checks it is even
                  else 2 * int(head_dim * cfg.rotary_fraction // 2))
    return attention.AttentionConfig(
        d_model=cfg.d_model, num_heads=cfg.attn_num_heads or cfg.num_heads,
        head_dim=head_dim, gated=mixer == "gated_softmax", rope_theta=cfg.rope_theta,
        num_kv_heads=cfg.num_kv_heads, rotary_dim=rotary_dim, qk_norm=cfg.qk_norm,
        zero_centered_norm=cfg.zero_centered_norm, norm_eps=cfg.norm_eps,
        init_std=cfg.init_std)


def _mla_config(cfg: LMConfig, mixer: str) -> mla.MLAConfig:
    head_dim = cfg.attn_head_dim or cfg.head_dim
    pick = lambda value, default: default if value is None else value
    return mla.MLAConfig(
        d_model=cfg.d_model, num_heads=cfg.attn_num_heads or cfg.num_heads,
        kv_lora_rank=cfg.mla_kv_lora_rank, q_lora_rank=cfg.mla_q_lora_rank,
        qk_nope_head_dim=pick(cfg.mla_qk_nope_head_dim, head_dim),
        qk_rope_head_dim=pick(cfg.mla_qk_rope_head_dim, 2 * (head_dim // 4)),
        v_head_dim=pick(cfg.mla_v_head_dim, head_dim), rope=cfg.mla_rope,
        rope_theta=cfg.rope_theta, init_std=cfg.init_std)


# The config builder of each mixer module (keyed like MIXER_MODULES' values).
_MIXER_CONFIGS = {delta_mixer: _delta_mixer_config, attention: _attention_config,
                  mla: _mla_config}


@functools.lru_cache(maxsize=256)
def _mixer_config(cfg: LMConfig, mixer: str):
    return _MIXER_CONFIGS[MIXER_MODULES[mixer]](cfg, mixer)


PRESETS: dict[str, dict] = {
    # Seconds per step on a CPU: for tests.
    "tiny": dict(d_model=32, num_layers=2, num_heads=2, head_dim=16, d_ff=64, chunk_size=16,
                 max_seq_len=256, moe=dict(num_experts=4, top_k=2)),
    # The `make demo` model: Q-Delta mixer + STAR-routed MoE; trains visibly in minutes on CPU.
    "demo": dict(d_model=128, num_layers=4, num_heads=4, head_dim=32, expand_v=1.0, d_ff=256,
                 mixer="qdelta", chunk_size=32, max_seq_len=1024,
                 moe=dict(num_experts=8, top_k=2, router="star",
                          router_kwargs=(("eta", 5e-5),))),
    # Qwen3-Next's layout with this research line's parts: three gated Q-Delta layers (grouped
    # key heads) per gated softmax layer (GQA, q/k norm, partial rotary), zero-centred norms,
    # STAR-routed MoE with a sigmoid-gated shared expert.
    "hybrid": dict(d_model=128, num_layers=4, num_heads=4, num_key_heads=2, head_dim=32,
                   expand_v=1.0, layer_mixers=("gated_qdelta",) * 3 + ("gated_softmax",),
                   mixer="gated_qdelta", attn_num_heads=4, attn_head_dim=32, num_kv_heads=2,
                   qk_norm=True, rotary_fraction=0.5, zero_centered_norm=True, d_ff=128,
                   chunk_size=32, max_seq_len=1024,
                   moe=dict(num_experts=8, top_k=2, num_shared=1, d_ff_shared=128,
                            shared_gate=True, router="star", router_kwargs=(("eta", 5e-5),))),
    "small": dict(d_model=512, num_layers=8, num_heads=8, head_dim=64, d_ff=1024,
                  chunk_size=64, max_seq_len=4096, moe=dict(num_experts=16, top_k=2)),
    # The Q-Delta authors' configs (psmiz/Q-Delta `configs/qdelta_{340M,1B}.json`), for GPU/TPU:
    # gated Q-Delta in every layer, dense SwiGLU FFN of fla's width (hidden_ratio 4 → 2/3 · 4d
    # rounded up to a multiple of 256), untied embeddings, norm eps 1e-6, N(0, 0.02²) init,
    # vocabulary 32000 (their tokenizer, fla-hub/transformer-1.3B-100B; give the data's own
    # `vocab_size` to override), context 4096. Their optimiser: `moejax.train.config.
    # OPTIMIZER_PRESETS` (experiments/train_lm.py applies it with these presets).
    "340m": dict(vocab_size=32000, d_model=1024, num_layers=21, num_heads=6, head_dim=128,
                 expand_v=2.0, mixer="gated_qdelta", ffn="dense", d_ff=2816,
                 tie_embeddings=False, chunk_size=64, max_seq_len=4096, norm_eps=1e-6,
                 init_std=0.02),
    "1b": dict(vocab_size=32000, d_model=2048, num_layers=21, num_heads=6, head_dim=256,
               expand_v=2.0, mixer="gated_qdelta", ffn="dense", d_ff=5632,
               tie_embeddings=False, chunk_size=64, max_seq_len=4096, norm_eps=1e-6,
               init_std=0.02),
}


def get_preset(name: str, **overrides) -> LMConfig:
    """The preset `name` with fields replaced by `overrides`.

    A `moe` mapping updates the preset's MoE options (the others stay), e.g.
    `get_preset("tiny", moe=dict(router="star"))`; a `MoEConfig` or None replaces them.
    """
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    fields = {**PRESETS[name], **overrides}
    if isinstance(overrides.get("moe"), Mapping) and isinstance(PRESETS[name].get("moe"), Mapping):
        fields["moe"] = {**PRESETS[name]["moe"], **overrides["moe"]}
    return LMConfig(**fields)


# ----------------------------------------------------------------------------- parameters


def init(key: Array, cfg: LMConfig) -> tuple[dict, dict]:
    """Returns `(params, state)`; state holds each MoE layer's router state.

    Init (`cfg.init_std`, see `LMConfig`): embedding, untied output head and every mixer / dense
    FFN projection N(0, init_std²); with `init_std=None` the embedding is N(0, 0.02²), the
    other matrices N(0, 1/fan_in). Norm scales start at 1 (0 when zero-centred)."""
    k_emb, k_out, *k_layers = jax.random.split(key, 2 + cfg.num_layers)
    emb_std = 0.02 if cfg.init_std is None else cfg.init_std
    params: dict = {
        "embed": jax.random.normal(k_emb, (cfg.vocab_size, cfg.d_model), jnp.float32) * emb_std,
        "blocks": [],
    }
    if not cfg.tie_embeddings:
        out_std = cfg.d_model**-0.5 if cfg.init_std is None else cfg.init_std
        params["unembed"] = (jax.random.normal(k_out, (cfg.d_model, cfg.vocab_size), jnp.float32)
                             * out_std)
    state: dict = {"blocks": []}
    norm_init = functools.partial(rms_norm_init, zero_centered=cfg.zero_centered_norm)
    params["final_norm"] = norm_init(cfg.d_model)
    for i, k in enumerate(k_layers):
        k_mix, k_ffn = jax.random.split(k)
        block = {"norm1": norm_init(cfg.d_model),
                 "mixer": cfg.mixer_module(i).init(k_mix, cfg.mixer_config(i))}
        if cfg.ffns[i] != "none":
            block["norm2"] = norm_init(cfg.d_model)
        if cfg.ffns[i] == "none":
            moe_state = {}
        elif cfg.ffns[i] == "moe":
            block["ffn"], moe_state = moe_layer.init(k_ffn, cfg.moe)
        else:
            block["ffn"] = ffn.init(k_ffn, cfg.d_model, cfg.dense_d_ff or cfg.d_ff,
                                    init_std=cfg.init_std)
            moe_state = {}
        params["blocks"].append(block)
        state["blocks"].append(moe_state)
    return params, state


def place(cfg: LMConfig, mesh: Any) -> LMConfig:
    """`cfg` for training on `mesh` (the model contract's `place`, `moejax.train.steps`): with an
    `'expert'` axis of size > 1 every MoE layer runs expert-parallel over it
    (`moejax.parallel.ExpertParallel`: the same `moe_apply`, every router and both
    dispatchers); otherwise `cfg` unchanged.

    Raises:
      ValueError: `num_experts` is not divisible by the expert axis (naming both).
    """
    if cfg.moe is None or "moe" not in cfg.ffns or mesh_lib.axis_size(mesh, mesh_lib.EXPERT) == 1:
        return cfg
    if cfg.moe.parallel is not None and cfg.moe.parallel.mesh == mesh:
        return cfg
    try:
        parallel = ExpertParallel(mesh=mesh)
        return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, parallel=parallel))
    except ValueError as e:
        raise ValueError(f"mesh {dict(mesh.shape)}: {e}") from e


def num_params(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))


# ----------------------------------------------------------------------------- forward


def _concrete(x: Any) -> bool:
    """Whether `x`'s values can be read on the host now (not a tracer, fully addressable)."""
    if isinstance(x, jax.core.Tracer):
        return False
    return not isinstance(x, jax.Array) or x.is_fully_addressable


def _check_ids(name: str, ids: Any, size: int, what: str) -> None:
    """Outside jit: raises unless every id of `ids` lies in [0, size) (`what` names `size`)."""
    if not _concrete(ids) or ids.size == 0:
        return
    with jax.ensure_compile_time_eval():  # a concrete constant inside a trace, too
        lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= size:
        raise ValueError(f"{name} must be in [0, {what}={size}), got ids from {lo} to {hi}")


def check_tokens(tokens: Any, cfg: LMConfig, *, offset: int = 0, name: str = "tokens",
                  ndim: int = 2) -> None:
    """Checks token ids for `cfg`: an int array of rank `ndim` (`[B, T]`, or `[B]` for decoding)
    whose length plus `offset` fits `max_seq_len`; when the values are concrete (outside `jit`,
    or a constant inside it) also that every id lies in [0, vocab_size).

    Raises:
      ArgumentTypeError: `tokens` is not an array (None, a list, a str).
      ValueError: wrong rank, a non-integer dtype, too long, or an id out of range; the message
        names `name` and the valid range.
    """
    check_array(name, tokens)
    shape = "[B, T]" if ndim == 2 else "[B]"
    if tokens.ndim != ndim:
        raise ValueError(f"{name} must be {shape} integers, got shape {tokens.shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"{name} must be integers, got dtype {tokens.dtype}")
    if ndim == 2 and tokens.shape[1] + offset > cfg.max_seq_len:
        raise ValueError(f"sequence length {tokens.shape[1] + offset} exceeds the model's "
                         f"max_seq_len={cfg.max_seq_len}")
    _check_ids(name, tokens, cfg.vocab_size, "vocab_size")


def _check_positions(positions: Any, tokens: Array) -> None:
    check_array("positions", positions)
    B, T = tokens.shape
    if positions.ndim != 2 or positions.shape[0] != B:
        raise ValueError(f"positions must be [B, P] with B={B}, got shape {positions.shape}")
    if not jnp.issubdtype(positions.dtype, jnp.integer):
        raise ValueError(f"positions must be integers, got dtype {positions.dtype}")
    _check_ids("positions", positions, T, "T")


def _in_range_check(name: str, ids: Array, size: int, what: str) -> None:
    """A `checkify` check that `ids` lie in [0, size) (only under `checkify.checkify`)."""
    checkify.check(jnp.all((ids >= 0) & (ids < size)),
                   f"{name} must be in [0, {what}={size}), got ids from {{lo}} to {{hi}}",
                   lo=jnp.min(ids), hi=jnp.max(ids))


def embed(params: dict, tokens: Array, cfg: LMConfig) -> Array:
    """Token embeddings `[..., d]` in the compute dtype.

    Out-of-range ids are clamped (explicitly, both sides): an id < 0 reads row 0, an id ≥ V
    row V − 1. Eager calls of `apply`/`prefill`/`generate` refuse such ids first; under `jit`
    use `checked_apply` to have them reported.
    """
    return jnp.take(params["embed"], tokens, axis=0, mode="clip").astype(cfg.compute_dtype)


def norm(params: dict, h: Array, cfg: LMConfig) -> Array:
    """The model's RMSNorm (zero-centred `(1 + w)` scale when `cfg.zero_centered_norm`)."""
    return rms_norm(params, h, eps=cfg.norm_eps, zero_centered=cfg.zero_centered_norm)


def mixer_apply(block_params: dict, h: Array, cfg: LMConfig, layer: int, cache=None,
                segment_ids: Array | None = None, cu_seqlens: Array | None = None):
    """Layer `layer`'s token mixer on normed inputs `h` `[B, T, d]` → `(y, new_cache)`;
    `segment_ids` `[B, T]`: packed documents, each mixed as if alone; `cu_seqlens` `[N + 1]`:
    packed prompts (B = 1) into caches of N rows (`moejax.models.decode.prefill`)."""
    extra = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
    return cfg.mixer_module(layer).apply(block_params, h, cfg=cfg.mixer_config(layer),
                                         cache=cache, segment_ids=segment_ids, **extra)


def ffn_apply(block_params: dict, moe_state: dict, h: Array, cfg: LMConfig, layer: int, *,
              train: bool, rng: Array | None):
    """Layer `layer`'s FFN on normed inputs → `(y, new_moe_state, aux or None)` (zeros for an
    "none" layer, which `forward` skips)."""
    if cfg.ffns[layer] == "none":
        return jnp.zeros_like(h), moe_state, None
    if cfg.ffns[layer] == "dense":
        return ffn.apply(block_params, h), moe_state, None
    return moe_layer.moe_apply(block_params, moe_state, h, cfg=cfg.moe, train=train,
                               rng=rng)


def forward(params: dict, state: dict, tokens: Array, cfg: LMConfig, *, train: bool,
            rng: Array | None, caches: list | None = None,
            segment_ids: Array | None = None, cu_seqlens: Array | None = None):
    """Runs the blocks (no input checks); returns `(final normed hidden [B, T, d], new_state,
    aux, new caches)`. `caches`: per-layer mixer caches (`moejax.models.decode.init_cache`) to
    run on top of, or None. `segment_ids`: packed documents (`apply`); `cu_seqlens`: packed
    prompts (`moejax.models.decode.prefill`)."""
    h = embed(params, tokens, cfg)
    new_blocks, new_caches, auxes = [], [], []
    for i, block in enumerate(params["blocks"]):
        y, cache = mixer_apply(block["mixer"], norm(block["norm1"], h, cfg), cfg, i,
                               None if caches is None else caches[i], segment_ids, cu_seqlens)
        h = h + y
        if cfg.ffns[i] == "none":
            new_blocks.append(state["blocks"][i])
            new_caches.append(cache)
            continue
        layer_rng = None if rng is None else jax.random.fold_in(rng, i)
        y, moe_state, aux = ffn_apply(block["ffn"], state["blocks"][i],
                                      norm(block["norm2"], h, cfg), cfg, i, train=train,
                                      rng=layer_rng)
        h = h + y
        new_blocks.append(moe_state)
        new_caches.append(cache)
        if aux is not None:
            auxes.append(aux)
    h = norm(params["final_norm"], h, cfg)
    return h, {**state, "blocks": new_blocks}, _merge_aux(auxes), new_caches


def _merge_aux(auxes: list[dict]) -> dict:
    """Sums aux losses over MoE layers, averages their scalar metrics, stacks loads `[L, E]` and
    top-1 experts `[L, B·T]`."""
    if not auxes:
        return {"aux_loss": jnp.zeros((), jnp.float32), "metrics": {}}
    metrics = {name: jnp.mean(jnp.stack([a["metrics"][name] for a in auxes]))
               for name in auxes[0]["metrics"]}
    return {"aux_loss": sum(a["aux_loss"] for a in auxes), "metrics": metrics,
            "load": jnp.stack([a["load"] for a in auxes]),
            "top1": jnp.stack([a["top1"] for a in auxes])}


def logits_from_hidden(params: dict, h: Array, cfg: LMConfig) -> Array:
    """`h` `[..., d]` → float32 logits `[..., V]`."""
    w = params["embed"].T if cfg.tie_embeddings else params["unembed"]
    return jnp.einsum("...d,dv->...v", h.astype(jnp.float32), w.astype(jnp.float32))


def apply(params: dict, state: dict, tokens: Array, *, cfg: LMConfig, train: bool = False,
          rng: Array | None = None, positions: Array | None = None,
          segment_ids: Array | None = None) -> tuple[Array, dict, dict]:
    """Forward pass.

    Args:
      params, state: from `init` (state: MoE router states).
      tokens: `[B, T]` int token ids in [0, vocab_size).
      cfg: model config.
      train: training mode (router noise and router-state updates).
      rng: PRNG key for stochastic routers.
      positions: optional `[B, P]` int indices in [0, T); logits are then computed only there
        (`[B, P, V]`), e.g. MQAR answer positions, never materialising `[B, T, V]`.
      segment_ids: optional `[B, T]` int document ids of packed rows (a run of equal ids is one
        document): attention stays inside a document and delta-rule states and short convs
        restart at each document's first token, so every document is modelled as if alone
        (MoE routing is per token anyway; capacity-limited routers still share capacity
        across the row).

    Returns:
      `(logits float32 [B, T or P, V], new_state, aux)`; `aux` has `aux_loss` (summed over MoE
      layers), `metrics` (MoE metrics averaged over layers) and, for MoE, `load` `[L, E]` and
      `top1` `[L, B·T]` (each token's top-1 expert per layer, for routing metrics).

    Raises:
      ValueError / ArgumentTypeError: `tokens` or `positions` not an int array of the right
        shape, a sequence longer than `max_seq_len`, or, when the values are concrete (called
        outside `jit`), ids outside [0, vocab_size) / positions outside [0, T).

    Out-of-range values under `jit` (traced, so not checked here): token ids are clamped to
    [0, V − 1] (see `embed`) and out-of-range positions give NaN logits. `checked_apply`
    reports both under `jit`.
    """
    return _apply(params, state, tokens, cfg=cfg, train=train, rng=rng, positions=positions,
                  segment_ids=segment_ids, check=False)


def _apply(params, state, tokens, *, cfg, train, rng, positions, check, name="tokens",
           segment_ids=None):
    check_tokens(tokens, cfg, name=name)
    if positions is not None:
        _check_positions(positions, tokens)
    if segment_ids is not None:
        check_segment_ids(segment_ids, tokens.shape)
    if check:
        _in_range_check(name, tokens, cfg.vocab_size, "vocab_size")
        if positions is not None:
            _in_range_check("positions", positions, tokens.shape[1], "T")
    h, new_state, aux, _ = forward(params, state, tokens, cfg, train=train, rng=rng,
                                   segment_ids=segment_ids)
    if positions is not None:
        T = tokens.shape[1]
        valid = (positions >= 0) & (positions < T)
        h = jnp.take_along_axis(h, jnp.where(valid, positions, 0)[..., None], axis=1)
        h = jnp.where(valid[..., None], h, jnp.nan)
    return logits_from_hidden(params, h, cfg), new_state, aux


def checked_apply(params: dict, state: dict, tokens: Array, *, cfg: LMConfig,
                  train: bool = False, rng: Array | None = None,
                  positions: Array | None = None, segment_ids: Array | None = None):
    """`apply` with `checkify` checks that token ids lie in [0, vocab_size) and positions in
    [0, T), so out-of-range values are reported under `jit` too (plain `apply` clamps them).

    Returns:
      `(err, (logits, new_state, aux))`; `err.throw()` raises `checkify.JaxRuntimeError` naming
      `tokens` (or `positions`), the valid range and the ids seen; `err.get()` is None if none.

    Example:
      >>> err, (logits, _, _) = jax.jit(functools.partial(checked_apply, cfg=cfg))(
      ...     params, state, tokens)
      >>> err.throw()
    """
    fn = functools.partial(_apply, cfg=cfg, train=train, check=True)
    return checkify.checkify(fn)(params, state, tokens, rng=rng, positions=positions,
                                 segment_ids=segment_ids)


def loss_fn(params: dict, state: dict, batch: dict, *, cfg: LMConfig, train: bool,
            rng: Array | None = None) -> tuple[Array, tuple[dict, dict]]:
    """Mean next-token cross-entropy (over `loss_mask` if given) plus MoE aux losses.

    Args:
      batch: `{"inputs": [B, T] int, "targets": [B, T] int, optional "loss_mask": [B, T],
        optional "segment_ids": [B, T] int}` (packed documents, `apply`).

    Returns:
      `(loss, (new_state, metrics))`; metrics: `loss`, `ce` (nats/token), `aux_loss`, MoE
      metrics prefixed `moe/`, and `load` `[L, E]` for MoE models.
    """
    return _loss_fn(params, state, batch, cfg=cfg, train=train, rng=rng, check=False)


def checked_loss_fn(params: dict, state: dict, batch: dict, *, cfg: LMConfig, train: bool,
                    rng: Array | None = None):
    """`loss_fn` with `checked_apply`'s range checks on `inputs` and on `targets` (both in
    [0, vocab_size)), functionalised by `checkify`: returns `(err, (loss, (new_state,
    metrics)))`. Differentiate inside: `checkify.checkify(jax.grad(...))` or wrap the step."""
    fn = functools.partial(_loss_fn, cfg=cfg, train=train, check=True)
    return checkify.checkify(fn)(params, state, batch, rng=rng)


def _loss_fn(params, state, batch, *, cfg, train, rng, check):
    if not isinstance(batch, Mapping) or "inputs" not in batch or "targets" not in batch:
        raise ValueError(f"batch must be a dict with 'inputs' and 'targets', got "
                         f"{sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__}")
    targets = batch["targets"]
    check_tokens(targets, cfg, name="batch['targets']")
    if targets.shape != batch["inputs"].shape:
        raise ValueError(f"batch['targets'] has shape {targets.shape}, batch['inputs'] "
                         f"{batch['inputs'].shape}; they must match")
    if check:
        _in_range_check("batch['targets']", targets, cfg.vocab_size, "vocab_size")
    logits, new_state, aux = _apply(params, state, batch["inputs"], cfg=cfg, train=train,
                                    rng=rng, positions=None, check=check, name="batch['inputs']",
                                    segment_ids=batch.get("segment_ids"))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = batch.get("loss_mask")
    if mask is not None:
        check_array("batch['loss_mask']", mask)
        if mask.shape != targets.shape:
            raise ValueError(f"batch['loss_mask'] has shape {mask.shape}, batch['targets'] "
                             f"{targets.shape}; they must match")
    if mask is None:
        ce = jnp.mean(ce)
    else:
        mask = mask.astype(jnp.float32)
        ce = jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    loss = ce + aux["aux_loss"]
    metrics = {"loss": loss, "ce": ce, "aux_loss": aux["aux_loss"],
               **{f"moe/{k}": v for k, v in aux["metrics"].items()}}
    if "load" in aux:
        metrics["load"] = aux["load"]
    return loss, (new_state, metrics)
