r"""Benchmark of the delta-rule op: chunkwise vs token-by-token scan, Q-Delta vs DeltaNet.

Measures, side by side in one run, forward+backward wall time (median of --reps after a compile
run) and the compiled peak temporary memory of the backward pass (XLA's memory analysis):

  * chunk vs reference (the issue's goal: chunk ≥ 10× faster on CPU at T=4096),
  * Q-Delta vs DeltaNet on the chunk path (goal: ≤ 1.15× the time),
  * peak memory of the chunk backward vs the reference backward,
  * a sweep over T for the plot.

On a GPU/TPU (or with --accelerator) it measures instead, in bf16 at B=4 H=8 T=8192 Dk=128
Dv=256 by default: the Pallas kernel vs the jnp chunk path (goal ≥ 2×), vs causal
`jax.nn.dot_product_attention` (cuDNN on GPU) over a T sweep with the crossover T, and the
achieved TFLOP/s of the Pallas kernel (against --peak_tflops when given), and, where
flash-linear-attention is importable (`fla-core`, PyTorch + Triton), its `chunk_delta_rule` /
`chunk_gated_delta_rule` forward+backward on the same inputs (the issue's goal: Pallas ≤ 1.3×
fla's time at T=8192 bf16).

Writes `WORKDIR/bench_delta_rule.json` and `WORKDIR/bench_delta_rule.png`.

  python -m experiments.bench_delta_rule --workdir=runs/bench
  python -m experiments.bench_delta_rule --workdir=runs/bench --accelerator   # on a GPU/TPU
"""

from __future__ import annotations

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

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/bench", "Output folder for JSON and PNG.")
flags.DEFINE_integer("batch", 1, "B")
flags.DEFINE_integer("heads", 4, "H")
flags.DEFINE_integer("seq_len", 4096, "T of the headline comparison.")
flags.DEFINE_integer("dk", 64, "Dk")
flags.DEFINE_integer("dv", 128, "Dv")
flags.DEFINE_integer("chunk_size", 64, "C of the chunk path.")
flags.DEFINE_integer("reps", 5, "Timed repetitions (median reported).")
flags.DEFINE_list("sweep", ["512", "1024", "2048", "4096"], "T values of the sweep plot.")
flags.DEFINE_bool("accelerator", None, "Run the accelerator benchmark (default: on GPU/TPU).")
flags.DEFINE_list("accel_shape", ["4", "8", "8192", "128", "256"], "B,H,T,Dk,Dv on GPU/TPU.")
flags.DEFINE_list("accel_sweep", ["1024", "2048", "4096", "8192", "16384"],
                  "T values of the attention crossover sweep.")
flags.DEFINE_float("peak_tflops", 0.0, "Device bf16 peak TFLOP/s (0: not reported).")
flags.DEFINE_bool("fla", True, "On GPU, also time flash-linear-attention's Triton kernels.")

MODES = {"deltanet": (False, False), "qdelta": (False, True), "gated_deltanet": (True, False),
         "gated_qdelta": (True, True)}


def _inputs(mode, B, T, H, Dk, Dv, dtype=jnp.float32):
    use_g, use_lam = MODES[mode]
    ks = jax.random.split(jax.random.key(0), 6)
    unit = lambda a: a / jnp.linalg.norm(a, axis=-1, keepdims=True)
    args = (
        unit(jax.random.normal(ks[0], (B, T, H, Dk))),
        unit(jax.random.normal(ks[1], (B, T, H, Dk))),
        jax.random.normal(ks[2], (B, T, H, Dv)),
        jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, H))),
        jax.nn.log_sigmoid(jax.random.normal(ks[4], (B, T, H)) + 3) if use_g else None,
        jax.nn.sigmoid(jax.random.normal(ks[5], (B, T, H))) if use_lam else None,
    )
    return tuple(None if a is None else a.astype(dtype) for a in args)


def _fwd_bwd(impl, chunk_size):
    def loss(q, k, v, beta, g, lam):
        o, S = delta_rule(q, k, v, beta, g=g, lam=lam, impl=impl, chunk_size=chunk_size)
        return jnp.sum(o**2) + jnp.sum(S**2)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))


def _time(fn, args, reps):
    """(median seconds, compiled peak temp bytes) of a jitted `fn` after a compile run."""
    compiled = fn.lower(*args).compile()
    mem = compiled.memory_analysis()
    temp = int(getattr(mem, "temp_size_in_bytes", 0)) if mem is not None else 0
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), temp


