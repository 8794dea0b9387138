"""Packed prompts (`cu_seqlens`): several prompts of different lengths prefilled in one row into
a decode cache of one row per prompt, then decoded as a batch — every mixer, the short conv and
the LM give each prompt exactly what it gets alone; bad input is refused."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.layers import attention, delta_mixer, mla
from moejax.layers.short_conv import short_conv, short_conv_init, short_conv_packed
from moejax.models import decode, lm
from moejax.testing import RATIO_F32, assert_close, init_lm

LENGTHS = (5, 1, 9)  # a one-token prompt, and none a multiple of the chunk
CU = np.concatenate([[0], np.cumsum(LENGTHS)]).astype(np.int32)
N, T, MAX_LEN, STEPS = len(LENGTHS), int(CU[-1]), 12, 2


def test_short_conv_packed_continues_each_cache_row():
    p = short_conv_init(jax.random.key(0), 6, 4, std=0.5)
    x = jax.random.normal(jax.random.key(1), (1, T, 6))
    cache = jax.random.normal(jax.random.key(2), (N, 3, 6))
    y, new = short_conv_packed(p, x, jnp.asarray(CU), cache)
    for n in range(N):
        ya, ca = short_conv(p, x[:, CU[n]:CU[n + 1]], cache[n:n + 1])
        assert_close(f"prompt {n}", ya, y[:, CU[n]:CU[n + 1]], ratio=RATIO_F32)
        assert_close(f"cache {n}", ca, new[n:n + 1], ratio=RATIO_F32)


def _module_cases():
    d = 16
    delta = lambda mode: delta_mixer.DeltaMixerConfig(d_model=d, num_heads=2, head_dim=4,
                                                      mode=mode, chunk_size=4, init_std=0.2)
    slow = lambda name: () if name in ("kda", "interleave") else pytest.mark.slow
    cases = [pytest.param(delta_mixer, delta(m), id=m, marks=slow(m))
             for m in ("deltanet", "gated_qdelta", "kda")]
    cases += [pytest.param(attention, attention.AttentionConfig(
        d_model=d, num_heads=4, head_dim=8, num_kv_heads=2, gated=True, qk_norm=True,
        rotary_dim=4, init_std=0.2), id="gated_softmax-gqa-partial-rotary")]
    cases += [pytest.param(mla, mla.MLAConfig(
        d_model=d, num_heads=2, q_lora_rank=8, kv_lora_rank=8, qk_nope_head_dim=4,
        qk_rope_head_dim=4, v_head_dim=4, rope=rope, init_std=0.2), id=f"mla-{rope}",
        marks=slow(rope))
        for rope in ("interleave", "none")]
    return cases


def _init_cache(module, cfg, batch):
    if module is delta_mixer:
        return delta_mixer.init_cache(cfg, batch)
    return module.init_cache(cfg, batch, MAX_LEN)


def _step(module, params, x_t, cache, cfg):
    if module is delta_mixer:
        return delta_mixer.step(params, x_t, cache, cfg=cfg)
    y, cache = module.apply(params, x_t[:, None], cfg=cfg, cache=cache)
    return y[:, 0], cache


@pytest.mark.parametrize("module,cfg", _module_cases())
def test_mixer_packed_prefill_then_batch_decode_equals_each_prompt_alone(module, cfg):
    params = module.init(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (1, T, cfg.d_model))
    xs = jax.random.normal(jax.random.key(2), (STEPS, N, cfg.d_model))
    apply = jax.jit(lambda x, c, cu=None: module.apply(params, x, cfg=cfg, cache=c,
                                                       cu_seqlens=cu))
    step = jax.jit(lambda x_t, c: _step(module, params, x_t, c, cfg))
    y, cache = apply(x, _init_cache(module, cfg, N), jnp.asarray(CU))
    ys = []
    for s in range(STEPS):
        y_t, cache = step(xs[s], cache)
        ys.append(y_t)
    for n in range(N):
        ya, ca = apply(x[:, CU[n]:CU[n + 1]], _init_cache(module, cfg, 1))
        assert_close(f"prefill {n}", ya, y[:, CU[n]:CU[n + 1]], ratio=RATIO_F32)
        for s in range(STEPS):
            ya_t, ca = step(xs[s, n:n + 1], ca)
            assert_close(f"prompt {n} step {s}", ya_t[0], ys[s][n], ratio=RATIO_F32)


def test_delta_mixer_packed_continues_used_states():
    """The delta mixer's cache need not be fresh: each prompt continues its own row."""
    cfg = delta_mixer.DeltaMixerConfig(d_model=16, num_heads=2, head_dim=4, mode="kda_qdelta",
                                       chunk_size=4, init_std=0.2)
    params = delta_mixer.init(jax.random.key(0), cfg)
    ctx = jax.random.normal(jax.random.key(3), (N, 3, 16))
    _, used = delta_mixer.apply(params, ctx, cfg=cfg)  # three histories of 3 tokens
    x = jax.random.normal(jax.random.key(1), (1, T, 16))
    y, new = delta_mixer.apply(params, x, cfg=cfg, cache=used, cu_seqlens=jnp.asarray(CU))
    for n in range(N):
        row = jax.tree.map(lambda a, n=n: a[n:n + 1], used)
        ya, ca = delta_mixer.apply(params, x[:, CU[n]:CU[n + 1]], cfg=cfg, cache=row)
        assert_close(f"prompt {n}", ya, y[:, CU[n]:CU[n + 1]], ratio=RATIO_F32)
        assert_close(f"state {n}", ca["state"], new["state"][n:n + 1], ratio=RATIO_F32)


