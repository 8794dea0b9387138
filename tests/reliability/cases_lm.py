"""Bad-input cases of the decoder LM (`moejax.models.lm`), its layers and the GNN models.

Token ids outside [0, vocab_size) are refused eagerly when concrete and reported by
`lm.checked_apply` under `jit` (plain `jit` clamps them, as `lm.embed` documents).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from moejax.layers import attention, delta_mixer
from moejax.models import decode, gnn, lm
from moejax.validation import ArgumentTypeError
from tests.reliability.cases import Case

_CFG = dict(vocab_size=256, d_model=16, num_layers=1, num_heads=2, head_dim=8, mixer="softmax",
            ffn="dense", d_ff=16, max_seq_len=32)


@functools.lru_cache(maxsize=1)
def _model():
    cfg = lm.LMConfig(**_CFG)
    params, state = lm.init(jax.random.key(0), cfg)
    return cfg, params, state


def _apply(tokens, **kw):
    cfg, params, state = _model()
    return lm.apply(params, state, tokens, cfg=cfg, **kw)


def _generate(prompt=None, **kw):
    cfg, params, state = _model()
    prompt = jnp.ones((1, 3), jnp.int32) if prompt is None else prompt
    kw = {"key": jax.random.key(0), "max_new_tokens": 2, **kw}
    return decode.generate(params, state, prompt, cfg=cfg, **kw)


def _checked_apply_under_jit(tokens):
    cfg, params, state = _model()
    err, _ = jax.jit(functools.partial(lm.checked_apply, cfg=cfg))(params, state, tokens)
    err.throw()


def _checked_loss_targets():
    cfg, params, state = _model()
    batch = {"inputs": jnp.ones((1, 4), jnp.int32),
             "targets": jnp.array([[1, 2, 3, 999]], jnp.int32)}
    fn = jax.jit(lambda p, s, b: lm.checked_loss_fn(p, s, b, cfg=cfg, train=False))
    err, _ = fn(params, state, batch)
    err.throw()


def _cfg(**kw):
    return lm.LMConfig(**{**_CFG, **kw})


CASES = [
    # LMConfig: the wrong kind of value for a field.
    Case("lm-config-str-int", lambda: _cfg(d_model="16"), ArgumentTypeError, ("d_model", "int")),
    Case("lm-config-none-int", lambda: _cfg(vocab_size=None), ArgumentTypeError,
         ("vocab_size", "int")),
    Case("lm-config-bool-int", lambda: _cfg(num_heads=True), ArgumentTypeError,
         ("num_heads", "int")),
    Case("lm-config-float-int", lambda: _cfg(max_seq_len=32.0), ArgumentTypeError,
         ("max_seq_len", "int")),
    Case("lm-config-str-number", lambda: _cfg(rope_theta="1e4"), ArgumentTypeError,
         ("rope_theta", "number")),
    Case("lm-config-nan-number", lambda: _cfg(norm_eps=float("nan")), ValueError,
         ("norm_eps", "finite")),
    Case("lm-config-str-bool", lambda: _cfg(tie_embeddings="False"), ValueError,
         ("tie_embeddings",)),
    Case("lm-config-layer-mixers-str", lambda: _cfg(layer_mixers="softmax"), ArgumentTypeError,
         ("layer_mixers", "list")),
    Case("lm-config-router-kwargs-str", lambda: _cfg(moe=dict(router_kwargs="eta=1")),
         ArgumentTypeError, ("router_kwargs",)),
    Case("lm-config-delta-impl", lambda: _cfg(mixer="deltanet", delta_impl="fast"), ValueError,
         ("delta_impl", "chunk")),
    Case("lm-config-unused-field-checked", lambda: _cfg(moe=dict(num_experts="8")),
         ArgumentTypeError, ("num_experts",)),
    Case("lm-config-value-dim-conflict",
         lambda: _cfg(mixer="deltanet", head_dim=22, value_head_dim=30, expand_v=3.0),
         ValueError, ("expand_v", "value_head_dim")),
    Case("lm-config-expand-v-not-integer", lambda: _cfg(mixer="deltanet", expand_v=0.3),
         ValueError, ("expand_v", "head_dim", "value_head_dim")),
    Case("lm-config-from-dict-unknown-key",
         lambda: lm.LMConfig.from_dict({**_CFG, "d_modle": 8}, source="run/model_config.json"),
         ValueError, ("run/model_config.json", "d_modle")),
    Case("lm-config-from-dict-not-object",
         lambda: lm.LMConfig.from_dict([1, 2], source="model_config.json"), ArgumentTypeError,
         ("model_config.json", "object")),
    # apply / generate / decode_step arguments.
    Case("lm-apply-tokens-list", lambda: _apply([[1, 2, 3]]), ArgumentTypeError,
         ("tokens", "array")),
    Case("lm-apply-tokens-none", lambda: _apply(None), ArgumentTypeError, ("tokens",)),
    Case("lm-apply-tokens-float", lambda: _apply(jnp.ones((1, 3))), ValueError,
         ("tokens", "integers")),
    Case("lm-apply-token-too-large", lambda: _apply(np.array([[1, 256, 300]], np.int32)),
         ValueError, ("tokens", "[0, vocab_size=256)", "300")),
    Case("lm-apply-token-negative", lambda: _apply(jnp.array([[-1, 4]], jnp.int32)), ValueError,
         ("tokens", "[0, vocab_size=256)", "-1")),
    Case("lm-checked-apply-under-jit",
         lambda: _checked_apply_under_jit(jnp.array([[3, 256]], jnp.int32)),
         checkify.JaxRuntimeError, ("tokens", "[0, vocab_size=256)", "256")),
    Case("lm-checked-loss-targets-under-jit", _checked_loss_targets, checkify.JaxRuntimeError,
         ("targets", "vocab_size=256", "999")),
    Case("lm-apply-positions-out-of-range",
         lambda: _apply(jnp.ones((1, 4), jnp.int32), positions=jnp.array([[0, 4]])),
         ValueError, ("positions", "[0, t=4)")),
    Case("lm-generate-prompt-list", lambda: _generate([[1, 2]]), ArgumentTypeError,
         ("prompt", "array")),
    Case("lm-generate-temperature-str", lambda: _generate(temperature="hot"), ArgumentTypeError,
         ("temperature", "number")),
    Case("lm-generate-top-p-zero", lambda: _generate(top_p=0.0), ValueError,
         ("top_p", "(0.0, 1.0]")),
    Case("lm-generate-max-new-tokens-float", lambda: _generate(max_new_tokens=2.0),
         ArgumentTypeError, ("max_new_tokens", "int")),
    Case("lm-generate-prompt-out-of-vocab",
         lambda: _generate(jnp.array([[1, 512]], jnp.int32)), ValueError,
         ("prompt", "vocab_size=256")),
    Case("lm-decode-step-token-2d",
         lambda: decode.decode_step(_model()[1], _model()[2], jnp.ones((1, 1), jnp.int32),
                                    decode.init_cache(_model()[0], 1), cfg=_model()[0]),
         ValueError, ("token", "[B]")),
    # Layer configs.
    Case("lm-delta-mixer-str-heads",
         lambda: delta_mixer.DeltaMixerConfig(d_model=16, num_heads="2", head_dim=8),
         ArgumentTypeError, ("num_heads", "int")),
    Case("lm-delta-mixer-impl",
         lambda: delta_mixer.DeltaMixerConfig(d_model=16, num_heads=2, head_dim=8, impl="fast"),
         ValueError, ("impl", "reference")),
    Case("lm-attention-none-theta",
         lambda: attention.AttentionConfig(d_model=16, num_heads=2, head_dim=8, rope_theta=None),
         ArgumentTypeError, ("rope_theta", "number")),
    Case("lm-attention-x-list",
         lambda: attention.apply({}, [[0.0] * 16],
                                 cfg=attention.AttentionConfig(d_model=16, num_heads=2,
                                                               head_dim=8)),
         ArgumentTypeError, ("x", "array")),
    # GNN.
    Case("lm-gnn-config-str-bool",
         lambda: gnn.GNNConfig(in_features=4, num_classes=2, panda="yes"), ValueError,
         ("panda",)),
    Case("lm-gnn-config-float-hidden",
         lambda: gnn.GNNConfig(in_features=4, num_classes=2, hidden=32.5), ArgumentTypeError,
         ("hidden", "int")),
    Case("lm-gnn-apply-dict-graph",
         lambda: gnn.apply({}, {"senders": np.zeros(2)},
                           gnn.GNNConfig(in_features=4, num_classes=2)),
         ArgumentTypeError, ("graph", "GraphBatch")),
]
