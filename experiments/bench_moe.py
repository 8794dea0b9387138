r"""Benchmark of the MoE layer: dropless vs dense, capacity vs dropless memory, STAR vs top-k.

Forward+backward (gradients w.r.t. all parameters and the input), jitted; wall time is the median
of --reps runs after a compile run and one warm-up run, with the compared cases run in turn
(A B C A B C ...) so that drifting machine load hits them alike; the median process CPU time
(all threads) is reported beside it, being less sensitive to other processes on the cores. Peak
memory is XLA's compiled memory analysis (temporary buffers of the whole forward+backward
program; compile only).

  * dropless MoE (E=8, k=2, d=512, f=1024, N=8192) vs a dense SwiGLU of equal active FLOPs
    (hidden width f·k): goal ≤ 1.5× on CPU. The capacity dispatcher is timed at the same shape.
  * peak temporary memory of capacity vs dropless as E grows 8 → 16 → 32 → 64 at fixed N and k:
    goal, dropless flat in E.
  * STAR vs top-k router, whole layer (dropless): goal ≤ 5% overhead. STAR changes only the
    router, so the router alone is timed too: `star_router_overhead_fraction` is its added time
    over the layer's time, a measure that machine noise barely touches.

Writes `WORKDIR/bench_moe.json` and prints the ratios.

  python -m experiments.bench_moe --workdir=runs/bench
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

from moejax import routers
from moejax.moe import layer as moe_layer

Array = jax.Array

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/bench", "Output folder for the JSON.")
flags.DEFINE_integer("tokens", 8192, "N, tokens per forward.")
flags.DEFINE_integer("d_model", 512, "d")
flags.DEFINE_integer("d_ff", 1024, "f, hidden width of one expert.")
flags.DEFINE_integer("num_experts", 8, "E of the timing comparisons.")
flags.DEFINE_integer("top_k", 2, "k")
flags.DEFINE_float("capacity_factor", 1.25, "cf of the capacity dispatcher.")
flags.DEFINE_integer("reps", 5, "Timed repetitions of the dense / dropless / STAR cases.")
flags.DEFINE_integer("capacity_reps", 1, "Timed repetitions of the (slow) capacity case.")
flags.DEFINE_list("mem_experts", ["8", "16", "32", "64"], "E values of the memory sweep.")
flags.DEFINE_integer("mem_d_model", 512, "d of the memory sweep (compile only, so cheap).")
flags.DEFINE_integer("mem_d_ff", 1024, "f of the memory sweep.")
flags.DEFINE_integer("seed", 0, "PRNG seed of parameters and inputs.")

GOALS = {"dropless_over_dense_time": 1.5, "star_over_topk_time": 1.05}


def _moe_cfg(num_experts, *, router="topk", dispatcher="dropless", d=None, f=None):
    return moe_layer.MoEConfig(
        d_model=d or FLAGS.d_model, d_ff=f or FLAGS.d_ff, num_experts=num_experts,
        router=router, top_k=FLAGS.top_k, dispatcher=dispatcher,
        capacity_factor=FLAGS.capacity_factor)


def _moe_grad(cfg):
    """Jitted `(params, state, x, ct) -> (dparams, dx)` of `Σ y·ct + aux_loss`."""
    def loss(params, state, x, ct):
        y, _, aux = moe_layer.moe_apply(params, state, x, cfg=cfg, train=True)
        return jnp.sum(y * ct) + aux["aux_loss"]

    return jax.jit(jax.grad(loss, argnums=(0, 2)))


def _dense_init(key, d, hidden):
    ks = jax.random.split(key, 3)
    w = lambda k, m, n: jax.random.normal(k, (m, n), jnp.float32) * m**-0.5
    return {"w_gate": w(ks[0], d, hidden), "w_up": w(ks[1], d, hidden),
            "w_down": w(ks[2], hidden, d)}


def _dense_grad():
    """Jitted forward+backward of a dense SwiGLU `(silu(x W_g) ⊙ x W_u) W_d`."""
    def loss(params, x, ct):
        h = jax.nn.silu(x @ params["w_gate"]) * (x @ params["w_up"])
        return jnp.sum((h @ params["w_down"]) * ct)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))


def _temp_bytes(compiled) -> int:
    mem = compiled.memory_analysis()
    return int(getattr(mem, "temp_size_in_bytes", 0)) if mem is not None else 0


def _time_round_robin(cases: dict, reps: int, bar) -> dict:
    """Per case `{"wall": median s, "wall_min": min s, "cpu": median process CPU s}`.

    `cases` maps name -> (compiled, args); one warm-up run each, then the cases take turns.
    Process CPU time (all threads) is less sensitive than wall time to other processes
    competing for the cores.
    """
    for compiled, args in cases.values():
        jax.block_until_ready(compiled(*args))
    wall = {name: [] for name in cases}
    cpu = {name: [] for name in cases}
    for _ in range(reps):
        for name, (compiled, args) in cases.items():
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(compiled(*args))
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            if bar is not None:
                bar.update(1)
    return {name: {"wall": float(np.median(wall[name])), "wall_min": float(np.min(wall[name])),
                   "cpu": float(np.median(cpu[name]))} for name in cases}


def _router_overhead(x: Array) -> dict:
    """Forward+backward time of the router alone (same x), top-k vs STAR."""
    cases = {}
    for router in ("topk", "star"):
        cfg = _moe_cfg(FLAGS.num_experts, router=router)
        mod = routers.get_router(router)
        rparams, rstate = mod.init(jax.random.key(FLAGS.seed), cfg.router_config)

        def loss(rparams, rstate, x, mod=mod, cfg=cfg):
            out, _ = mod.route(rparams, rstate, x, cfg=cfg.router_config, train=True)
            return jnp.sum(out.weights * out.probs) + out.aux_loss

        fn = jax.jit(jax.grad(loss, argnums=(0, 2))).lower(rparams, rstate, x).compile()
        cases[f"router_{router}"] = (fn, (rparams, rstate, x))
    return _time_round_robin(cases, 4 * FLAGS.reps, None)


def _timing(bar) -> tuple[dict, dict]:
    """Times dense, dropless top-k, dropless STAR (round robin), then capacity top-k."""
    n, d, e, k = FLAGS.tokens, FLAGS.d_model, FLAGS.num_experts, FLAGS.top_k
    k_x, k_ct, k_p = jax.random.split(jax.random.key(FLAGS.seed), 3)
    x = jax.random.normal(k_x, (n, d), jnp.float32)
    ct = jax.random.normal(k_ct, (n, d), jnp.float32)
    compiled, temp = {}, {}

    dense_params = _dense_init(k_p, d, FLAGS.d_ff * k)
    fn = _dense_grad().lower(dense_params, x, ct).compile()
    compiled["dense"], temp["dense"] = (fn, (dense_params, x, ct)), _temp_bytes(fn)
    bar.update(1)
    for name, router, dispatcher in (("dropless_topk", "topk", "dropless"),
                                     ("dropless_star", "star", "dropless"),
                                     ("capacity_topk", "topk", "capacity")):
        cfg = _moe_cfg(e, router=router, dispatcher=dispatcher)
        params, state = moe_layer.init(k_p, cfg)
        fn = _moe_grad(cfg).lower(params, state, x, ct).compile()
        compiled[name], temp[name] = (fn, (params, state, x, ct)), _temp_bytes(fn)
        bar.update(1)
    capacity = compiled.pop("capacity_topk")
    seconds = _time_round_robin(compiled, FLAGS.reps, bar)
    seconds.update(_time_round_robin({"capacity_topk": capacity}, FLAGS.capacity_reps, bar))
    seconds.update(_router_overhead(x))
    return seconds, temp


def _memory_sweep(bar) -> dict:
    """Compiled peak temp bytes of forward+backward per (dispatcher, E); nothing is run."""
    n, d, f = FLAGS.tokens, FLAGS.mem_d_model, FLAGS.mem_d_ff
    x = jax.ShapeDtypeStruct((n, d), jnp.float32)
    out = {}
    for e in [int(v) for v in FLAGS.mem_experts]:
        for dispatcher in ("capacity", "dropless"):
            cfg = _moe_cfg(e, dispatcher=dispatcher, d=d, f=f)
            params, state = jax.eval_shape(lambda k, c=cfg: moe_layer.init(k, c), jax.random.key(0))
            fn = _moe_grad(cfg).lower(params, state, x, x).compile()
            param_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params))
            out[(dispatcher, e)] = {"peak_temp_bytes": _temp_bytes(fn),
                                    "param_bytes": int(param_bytes)}
            bar.update(1)
    return out


def main(argv):
    del argv
    os.makedirs(FLAGS.workdir, exist_ok=True)
    mem_es = [int(v) for v in FLAGS.mem_experts]
    load_before = os.getloadavg()
    total = 4 + 3 * FLAGS.reps + FLAGS.capacity_reps + 2 * len(mem_es)
    with tqdm(total=total, desc="bench_moe", unit="step") as bar:
        times, temp = _timing(bar)
        memory = _memory_sweep(bar)
    load_after = os.getloadavg()

    wall = lambda name: times[name]["wall"]
    cpu = lambda name: times[name]["cpu"]
    mem = lambda disp, e: memory[(disp, e)]["peak_temp_bytes"]
    e_lo, e_hi = min(mem_es), max(mem_es)
    summary = {
        "dropless_over_dense_time": wall("dropless_topk") / wall("dense"),
        "dropless_over_dense_cpu_time": cpu("dropless_topk") / cpu("dense"),
        "capacity_over_dense_time": wall("capacity_topk") / wall("dense"),
        "capacity_over_dropless_time": wall("capacity_topk") / wall("dropless_topk"),
        "star_over_topk_time": wall("dropless_star") / wall("dropless_topk"),
        "star_over_topk_cpu_time": cpu("dropless_star") / cpu("dropless_topk"),
        # STAR's extra work is all in the router: its added router time over the layer's time.
        "star_router_overhead_fraction":
            (wall("router_star") - wall("router_topk")) / wall("dropless_topk"),
        f"dropless_peak_temp_E{e_hi}_over_E{e_lo}": mem("dropless", e_hi) / mem("dropless", e_lo),
        f"capacity_peak_temp_E{e_hi}_over_E{e_lo}": mem("capacity", e_hi) / mem("capacity", e_lo),
    }
    for e in mem_es:
        summary[f"capacity_over_dropless_peak_temp_E{e}"] = mem("capacity", e) / mem("dropless", e)
    goals_met = {name: summary[name] <= bound for name, bound in GOALS.items()}
    report = {
        "shapes": {"N": FLAGS.tokens, "d": FLAGS.d_model, "f": FLAGS.d_ff,
                   "E": FLAGS.num_experts, "k": FLAGS.top_k,
                   "dense_hidden": FLAGS.d_ff * FLAGS.top_k,
                   "capacity_factor": FLAGS.capacity_factor,
                   "memory_sweep": {"N": FLAGS.tokens, "d": FLAGS.mem_d_model,
                                    "f": FLAGS.mem_d_ff, "E": mem_es}},
        "machine": {"backend": jax.default_backend(), "device": str(jax.devices()[0]),
                    "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "jax": jax.__version__, "loadavg_before": load_before,
                    "loadavg_after": load_after},
        "summary": summary,
        "goals": {name: {"bound": GOALS[name], "met": met} for name, met in goals_met.items()},
        "timing": [{"case": name, "fwd_bwd_seconds": t["wall"], "fwd_bwd_seconds_min":
                    t["wall_min"], "fwd_bwd_cpu_seconds": t["cpu"],
                    "peak_temp_bytes": temp.get(name)} for name, t in times.items()],
        "memory": [{"dispatcher": disp, "E": e, **vals}
                   for (disp, e), vals in sorted(memory.items(), key=lambda kv: kv[0][1])],
    }
    with open(os.path.join(FLAGS.workdir, "bench_moe.json"), "w") as f:
        json.dump(report, f, indent=2)
    _print(report, times, temp, memory, summary, goals_met, mem_es)


def _print(report, times, temp, memory, summary, goals_met, mem_es):
    print(f"\nforward+backward at N={FLAGS.tokens} d={FLAGS.d_model} f={FLAGS.d_ff} "
          f"E={FLAGS.num_experts} k={FLAGS.top_k} on {report['machine']['device']} "
          f"(load average {report['machine']['loadavg_before'][0]:.1f} before, "
          f"{report['machine']['loadavg_after'][0]:.1f} after):")
    for name, t in times.items():
        peak = f"   peak temp {temp[name] / 2**20:8.1f} MiB" if name in temp else ""
        print(f"  {name:15s} median {t['wall'] * 1e3:9.1f} ms  min {t['wall_min'] * 1e3:9.1f} ms"
              f"  cpu {t['cpu'] * 1e3:9.1f} ms{peak}")
    print(f"peak temp memory of forward+backward, N={FLAGS.tokens} d={FLAGS.mem_d_model} "
          f"f={FLAGS.mem_d_ff} k={FLAGS.top_k}:")
    for e in mem_es:
        print(f"  E={e:3d}  capacity {memory[('capacity', e)]['peak_temp_bytes'] / 2**20:8.1f} MiB"
              f"   dropless {memory[('dropless', e)]['peak_temp_bytes'] / 2**20:8.1f} MiB"
              f"   (expert params {memory[('dropless', e)]['param_bytes'] / 2**20:7.1f} MiB)")
    for name, value in summary.items():
        goal = (f"   (goal <= {GOALS[name]:.2f}: {'met' if goals_met[name] else 'MISSED'})"
                if name in GOALS else "")
        print(f"  {name}: {value:.3f}{goal}")


if __name__ == "__main__":
    app.run(main)