@pytest.mark.parametrize("layers", [
    ("kda", "mla"), pytest.param(("gated_qdelta", "gated_softmax"), marks=pytest.mark.slow)])
def test_lm_prefill_packed_prompts_then_decode_as_a_batch(layers):
    cfg = lm.get_preset("tiny", layer_mixers=layers, num_layers=2, mla_q_lora_rank=8,
                        mla_kv_lora_rank=16)
    params, state = init_lm(jax.random.key(0), cfg)
    toks = jax.random.randint(jax.random.key(1), (1, T), 0, cfg.vocab_size)
    nxt = jax.random.randint(jax.random.key(2), (STEPS, N), 0, cfg.vocab_size)
    prefill = jax.jit(lambda t, c, cu=None: decode.prefill(params, state, t, c, cfg=cfg,
                                                           cu_seqlens=cu))
    step = jax.jit(lambda tok, c: decode.decode_step(params, state, tok, c, cfg=cfg))
    logits, cache = prefill(toks, decode.init_cache(cfg, N, MAX_LEN), jnp.asarray(CU))
    assert logits.shape == (N, cfg.vocab_size)
    outs = [logits]
    for s in range(STEPS):
        out, cache = step(nxt[s], cache)
        outs.append(out)
    for n in range(N):
        la, ca = prefill(toks[:, CU[n]:CU[n + 1]], decode.init_cache(cfg, 1, MAX_LEN))
        alone = [la[0]]
        for s in range(STEPS):
            la, ca = step(nxt[s, n:n + 1], ca)
            alone.append(la[0])
        assert_close(f"prompt {n}", jnp.stack(alone), jnp.stack([o[n] for o in outs]),
                     ratio=1e-5)


@pytest.fixture(scope="module")
def tiny_softmax():
    cfg = lm.get_preset("tiny", layer_mixers=("softmax",), num_layers=1)
    return cfg, *init_lm(jax.random.key(0), cfg)


@pytest.mark.parametrize("make,match", [
    (lambda cfg, toks: (toks.reshape(3, -1)[:, :5], decode.init_cache(cfg, 3, MAX_LEN),
                        [0, 2, 5]), r"x must have B = 1, got B=3"),
    (lambda cfg, toks: (toks, decode.init_cache(cfg, 2, MAX_LEN), CU),
     r"cache for 3 packed prompts \(cu_seqlens\) must have 3 rows, got 2"),
    (lambda cfg, toks: (toks, decode.init_cache(cfg, 3, 8), CU),
     r"longest packed prompt \(9 tokens\) does not fit the cache's 8 positions"),
    (lambda cfg, toks: (toks, decode.init_cache(cfg, 3, MAX_LEN), [0, 5, 5, 15]),
     r"cu_seqlens must start at 0, increase strictly and end at T=15"),
    (lambda cfg, toks: (toks, decode.init_cache(cfg, 3, MAX_LEN), np.array([0.0, 15.0])),
     r"cu_seqlens must be an integer array"),
])
def test_bad_packed_prefill_is_refused(tiny_softmax, make, match):
    cfg, params, state = tiny_softmax
    toks = jnp.zeros((1, T), jnp.int32)
    tokens, cache, cu = make(cfg, toks)
    with pytest.raises(ValueError, match=match):
        decode.prefill(params, state, tokens, cache, cfg=cfg, cu_seqlens=jnp.asarray(cu))


def test_used_attention_cache_is_refused_or_nan(tiny_softmax):
    cfg, params, state = tiny_softmax
    toks = jnp.zeros((1, T), jnp.int32)
    cache = decode.init_cache(cfg, N, MAX_LEN)
    _, used = decode.prefill(params, state, toks[:, :3].reshape(1, 3).repeat(N, 0), cache,
                             cfg=cfg)
    with pytest.raises(ValueError, match=r"prefill a fresh cache \(pos = 0\), got pos = 3"):
        decode.prefill(params, state, toks, used, cfg=cfg, cu_seqlens=jnp.asarray(CU))
    run = jax.jit(functools.partial(decode.prefill, cfg=cfg))  # values unseen: NaN, not wrong
    logits, _ = run(params, state, toks, used, cu_seqlens=jnp.asarray(CU))
    assert np.isnan(np.asarray(logits)).all()


def test_segment_ids_and_cu_seqlens_together_are_refused():
    cfg = attention.AttentionConfig(d_model=8, num_heads=2, head_dim=4)
    params = attention.init(jax.random.key(0), cfg)
    x = jnp.zeros((1, T, 8))
    with pytest.raises(ValueError, match="segment_ids .* or cu_seqlens .*not both"):
        attention.apply(params, x, cfg=cfg, segment_ids=jnp.zeros((1, T), jnp.int32),
                        cu_seqlens=jnp.asarray(CU))
