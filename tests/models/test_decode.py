"""Decoding (`moejax.models.decode`): prefill + decode steps equal the full forward for every
mixer and a hybrid, generation shapes and greedy determinism, top-p sampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.models import decode, lm
from moejax.testing import assert_close, init_lm
from tests.models.test_lm import HYBRID, _tokens

# qdelta, softmax and the hybrid (gated_deltanet + gated_softmax) by default; the other delta
# modes share the delta mixer's decode path (tests/layers/test_delta_mixer.py) and run under slow.
_DEFAULT_MIXERS = ("qdelta", "softmax")
_MIXER_CASES = [pytest.param(dict(mixer=m), id=m, marks=() if m in _DEFAULT_MIXERS
                             else pytest.mark.slow) for m in lm.MIXERS]


@pytest.mark.parametrize("overrides", [*_MIXER_CASES, pytest.param(
    HYBRID, id="hybrid-gqa-qknorm-partial-rotary"), pytest.param(
    dict(layer_mixers=("kda", "mla"), mla_q_lora_rank=8, mla_kv_lora_rank=16),
    id="kimi-kda-mla")])
def test_prefill_and_decode_equal_full_forward(overrides):
    cfg = lm.get_preset("tiny", **overrides)
    params, state = init_lm(jax.random.key(0), cfg)
    toks = _tokens()
    # Jitted: eagerly each of the forward's many small ops compiles on its own (tens of seconds).
    logits, _, _ = jax.jit(lambda t: lm.apply(params, state, t, cfg=cfg))(toks)
    cache = decode.init_cache(cfg, 2, 21)
    first, cache = jax.jit(lambda t, c: decode.prefill(params, state, t, c, cfg=cfg))(
        toks[:, :9], cache)
    step = jax.jit(lambda tok, c: decode.decode_step(params, state, tok, c, cfg=cfg))
    outs = [first]
    for t in range(9, 21):
        out, cache = step(toks[:, t], cache)
        outs.append(out)
    assert_close("decode logits", logits[:, 8:], jnp.stack(outs, axis=1), ratio=1e-5)


def test_generate_shapes_and_greedy_determinism():
    cfg = lm.get_preset("tiny")
    params, state = init_lm(jax.random.key(0), cfg)
    prompt = _tokens(T=5)
    g1 = decode.generate(params, state, prompt, cfg=cfg, key=jax.random.key(0),
                         max_new_tokens=7, temperature=0.0)
    g2 = decode.generate(params, state, prompt, cfg=cfg, key=jax.random.key(1),
                         max_new_tokens=7, temperature=0.0)
    assert g1.shape == (2, 12)
    np.testing.assert_array_equal(np.asarray(g1), np.asarray(g2))
    np.testing.assert_array_equal(np.asarray(g1[:, :5]), np.asarray(prompt))


def test_sample_token_top_p_keeps_only_the_nucleus():
    logits = jnp.log(jnp.array([[0.6, 0.3, 0.05, 0.05]]))
    draws = jax.vmap(lambda k: decode.sample_token(k, logits, temperature=1.0, top_p=0.5))(
        jax.random.split(jax.random.key(0), 200))
    assert set(np.asarray(draws).ravel().tolist()) == {0}
    draws = jax.vmap(lambda k: decode.sample_token(k, logits, temperature=1.0, top_p=0.8))(
        jax.random.split(jax.random.key(0), 200))
    assert set(np.asarray(draws).ravel().tolist()) == {0, 1}
