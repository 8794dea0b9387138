r"""Benchmark of expert parallelism on 8 simulated CPU devices (DESIGN §5).

Forward+backward of the MoE layer (gradients w.r.t. all parameters and the input), jitted; wall
time is the median of --reps runs after a compile run and a warm-up run, cases in turn (A B C A B
C ...) so that drifting load hits them alike. Cases:

  * `single`: the layer without a mesh, on one device (the reference);
  * `mesh_DxX`: the same `moe_apply` with `parallel=ExpertParallel(mesh)` for each (data, expert)
    mesh of --meshes; `8x1` is replicated experts (pure data parallelism, no token exchange;
    XLA drops the size-1 `all_to_all`). `mesh_*_over_replicated_time` compares like with like;
    `*_over_single_time` also changes the dispatch code (with --dispatcher=capacity the single
    device uses the one-hot O(N·E·C) einsums, EP the per-destination buffers and gmm).

All 8 "devices" are threads of one CPU process sharing this machine's cores, so EP time here
measures overheads (packing, collectives, partitioned routing), not a speed-up: the devices do
not add compute. Bytes moved by `all_to_all` per step are read from the compiled HLO (operand
shapes of every all-to-all, per device, times the device count) and compared with the analytic
count (`all_to_all_bytes` below) and the formula `2·N·k·cf·d·bytes` (forward; backward doubles it).

Scaling plan (multi-host GPU/TPU): at 64 devices (e.g. 8 hosts × 8 GPUs) keep `'expert'` inside
a host (NVLink / ICI) and `'data'` across hosts, so `all_to_all` never leaves the fast fabric;
switch the packing to `ragged_all_to_all` (only filled rows move; the fixed-capacity path stays
the fallback) and the local experts to the Pallas gmm. At 512 devices E ≥ X is needed (E/X ≥ 1
expert per device; fine-grained experts help), `all_to_all` across hosts becomes unavoidable for
X > devices per host, so overlap it with the shared-expert / attention compute, and shard the
router's global reductions hierarchically (they are O(E·d) per step, small next to the tokens).

Writes `WORKDIR/bench_ep.json` and prints the ratios.

  python -m experiments.bench_ep --workdir=runs/bench
"""

from __future__ import annotations

import os

for _flag in ("--xla_force_host_platform_device_count=8",):
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from moejax import parallel  # noqa: E402
from moejax.moe import layer as moe_layer  # noqa: E402
from moejax.parallel import expert_parallel  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the script's flags (only when run as a script, so importing this module for its
    byte counts never clashes with other experiments' flags)."""
    flags.DEFINE_string("workdir", "runs/bench", "Output folder for the JSON.")
    flags.DEFINE_integer("tokens", 4096, "N, global tokens per step (divisible by 8).")
    flags.DEFINE_integer("d_model", 256, "d")
    flags.DEFINE_integer("d_ff", 512, "f, hidden width of one expert.")
    flags.DEFINE_integer("num_experts", 8, "E (divisible by every expert-axis size).")
    flags.DEFINE_integer("top_k", 2, "k")
    flags.DEFINE_string("router", "topk", "Router name.")
    flags.DEFINE_string("dispatcher", "capacity", "capacity (cf-sized buffers) or dropless.")
    flags.DEFINE_float("capacity_factor", 1.25, "cf of the capacity dispatcher.")
    flags.DEFINE_list("meshes", ["8x1", "4x2", "2x4", "1x8"], "data x expert meshes to time.")
    flags.DEFINE_integer("reps", 5, "Timed repetitions per case.")
    flags.DEFINE_integer("seed", 0, "PRNG seed.")


_HLO_SHAPE = re.compile(r"\b(f64|f32|bf16|f16|s32|u32|s8|u8|pred)\[([\d,]*)\]")
_HLO_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1,
              "pred": 1}


def all_to_all_bytes(*, num_tokens: int, d_model: int, num_experts: int,
                     num_expert_shards: int, num_token_shards: int, k: int,
                     capacity_factor: float, dropless: bool, itemsize: int = 4) -> dict:
    """Bytes moved by the two `all_to_all`s of one forward pass, summed over devices.

    Returns:
      `{"buffer": all buffers sent (2·devices·X·C·d·itemsize), "cross_device": the (X−1)/X share
      that leaves its device, "formula": 2·N·K·cf·d·itemsize, "capacity": C}`; the expert-id
      buffers (int32, sent one way: `1/(2d)` of the rows) are left out.
    """
    n = num_tokens // num_token_shards
    c = expert_parallel.capacity(n_local=n, num_experts=num_experts,
                                 num_expert_shards=num_expert_shards, k=k,
                                 capacity_factor=capacity_factor, dropless=dropless)
    buffer = 2 * num_token_shards * num_expert_shards * c * d_model * itemsize
    return {"buffer": buffer,
            "cross_device": buffer * (num_expert_shards - 1) // num_expert_shards,
            "formula": 2 * num_tokens * k * capacity_factor * d_model * itemsize,
            "capacity": c}


def hlo_all_to_all_bytes(hlo_text: str) -> int:
    """Per-device bytes of every all-to-all result in an (SPMD-partitioned) HLO module.

    Counts the token rows and the int32 expert ids (sent one way: `1/(2d)` of the rows) alike.
    """
    total = 0
    for line in hlo_text.splitlines():
        if " all-to-all(" not in line or "=" not in line:
            continue
        result = line.split(" all-to-all(")[0].split("=", 1)[1]
        for dtype, dims in _HLO_SHAPE.findall(result):
            size = math.prod(int(v) for v in dims.split(",") if v)
            total += size * _HLO_BYTES[dtype]
    return total


