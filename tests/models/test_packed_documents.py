"""Packed documents (`segment_ids`): every mixer, and the LM, model each document of a packed
row exactly as if it were alone; the loss reads `batch["segment_ids"]`; bad ids are refused."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.layers import attention, delta_mixer
from moejax.layers.short_conv import short_conv, short_conv_init
from moejax.models import lm
from moejax.testing import RATIO_F32, assert_close, init_lm

# Row 0 holds three documents (15, 20 and 5 tokens), row 1 one document of 40.
SEG = jnp.array([[0] * 15 + [1] * 20 + [2] * 5, [4] * 40])
DOCS = [(0, 0, 15), (0, 15, 35), (0, 35, 40), (1, 0, 40)]


def _each_alone(fn, x, packed):
    for b, s, e in DOCS:
        assert_close(f"row {b} [{s}:{e}]", fn(x[b:b + 1, s:e])[0], packed[b, s:e],
                     ratio=RATIO_F32)


def test_short_conv_restarts_at_each_document():
    p = short_conv_init(jax.random.key(0), 6, 4, std=0.5)
    x = jax.random.normal(jax.random.key(1), (2, 40, 6))
    y, _ = short_conv(p, x, segment_ids=SEG)
    _each_alone(lambda xs: short_conv(p, xs)[0], x, y)


@pytest.mark.parametrize("mode", delta_mixer.MODES)
def test_delta_mixer_documents_are_independent(mode):
    cfg = delta_mixer.DeltaMixerConfig(d_model=16, num_heads=2, head_dim=4, mode=mode,
                                       chunk_size=16, init_std=0.2)
    params = delta_mixer.init(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (2, 40, 16))
    apply = jax.jit(functools.partial(delta_mixer.apply, cfg=cfg))
    y, _ = apply(params, x, segment_ids=SEG)
    _each_alone(lambda xs: apply(params, xs)[0], x, y)


@pytest.mark.parametrize("gated", [False, True])
def test_attention_stays_inside_a_document(gated):
    cfg = attention.AttentionConfig(d_model=16, num_heads=2, head_dim=8, gated=gated,
                                    init_std=0.2)
    params = attention.init(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (2, 40, 16))
    y, _ = attention.apply(params, x, cfg=cfg, segment_ids=SEG)
    _each_alone(lambda xs: attention.apply(params, xs, cfg=cfg)[0], x, y)


@pytest.fixture(scope="module")
def hybrid():
    cfg = lm.get_preset("tiny", layer_mixers=("kda", "softmax"), num_layers=2)
    return cfg, *init_lm(jax.random.key(0), cfg)


def test_lm_models_each_document_as_if_alone_and_the_loss_uses_them(hybrid):
    cfg, params, state = hybrid
    tokens = jax.random.randint(jax.random.key(1), (2, 40), 0, cfg.vocab_size)
    apply = jax.jit(functools.partial(lm.apply, cfg=cfg))
    logits, _, _ = apply(params, state, tokens, segment_ids=SEG)
    _each_alone(lambda t: apply(params, state, t)[0], tokens, logits)
    batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1)}
    _, (_, packed) = lm.loss_fn(params, state, {**batch, "segment_ids": SEG}, cfg=cfg,
                                train=False)
    _, (_, plain) = lm.loss_fn(params, state, batch, cfg=cfg, train=False)
    logp = jax.nn.log_softmax(logits)
    ce = -jnp.take_along_axis(logp, batch["targets"][..., None], -1)
    np.testing.assert_allclose(float(packed["ce"]), float(jnp.mean(ce)), rtol=1e-5)
    assert float(packed["ce"]) != float(plain["ce"])


@pytest.mark.parametrize("seg,match", [
    (jnp.zeros((2, 39), jnp.int32), r"segment_ids must be \[B, T\] = \[2, 40\]"),
    (jnp.zeros((2, 40)), r"segment_ids must be an integer array"),
    ([[0] * 40] * 2, r"segment_ids"),
])
def test_bad_segment_ids_are_refused(hybrid, seg, match):
    cfg, params, state = hybrid
    with pytest.raises(ValueError, match=match):
        lm.apply(params, state, jnp.zeros((2, 40), jnp.int32), cfg=cfg, segment_ids=seg)


def test_attention_refuses_segment_ids_with_a_cache():
    cfg = attention.AttentionConfig(d_model=16, num_heads=2, head_dim=8)
    params = attention.init(jax.random.key(0), cfg)
    with pytest.raises(ValueError, match="segment_ids .* not with a decode cache"):
        attention.apply(params, jnp.ones((2, 40, 16)), cfg=cfg, segment_ids=SEG,
                        cache=attention.init_cache(cfg, 2, 64))