def measure(mode, impl, T, reps):
    """Returns (median seconds of forward+backward, compiled peak temp bytes)."""
    args = _inputs(mode, FLAGS.batch, T, FLAGS.heads, FLAGS.dk, FLAGS.dv)
    return _time(_fwd_bwd(impl, FLAGS.chunk_size), args, reps)


def _attention_fwd_bwd():
    def loss(q, k, v):
        return jnp.sum(jax.nn.dot_product_attention(q, k, v, is_causal=True).astype(
            jnp.float32) ** 2)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _delta_flops(B, T, H, Dk, Dv, C):
    """Forward FLOPs of the chunk form (×3 for forward+backward)."""
    per_token = 2 * (C * Dk * 2 + C * (Dk + Dv) + C * Dv + Dk * Dv * 4) + C * C
    return 3.0 * B * H * T * per_token


def _fla_time(mode, args, reps):
    """Median forward+backward seconds of flash-linear-attention's chunk kernel on `args` (the
    same values, moved to torch; same loss as `_fwd_bwd`), or None when fla is not importable.
    fla has no Q-Delta: `*_qdelta` modes are timed as their DeltaNet counterparts (lam dropped).
    """
    try:
        import torch
        from fla.ops.delta_rule import chunk_delta_rule
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except ImportError:
        return None
    q, k, v, beta, g, _ = args
    to_t = lambda a, dt: torch.tensor(np.asarray(a.astype(jnp.float32)), device="cuda",  # noqa: E731
                                      dtype=dt, requires_grad=True)
    bf = torch.bfloat16
    tq, tk, tv, tb = (to_t(a, bf) for a in (q, k, v, beta))
    tg = None if g is None else to_t(g, torch.float32)

    def step():
        for t in (tq, tk, tv, tb, tg):
            if t is not None:
                t.grad = None
        if tg is None:
            o, S = chunk_delta_rule(q=tq, k=tk, v=tv, beta=tb, output_final_state=True)
        else:
            o, S = chunk_gated_delta_rule(q=tq, k=tk, v=tv, g=tg, beta=tb,
                                          output_final_state=True)
        ((o.float() ** 2).sum() + (S.float() ** 2).sum()).backward()

    step()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return float(np.median(times))


