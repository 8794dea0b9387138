"""Decoding for the decoder LM of `moejax.models.lm`: caches, prefill, one-token steps, sampling.

  cache = init_cache(cfg, B, max_len)                   per-layer caches
  logits, cache = prefill(params, state, prompt, cache, cfg=cfg)      [B, V] of the last position
  logits, cache = decode_step(params, state, token, cache, cfg=cfg)   one token per sequence
  tokens = generate(params, state, prompt, cfg=cfg, key=key, max_new_tokens=n)

Softmax mixers keep a KV cache (`moejax.layers.attention`), MLA its compressed latents
(`moejax.layers.mla`), delta mixers their recurrent state
and convolution cache (`moejax.layers.delta_mixer`); each mixer module's cache and one-token step
come from `_DECODERS`. Token ids are checked as in `lm.apply` (their range only outside `jit`;
under `jit` they are clamped, see `lm.embed`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from moejax.layers import attention, delta_mixer, mla
from moejax.layers.segments import check_cu_seqlens
from moejax.models import lm
from moejax.validation import check_array, check_int, check_number, check_range

Array = jax.Array
LMConfig = lm.LMConfig


class _Decoder(NamedTuple):
    """How a mixer module decodes: a fresh cache and one step `x [B, d]` → `(y [B, d], cache)`."""
    init_cache: Callable[[Any, int, int, Any], Any]  # (mixer_cfg, batch, max_len, dtype)
    step: Callable[..., tuple[Array, Any]]  # (params, x, cache, *, cfg)


def _cached_step(apply: Callable) -> Callable:
    """The one-token step of a mixer whose `apply` appends to a position cache (softmax, MLA)."""
    def step(params, x, cache, *, cfg):
        y, cache = apply(params, x[:, None], cfg=cfg, cache=cache)
        return y[:, 0], cache
    return step


# Keyed by the modules of `lm.MIXER_MODULES`.
_DECODERS = {
    delta_mixer: _Decoder(
        init_cache=lambda mcfg, batch, max_len, dtype: delta_mixer.init_cache(mcfg, batch, dtype),
        step=delta_mixer.step),
    attention: _Decoder(init_cache=attention.init_cache, step=_cached_step(attention.apply)),
    mla: _Decoder(init_cache=mla.init_cache, step=_cached_step(mla.apply)),
}


def init_cache(cfg: LMConfig, batch: int, max_len: int | None = None) -> list:
    """Per-layer decode caches for a fresh batch of sequences (`max_len`: positions of the
    attention caches, default `cfg.max_seq_len`)."""
    max_len = cfg.max_seq_len if max_len is None else max_len
    return [_DECODERS[cfg.mixer_module(i)].init_cache(cfg.mixer_config(i), batch, max_len,
                                                      cfg.compute_dtype)
            for i in range(cfg.num_layers)]


def _check_cache(cache: Any, cfg: LMConfig, source: str) -> None:
    if not isinstance(cache, list | tuple) or len(cache) != cfg.num_layers:
        raise ValueError(f"cache must be a list of {cfg.num_layers} per-layer caches (from "
                         f"{source}), got {type(cache).__name__}")


def prefill(params: dict, state: dict, tokens: Array, cache: list, *, cfg: LMConfig,
            cu_seqlens: Array | None = None) -> tuple[Array, list]:
    """Feeds `tokens` `[B, T]` through the model on top of `cache`.

    With `cu_seqlens` (`[N + 1]` int, `0 = cu[0] < … < cu[N] = T`): `tokens` `[1, T]` holds N
    prompts back to back, prefilled without padding into a fresh `cache` of N rows
    (`init_cache(cfg, N, max_len)`); each prompt is modelled as if alone (attention inside
    the prompt, delta-rule states and short convs per prompt), and `decode_step` then continues
    the N rows as a batch. Attention and MLA caches hold each prompt right-aligned
    (`moejax.layers.segments.Packed`).

    Returns:
      `(logits of the last position [B, V], new_cache)`; with `cu_seqlens`, of each prompt's
      last token `[N, V]`.

    Raises:
      ValueError / ArgumentTypeError: as `lm.apply` for `tokens` (ids checked outside `jit`
        only); for `cu_seqlens`, B != 1, a cache of the wrong number of rows, a used cache,
        or a prompt longer than the cache (values checked outside `jit`; under `jit` the
        logits are NaN for a used or short attention cache instead).
    """
    lm.check_tokens(tokens, cfg)
    if tokens.shape[1] == 0:
        raise ValueError("tokens must hold at least one position, got shape "
                         f"{tokens.shape}")
    _check_cache(cache, cfg, "init_cache")
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, tokens.shape)
    h, _, _, cache = lm.forward(params, state, tokens, cfg, train=False, rng=None, caches=cache,
                                cu_seqlens=cu_seqlens)
    last = h[:, -1] if cu_seqlens is None else h[0, cu_seqlens[1:] - 1]
    return lm.logits_from_hidden(params, last, cfg), cache


def decode_step(params: dict, state: dict, token: Array, cache: list, *, cfg: LMConfig
                ) -> tuple[Array, list]:
    """One token per sequence: `token` `[B]` → `(logits [B, V], new_cache)`.

    Delta mixers advance with `delta_rule_step` (the recurrent form), softmax mixers append to
    their KV cache. Token ids are checked as in `lm.apply` (their range only outside `jit`;
    under `jit` they are clamped, see `lm.embed`).
    """
    lm.check_tokens(token, cfg, name="token", ndim=1)
    _check_cache(cache, cfg, "init_cache or prefill")
    h = lm.embed(params, token, cfg)
    new_caches = []
    for i, block in enumerate(params["blocks"]):
        x = lm.norm(block["norm1"], h, cfg)
        y, c = _DECODERS[cfg.mixer_module(i)].step(block["mixer"], x, cache[i],
                                                   cfg=cfg.mixer_config(i))
        h = h + y
        if cfg.ffns[i] != "none":  # a layer without FFN has neither `ffn` nor `norm2`
            y, _, _ = lm.ffn_apply(block["ffn"], state["blocks"][i],
                                   lm.norm(block["norm2"], h, cfg), cfg, i, train=False,
                                   rng=None)
            h = h + y
        new_caches.append(c)
    h = lm.norm(params["final_norm"], h, cfg)
    return lm.logits_from_hidden(params, h, cfg), new_caches


def sample_token(key: Array, logits: Array, *, temperature: float, top_p: float) -> Array:
    """Samples `[B]` tokens from `logits` `[B, V]`: greedy at temperature 0, else nucleus.

    `temperature` (≥ 0) and `top_p` (in (0, 1]) are Python numbers (static under `jit`).
    """
    _check_sampling(temperature, top_p)
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # always keeps the first
        keep = jnp.zeros_like(keep_sorted).at[
            jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "top_p"))
def _generate(params, state, prompt, key, *, cfg, max_new_tokens, temperature, top_p):
    B, T0 = prompt.shape
    cache = init_cache(cfg, B, T0 + max_new_tokens)
    logits, cache = prefill(params, state, prompt, cache, cfg=cfg)

    def body(carry, k):
        logits, cache = carry
        tok = sample_token(k, logits, temperature=temperature, top_p=top_p)
        logits, cache = decode_step(params, state, tok, cache, cfg=cfg)
        return (logits, cache), tok

    _, toks = jax.lax.scan(body, (logits, cache), jax.random.split(key, max_new_tokens))
    return jnp.concatenate([prompt, toks.T.astype(prompt.dtype)], axis=1)


def _check_sampling(temperature: Any, top_p: Any) -> None:
    check_number("temperature", temperature)
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    check_range("top_p", top_p, 0.0, 1.0)


def generate(params: dict, state: dict, prompt: Array, *, cfg: LMConfig, key: Array,
             max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0) -> Array:
    """Samples a continuation of `prompt` `[B, T0]`; returns `[B, T0 + max_new_tokens]`.

    Args:
      prompt: `[B, T0]` int token ids in [0, vocab_size), T0 ≥ 1 (checked when concrete).
      key: a PRNG key.
      max_new_tokens: ≥ 1; T0 + max_new_tokens must not exceed `cfg.max_seq_len`.
      temperature: a number ≥ 0; 0 is greedy.
      top_p: nucleus mass in (0, 1].

    Raises:
      ValueError / ArgumentTypeError: naming the argument.
    """
    check_int("max_new_tokens", max_new_tokens, lo=1)
    _check_sampling(temperature, top_p)
    check_array("key", key)
    lm.check_tokens(prompt, cfg, offset=max_new_tokens, name="prompt")
    if prompt.shape[1] == 0:
        raise ValueError(f"prompt must hold at least one token, got shape {prompt.shape}")
    return _generate(params, state, prompt, key, cfg=cfg, max_new_tokens=int(max_new_tokens),
                     temperature=float(temperature), top_p=float(top_p))
