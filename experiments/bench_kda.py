r"""Benchmarks of the newest hybrid pieces, measured side by side in one run (JSON out):

  1. KDA vs the gated delta rule: forward+backward wall time of the chunk path with a
     per-key-channel decay `gk` against the same call with a scalar `g`, same shapes (the
     issue's goal: ≤ 1.3×), at each chunk size of --chunk_sizes.
  2. Packed vs padded documents: training-step tokens/s of a small LM (--mixers) on a corpus of
     mixed document lengths, once packed into rows of --seq_len with `segment_ids` (no padding)
     and once one document per row padded to --seq_len; tokens/s counts real tokens only.
  3. MLA decode cache vs standard attention: bytes per token per layer of the compressed-latent
     cache (`r + Dr`) against a multi-head KV cache with the same heads and head dims, at
     DeepSeek-V3's published shapes, transformers' default Kimi Linear config and a small one
     (shapes only: nothing is allocated).

Times are medians of --reps runs after a compile run. Writes `WORKDIR/bench_kda.json`.

  python -m experiments.bench_kda --workdir=runs/bench_kda
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from tqdm import tqdm

from moejax.kernels.delta_rule import delta_rule
from moejax.layers import attention, mla
from moejax.models import lm
from moejax.testing import init_lm

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/bench_kda", "Output folder for the JSON.")
flags.DEFINE_list("shape", ["1", "4", "2048", "64", "128"], "B,H,T,Dk,Dv of the op benchmark.")
flags.DEFINE_list("chunk_sizes", ["32", "64"], "Chunk sizes of the op benchmark.")
flags.DEFINE_integer("reps", 5, "Timed repetitions (median reported).")
flags.DEFINE_list("mixers", ["kda", "gated_deltanet"], "LM mixers of the packing benchmark.")
flags.DEFINE_integer("seq_len", 512, "Row length of the packing benchmark.")
flags.DEFINE_integer("num_docs", 48, "Documents of the packing benchmark's corpus.")
flags.DEFINE_integer("d_model", 64, "Width of the packing benchmark's LM.")


def _median_time(fn, *args, reps):
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def op_benchmark(B, H, T, Dk, Dv, chunk_sizes, reps):
    """Chunk-path forward+backward seconds with gk (KDA) and with g (Gated DeltaNet)."""
    ks = jax.random.split(jax.random.key(0), 6)
    unit = lambda a: a / jnp.linalg.norm(a, axis=-1, keepdims=True)
    q = unit(jax.random.normal(ks[0], (B, T, H, Dk)))
    k = unit(jax.random.normal(ks[1], (B, T, H, Dk)))
    v = jax.random.normal(ks[2], (B, T, H, Dv))
    beta = jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, H)))
    decay = {"g": jax.nn.log_sigmoid(jax.random.normal(ks[4], (B, T, H)) + 3),
             "gk": jax.nn.log_sigmoid(jax.random.normal(ks[5], (B, T, H, Dk)) + 3)}
    rows = []
    for C in tqdm(chunk_sizes, desc="op", unit="C"):
        row = {"chunk_size": C}
        for name, gate in decay.items():
            def loss(q, k, v, beta, gate, name=name, C=C):
                o, S = delta_rule(q, k, v, beta, impl="chunk", chunk_size=C, **{name: gate})
                return jnp.sum(o**2) + jnp.sum(S**2)
            fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
            row[f"{name}_seconds"] = _median_time(fn, q, k, v, beta, gate, reps=reps)
        row["kda_over_gdn"] = row["gk_seconds"] / row["g_seconds"]
        rows.append(row)
    return rows


def _corpus(num_docs, seq_len, vocab, seed=0):
    """Document lengths log-uniform in [8, seq_len] (a mix of short and long files)."""
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.uniform(np.log(8), np.log(seq_len), num_docs)).astype(int)
    return [rng.integers(0, vocab, n) for n in lengths]


def _packed_rows(docs, seq_len):
    """Greedy packing into rows of seq_len: `(tokens, segment_ids)` `[R, seq_len]`, the tail of
    each row a padding document of its own (counted as padding)."""
    rows, segs, real = [], [], 0
    cur, seg, n = [], [], 0
    for doc in docs:
        if len(cur) + len(doc) > seq_len:
            rows.append(cur), segs.append(seg)
            cur, seg, n = [], [], 0
        cur, seg, n = cur + list(doc), seg + [n] * len(doc), n + 1
        real += len(doc)
    rows.append(cur), segs.append(seg)
    pad = lambda r, fill: np.array(r + [fill] * (seq_len - len(r)), np.int32)
    return (np.stack([pad(r, 0) for r in rows]),
            np.stack([pad(s, s[-1] + 1 if s else 0) for s in segs]), real)


def _grads(params, batch, *, state, cfg):
    return jax.grad(lambda p: lm.loss_fn(p, state, batch, cfg=cfg, train=True)[0])(params)


def packing_benchmark(mixers, seq_len, num_docs, d_model, reps):
    """Training-step (loss + grads) tokens/s on real tokens, packed vs one document per row."""
    out = []
    for mixer in tqdm(mixers, desc="packing", unit="mixer"):
        cfg = lm.get_preset("tiny", mixer=mixer, d_model=d_model, max_seq_len=seq_len)
        params, state = init_lm(jax.random.key(0), cfg)
        docs = _corpus(num_docs, seq_len, cfg.vocab_size)
        tokens, segs, real = _packed_rows(docs, seq_len)
        padded = np.stack([np.pad(d, (0, seq_len - len(d))) for d in docs]).astype(np.int32)
        mask = np.stack([np.arange(seq_len) < len(d) for d in docs]).astype(np.float32)

        step = jax.jit(functools.partial(_grads, state=state, cfg=cfg))

        packed = {"inputs": tokens, "targets": np.roll(tokens, -1, 1), "segment_ids": segs}
        pad_b = {"inputs": padded, "targets": np.roll(padded, -1, 1), "loss_mask": mask}
        t_packed = _median_time(step, params, packed, reps=reps)
        t_padded = _median_time(step, params, pad_b, reps=reps)
        out.append({"mixer": mixer, "docs": num_docs, "real_tokens": int(real),
                    "packed_rows": int(tokens.shape[0]), "padded_rows": int(padded.shape[0]),
                    "packed_tokens_per_s": real / t_packed, "padded_tokens_per_s": real / t_padded,
                    "packed_over_padded": t_padded / t_packed})
    return out


def _cache_bytes(init_cache, cfg, *args):
    shapes = jax.eval_shape(lambda: init_cache(cfg, 1, 1024, jnp.bfloat16, *args))
    # The per-position arrays only: [B, max_len, ...] (not `pos`, nor the per-row `start`).
    return sum(int(np.prod(a.shape)) * a.dtype.itemsize
               for a in jax.tree.leaves(shapes) if a.ndim >= 2) / 1024


def cache_benchmark():
    """bf16 bytes per token per layer: MLA's latent cache vs a KV cache of the same heads."""
    shapes = {"deepseek_v3": dict(d_model=7168, num_heads=128, kv_lora_rank=512,
                                  qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128),
              "kimi_linear_default": dict(d_model=2304, num_heads=32, kv_lora_rank=512,
                                      qk_nope_head_dim=128, qk_rope_head_dim=64,
                                      v_head_dim=128, rope="none"),
              "small": dict(d_model=256, num_heads=4, kv_lora_rank=64, qk_nope_head_dim=32,
                            qk_rope_head_dim=16, v_head_dim=32)}
    rows = []
    for name, kw in shapes.items():
        m = mla.MLAConfig(**kw)
        # The standard cache keeps K and V per head; with one head dim for both (the larger).
        a = attention.AttentionConfig(d_model=m.d_model, num_heads=m.num_heads,
                                      head_dim=max(m.qk_head_dim, m.v_head_dim))
        mla_b, mha_b = _cache_bytes(mla.init_cache, m), _cache_bytes(attention.init_cache, a)
        rows.append({"shape": name, "mla_bytes_per_token": mla_b,
                     "mha_bytes_per_token": mha_b, "mha_over_mla": mha_b / mla_b})
    return rows


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        B, H, T, Dk, Dv = (int(x) for x in FLAGS.shape)
        chunks = [int(c) for c in FLAGS.chunk_sizes]
    except ValueError as e:
        raise app.UsageError(f"--shape and --chunk_sizes take integers: {e}") from e
    if FLAGS.reps < 1:
        raise app.UsageError(f"--reps must be >= 1, got {FLAGS.reps}")
    report = {
        "machine": {"platform": platform.platform(), "backend": jax.default_backend(),
                    "devices": [str(d) for d in jax.devices()], "cpus": os.cpu_count(),
                    "jax": jax.__version__},
        "op": {"shape": dict(B=B, H=H, T=T, Dk=Dk, Dv=Dv),
               "rows": op_benchmark(B, H, T, Dk, Dv, chunks, FLAGS.reps)},
        "packing": {"seq_len": FLAGS.seq_len,
                    "rows": packing_benchmark(FLAGS.mixers, FLAGS.seq_len, FLAGS.num_docs,
                                              FLAGS.d_model, FLAGS.reps)},
        "mla_cache": cache_benchmark(),
    }
    os.makedirs(FLAGS.workdir, exist_ok=True)
    path = os.path.join(FLAGS.workdir, "bench_kda.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    for r in report["op"]["rows"]:
        print(f"C={r['chunk_size']}: KDA {r['gk_seconds'] * 1e3:.1f} ms, GDN "
              f"{r['g_seconds'] * 1e3:.1f} ms, ratio {r['kda_over_gdn']:.2f}")
    for r in report["packing"]["rows"]:
        print(f"{r['mixer']}: packed {r['packed_tokens_per_s']:.0f} tok/s, padded "
              f"{r['padded_tokens_per_s']:.0f} tok/s, packed/padded "
              f"{r['packed_over_padded']:.2f}x")
    for r in report["mla_cache"]:
        print(f"{r['shape']}: MLA {r['mla_bytes_per_token']:.0f} B/token/layer, MHA "
              f"{r['mha_bytes_per_token']:.0f}, {r['mha_over_mla']:.1f}x smaller")
    print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