def accelerator_main():
    """Pallas vs chunk vs causal attention in bf16 on a GPU/TPU."""
    B, H, T, Dk, Dv = (int(x) for x in FLAGS.accel_shape)
    report = {"shape": {"B": B, "H": H, "T": T, "Dk": Dk, "Dv": Dv,
                        "chunk_size": FLAGS.chunk_size, "dtype": "bfloat16"},
              "device": str(jax.devices()[0]), "jax": jax.__version__, "cases": {}}
    for mode in ("deltanet", "gated_deltanet", "gated_qdelta"):
        args = _inputs(mode, B, T, H, Dk, Dv, jnp.bfloat16)
        for impl in ("pallas", "chunk"):
            sec, _ = _time(_fwd_bwd(impl, FLAGS.chunk_size), args, FLAGS.reps)
            report["cases"][f"{mode}/{impl}"] = sec
        report["cases"][f"{mode}/pallas_over_chunk_speedup"] = (
            report["cases"][f"{mode}/chunk"] / report["cases"][f"{mode}/pallas"])
        tflops = _delta_flops(B, T, H, Dk, Dv, FLAGS.chunk_size) / report["cases"][
            f"{mode}/pallas"] / 1e12
        report["cases"][f"{mode}/pallas_tflops"] = tflops
        if FLAGS.peak_tflops:
            report["cases"][f"{mode}/pallas_fraction_of_peak"] = tflops / FLAGS.peak_tflops
        fla = _fla_time(mode, args, FLAGS.reps) if FLAGS.fla and jax.default_backend() == "gpu" \
            else None
        if fla is not None:
            report["cases"][f"{mode}/fla"] = fla
            report["cases"][f"{mode}/pallas_over_fla_time"] = (
                report["cases"][f"{mode}/pallas"] / fla)
    sweep = []
    for t in tqdm([int(x) for x in FLAGS.accel_sweep], desc="attention crossover"):
        qkv = _inputs("gated_qdelta", B, t, H, Dk, Dk, jnp.bfloat16)
        attn, _ = _time(_attention_fwd_bwd(), qkv[:3], FLAGS.reps)
        args = _inputs("gated_qdelta", B, t, H, Dk, Dv, jnp.bfloat16)
        delta, _ = _time(_fwd_bwd("pallas", FLAGS.chunk_size), args, FLAGS.reps)
        sweep.append({"T": t, "attention_s": attn, "pallas_s": delta,
                      "pallas_over_attention": delta / attn})
    report["attention_sweep"] = sweep
    faster = [r["T"] for r in sweep if r["pallas_over_attention"] < 1]
    report["crossover_T"] = min(faster) if faster else None
    with open(os.path.join(FLAGS.workdir, "bench_delta_rule_accelerator.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))


def main(argv):
    del argv
    os.makedirs(FLAGS.workdir, exist_ok=True)
    on_accel = jax.default_backend() in ("gpu", "tpu")
    if FLAGS.accelerator or (FLAGS.accelerator is None and on_accel):
        accelerator_main()
        return
    T = FLAGS.seq_len
    sweep = sorted({int(t) for t in FLAGS.sweep} | {T})
    jobs = [("deltanet", "reference", T), ("qdelta", "reference", T)]
    jobs += [(m, "chunk", T) for m in MODES]
    jobs += [(m, impl, t) for t in sweep if t != T for m in ("deltanet", "qdelta")
             for impl in ("reference", "chunk")]
    results = {}
    for mode, impl, t in tqdm(jobs, desc="bench_delta_rule", unit="case"):
        results[(mode, impl, t)] = measure(mode, impl, t, FLAGS.reps)

    sec = lambda m, i, t=T: results[(m, i, t)][0]
    mem = lambda m, i, t=T: results[(m, i, t)][1]
    summary = {
        "chunk_speedup_over_reference_deltanet":
            sec("deltanet", "reference") / sec("deltanet", "chunk"),
        "chunk_speedup_over_reference_qdelta":
            sec("qdelta", "reference") / sec("qdelta", "chunk"),
        "qdelta_over_deltanet_chunk_time": sec("qdelta", "chunk") / sec("deltanet", "chunk"),
        "gated_qdelta_over_gated_deltanet_chunk_time":
            sec("gated_qdelta", "chunk") / sec("gated_deltanet", "chunk"),
        "reference_over_chunk_backward_peak_memory":
            mem("qdelta", "reference") / max(mem("qdelta", "chunk"), 1),
    }
    report = {
        "shapes": {"B": FLAGS.batch, "T": T, "H": FLAGS.heads, "Dk": FLAGS.dk, "Dv": FLAGS.dv,
                   "chunk_size": FLAGS.chunk_size},
        "machine": {"backend": jax.default_backend(), "device": str(jax.devices()[0]),
                    "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "jax": jax.__version__},
        "summary": summary,
        "cases": [{"mode": m, "impl": i, "T": t, "fwd_bwd_seconds": s, "peak_temp_bytes": b}
                  for (m, i, t), (s, b) in sorted(results.items(), key=lambda kv: kv[0][2])],
    }
    with open(os.path.join(FLAGS.workdir, "bench_delta_rule.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nforward+backward at B={FLAGS.batch} H={FLAGS.heads} T={T} Dk={FLAGS.dk} "
          f"Dv={FLAGS.dv} on {report['machine']['device']}:")
    for (m, i, t), (s, b) in sorted(results.items()):
        if t == T:
            print(f"  {m:15s} {i:9s} {s * 1e3:9.1f} ms   peak temp {b / 2**20:8.1f} MiB")
    for name, value in summary.items():
        print(f"  {name}: {value:.2f}")
    _plot(results, sweep, os.path.join(FLAGS.workdir, "bench_delta_rule.png"))


def _plot(results, sweep, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in ("deltanet", "qdelta"):
        for impl, style in (("reference", "--"), ("chunk", "-")):
            ts = [t for t in sweep if (mode, impl, t) in results]
            ax1.plot(ts, [results[(mode, impl, t)][0] * 1e3 for t in ts], style, marker="o",
                     label=f"{mode} / {impl}")
            ax2.plot(ts, [results[(mode, impl, t)][1] / 2**20 for t in ts], style, marker="o",
                     label=f"{mode} / {impl}")
    for ax, ylabel in ((ax1, "forward+backward (ms)"), (ax2, "peak temp memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"delta rule on {jax.devices()[0].platform}: chunk vs token-by-token scan")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    app.run(main)
