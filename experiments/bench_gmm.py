r"""Benchmark of the grouped matmul `gmm` (the dropless MoE expert matmul).

`lhs [N, d] @ rhs[E, d, f]` with N rows split over E groups (random sizes, seeded), in TFLOP/s
(`2·N·d·f` per call, median of --reps after a compile run), against:

  * `ragged_dot` (`impl="reference"`; the issue's goal on GPU: Pallas ≥ 1.0×),
  * a dense batched matmul of the same FLOPs (`[E, N/E, d] @ [E, d, f]`: equal groups),
  * on CPU: the plain-JAX tile scan (`impl="chunk"`, the CPU default) instead of Pallas.

On GPU the Pallas kernel runs once per `--gpu_blocks` config (a small tuning sweep) and, with
`--tgmm`, the weight-gradient kernel `tgmm` too. Defaults follow the backend: on GPU/TPU bf16,
E=8,64, d=2048, f=5632, N=16384; on CPU float32, E=8, d=256, f=512, N=2048 (so it runs here).

Writes `WORKDIR/bench_gmm.json` and prints the ratios.

  python -m experiments.bench_gmm --workdir=runs/bench_gmm
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

from moejax.kernels.gmm import chunk, pallas_gpu, pallas_tpu, reference

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/bench_gmm", "Output folder for the JSON report.")
flags.DEFINE_list("experts", None, "E values; default 8,64 on GPU/TPU, 8 on CPU.")
flags.DEFINE_integer("d_model", None, "d (K of gmm); default 2048 on GPU/TPU, 256 on CPU.")
flags.DEFINE_integer("d_ff", None, "f (N of gmm); default 5632 on GPU/TPU, 512 on CPU.")
flags.DEFINE_integer("rows", None, "N rows of lhs; default 16384 on GPU/TPU, 2048 on CPU.")
flags.DEFINE_string("dtype", None, "bfloat16 | float32; default bf16 on GPU/TPU, f32 on CPU.")
flags.DEFINE_integer("reps", 10, "Timed repetitions (median reported).")
flags.DEFINE_list("gpu_blocks", ["64:64:128:4:3", "128:64:128:4:3", "128:64:256:8:3",
                                 "128:128:128:8:3"],
                  "Triton configs block_m:block_k:block_n:num_warps:num_stages.")
flags.DEFINE_bool("tgmm", True, "Also time tgmm (Pallas vs ragged_dot_general) on GPU/TPU.")

# Dense bf16 peak TFLOP/s by device kind (no sparsity), for the fraction-of-peak column.
_PEAK = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L4": 121.0, "TPU v5 lite": 197.0,
         "TPU v5p": 459.0, "TPU v4": 275.0, "TPU v6 lite": 918.0}


def _peak(device) -> float | None:
    kind = getattr(device, "device_kind", "")
    return next((v for k, v in _PEAK.items() if k in kind), None)


def _time(fn, *args) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm-up
    times = []
    for _ in range(FLAGS.reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _inputs(e, n, d, f, dtype):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    lhs = jax.random.normal(k1, (n, d), dtype)
    rhs = (jax.random.normal(k2, (e, d, f), jnp.float32) * d**-0.5).astype(dtype)
    grad = jax.random.normal(k3, (n, f), dtype)
    p = np.random.default_rng(e).dirichlet(np.full(e, 4.0))  # moderately uneven routing
    sizes = jnp.asarray(np.random.default_rng(0).multinomial(n, p), jnp.int32)
    return lhs, rhs, grad, sizes


def _candidates(backend: str):
    """name -> (gmm fn, tgmm fn or None); every fn takes (lhs, rhs_or_grad, group_sizes)."""
    cands = {"ragged_dot": (reference.gmm, reference.tgmm if FLAGS.tgmm else None)}
    if backend == "gpu":
        for cfg in FLAGS.gpu_blocks:
            bm, bk, bn, w, s = (int(x) for x in cfg.split(":"))
            bs = pallas_gpu.BlockSizes(block_m=bm, block_k=bk, block_n=bn, num_warps=w,
                                       num_stages=s)
            cands[f"pallas[{cfg}]"] = (functools.partial(pallas_gpu.gmm, block_sizes=bs),
                                       functools.partial(pallas_gpu.tgmm, block_sizes=bs)
                                       if FLAGS.tgmm else None)
    elif backend == "tpu":
        cands["pallas"] = (pallas_tpu.gmm, pallas_tpu.tgmm if FLAGS.tgmm else None)
    else:
        cands["chunk"] = (chunk.gmm, None)
    return cands


def main(argv):
    del argv
    os.makedirs(FLAGS.workdir, exist_ok=True)
    backend = jax.default_backend()
    big = backend in ("gpu", "tpu")
    experts = [int(x) for x in FLAGS.experts or (["8", "64"] if big else ["8"])]
    d = FLAGS.d_model or (2048 if big else 256)
    f = FLAGS.d_ff or (5632 if big else 512)
    n = FLAGS.rows or (16384 if big else 2048)
    dtype = jnp.dtype(FLAGS.dtype or ("bfloat16" if big else "float32"))
    peak = _peak(jax.devices()[0])
    flops = 2.0 * n * d * f
    cases = []
    for e in experts:
        lhs, rhs, grad, sizes = _inputs(e, n, d, f, dtype)
        dense_x = lhs[: (n // e) * e].reshape(e, n // e, d)
        dense = jax.jit(lambda x, w: jnp.einsum("egd,edf->egf", x, w,
                                                preferred_element_type=jnp.float32
                                                ).astype(x.dtype))
        row = {"E": e, "dense_tflops": flops * (n // e * e / n) / _time(dense, dense_x, rhs)
               / 1e12}
        for name, (g_fn, t_fn) in _candidates(backend).items():
            row[f"{name}_tflops"] = flops / _time(jax.jit(g_fn), lhs, rhs, sizes) / 1e12
            if t_fn is not None:
                row[f"{name}_tgmm_tflops"] = flops / _time(jax.jit(t_fn), lhs, grad, sizes) / 1e12
        base = row["ragged_dot_tflops"]
        for key in [k for k in row if k.endswith("_tflops") and not k.startswith("ragged_dot")]:
            if "tgmm" not in key:
                row[key.replace("_tflops", "_over_ragged_dot")] = row[key] / base
        if peak:
            row["fraction_of_peak"] = {k: v / peak for k, v in row.items()
                                       if k.endswith("_tflops")}
        cases.append(row)
        print(f"E={e}: " + ", ".join(f"{k}={v:.3g}" for k, v in row.items()
                                       if isinstance(v, float)))
    report = {
        "shapes": {"N": n, "d": d, "f": f, "dtype": str(dtype), "experts": experts},
        "machine": {"backend": backend, "device": str(jax.devices()[0]),
                    "device_kind": getattr(jax.devices()[0], "device_kind", ""),
                    "peak_tflops": peak, "cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "jax": jax.__version__},
        "cases": cases,
    }
    path = os.path.join(FLAGS.workdir, "bench_gmm.json")
    with open(path, "w") as fh:
        json.dump(report, fh, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