def _cfg(mesh_shape=None):
    cfg = moe_layer.MoEConfig(
        d_model=FLAGS.d_model, d_ff=FLAGS.d_ff, num_experts=FLAGS.num_experts,
        router=FLAGS.router, top_k=FLAGS.top_k, dispatcher=FLAGS.dispatcher,
        capacity_factor=FLAGS.capacity_factor)
    if mesh_shape is None:
        return cfg
    return dataclasses.replace(
        cfg, parallel=parallel.ExpertParallel(mesh=parallel.make_mesh(*mesh_shape)))


def _grad_fn(cfg):
    def loss(params, state, x, ct):
        y, _, aux = moe_layer.moe_apply(params, state, x, cfg=cfg, train=True)
        return jnp.sum(y * ct) + aux["aux_loss"]

    return jax.jit(jax.grad(loss, argnums=(0, 2)))


def _fwd_fn(cfg):
    return jax.jit(lambda p, s, x: moe_layer.moe_apply(p, s, x, cfg=cfg, train=True)[0])


def _time_round_robin(cases: dict, reps: int) -> dict:
    for fn, args in cases.values():
        jax.block_until_ready(fn(*args))
    wall = {name: [] for name in cases}
    for _ in range(reps):
        for name, (fn, args) in cases.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            wall[name].append(time.perf_counter() - t0)
    return {name: {"wall": float(np.median(v)), "wall_min": float(np.min(v))}
            for name, v in wall.items()}


def main(argv):
    del argv
    os.makedirs(FLAGS.workdir, exist_ok=True)
    n, d = FLAGS.tokens, FLAGS.d_model
    k_x, k_ct, k_p = jax.random.split(jax.random.key(FLAGS.seed), 3)
    x = jax.random.normal(k_x, (n, d), jnp.float32)
    ct = jax.random.normal(k_ct, (n, d), jnp.float32)
    cfg = _cfg()
    params, state = moe_layer.init(k_p, cfg)
    dev0 = jax.devices()[0]
    args0 = jax.device_put((params, state, x, ct), dev0)
    cases = {"single": (_grad_fn(cfg).lower(*args0).compile(), args0)}
    comm = {}
    for spec in FLAGS.meshes:
        shape = tuple(int(v) for v in spec.split("x"))
        c = _cfg(shape)
        mesh = c.parallel.mesh
        args = (parallel.shard_params(params, mesh), parallel.replicate(state, mesh),
                parallel.shard_batch(x, mesh), parallel.shard_batch(ct, mesh))
        compiled = _grad_fn(c).lower(*args).compile()
        fwd = _fwd_fn(c).lower(*args[:3]).compile()
        cases[f"mesh_{spec}"] = (compiled, args)
        devices = shape[0] * shape[1]
        analytic = all_to_all_bytes(
            num_tokens=n, d_model=d, num_experts=FLAGS.num_experts, num_expert_shards=shape[1],
            num_token_shards=devices, k=FLAGS.top_k, capacity_factor=FLAGS.capacity_factor,
            dropless=FLAGS.dispatcher == "dropless")
        comm[spec] = {
            "hlo_forward_bytes": hlo_all_to_all_bytes(fwd.as_text()) * devices,
            "hlo_step_bytes": hlo_all_to_all_bytes(compiled.as_text()) * devices,
            "analytic_forward_bytes": analytic["buffer"],
            "analytic_cross_device_bytes": analytic["cross_device"],
            "formula_2NkcfdB": analytic["formula"],
            "capacity_rows": analytic["capacity"],
        }
    times = _time_round_robin(cases, FLAGS.reps)
    ratios = {f"{name}_over_single_time": t["wall"] / times["single"]["wall"]
              for name, t in times.items() if name != "single"}
    if "mesh_8x1" in times:
        ratios.update({f"{name}_over_replicated_time": t["wall"] / times["mesh_8x1"]["wall"]
                       for name, t in times.items() if name.startswith("mesh_")})
    for spec, c in comm.items():
        if c["formula_2NkcfdB"]:
            ratios[f"mesh_{spec}_hlo_forward_over_formula_bytes"] = (
                c["hlo_forward_bytes"] / c["formula_2NkcfdB"])
    result = {
        "flags": {name: FLAGS[name].value for name in (
            "tokens", "d_model", "d_ff", "num_experts", "top_k", "router", "dispatcher",
            "capacity_factor", "meshes", "reps", "seed")},
        "note": "8 simulated XLA:CPU devices sharing this machine's cores: no real speed-up",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "jax": jax.__version__, "devices": len(jax.devices())},
        "seconds": times, "all_to_all": comm, "ratios": ratios,
    }
    path = os.path.join(FLAGS.workdir, "bench_ep.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    for name, t in times.items():
        print(f"{name:>12}: {t['wall'] * 1e3:8.1f} ms (min {t['wall_min'] * 1e3:.1f})")
    for spec, c in comm.items():
        print(f"all_to_all {spec}: forward {c['hlo_forward_bytes'] / 2**20:.2f} MiB (HLO), "
              f"{c['analytic_forward_bytes'] / 2**20:.2f} MiB (analytic; "
              f"{c['analytic_cross_device_bytes'] / 2**20:.2f} MiB cross-device), formula "
              f"{c['formula_2NkcfdB'] / 2**20:.2f} MiB; fwd+bwd {c['hlo_step_bytes'] / 2**20:.2f}"
              f" MiB")
    for name, value in ratios.items():
        print(f"{name}: {value:.3f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
