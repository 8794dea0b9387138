r"""The LM training step per device mesh on one host: memory per device, step time, all_to_all.

For each mesh of --meshes (`"data:D,fsdp:F,expert:X"`, the sizes multiplying to the device
count) this builds the library's own jitted train step (`moejax.train.loop.compiled_steps`: the
LM's MoE layers run expert-parallel when X > 1), a fresh state on the mesh (`loop.init_state`)
and a random byte batch (`steps.device_batch`), and reports:

  * **bytes per device** of params + optimizer state (`sharding.bytes_per_device`), beside
    their replicated size and the ratio (ideal 1/F for the FSDP-sharded leaves; vectors and
    matrices under `sharding.FSDP_MIN_SIZE` elements stay replicated, `replicated_leaf_bytes`);
  * **step time**: the median wall time of --steps calls of the compiled train step after
    --warmup calls (each ended by `jax.block_until_ready`), and tokens/s = B·T / median;
  * **all_to_all bytes** of the compiled train step, per device: the result shapes of every
    all-to-all in `steps.train.lower(...).compile().as_text()` (`bench_ep.hlo_all_to_all_bytes`),
    against the formula below.

The formula (`lm_all_to_all_bytes`), per device, read off `expert_parallel.ep_experts`: with
n = B·T/(D·F·X) tokens per device, K = min(the router's max_assignments, E) and
C = `expert_parallel.capacity(n, E, X, K, cf, dropless)` rows per destination buffer, each MoE
layer's forward sends the tokens' rows `[X, C, d]`, their int32 local-expert ids `[X, C]` and
the results back `[X, C, d]`; the backward sends the cotangents of both row exchanges
(`all_to_all` transposes to itself) and none for the integer ids. So per device per step

    bytes = L_moe · (4·X·C·d·s + 4·X·C)      s = itemsize of the compute dtype,

i.e. forward `2·X·C·d·s` and backward the same again, plus the ids (`1/(4d)` of the rows), and 0
when X = 1 (no expert parallelism: `lm.place` leaves the config alone). With the dropless
dispatcher C = n·min(K, E/X), so the buffers hold X·C = n·min(K·X, E) rows for n·K real
assignments: padding grows with X up to E/K (the capacity dispatcher sends ≈ cf·n·K rows;
`ragged_all_to_all` would send only the real ones). The HLO is per device
(SPMD-partitioned); every device sends the same. On XLA:CPU the compiled all-to-alls of a
bfloat16 model are float32 (the CPU backend converts bf16 collectives to f32), so there the HLO
holds twice the formula's rows; the defaults are float32 and the two agree exactly.

All devices here are simulated XLA:CPU devices of one process sharing the machine's cores
(this script sets `--xla_force_host_platform_device_count=8` unless XLA_FLAGS already sets a
count): step times measure the overheads of each layout (collectives, resharding, smaller
per-device matmuls), not a speed-up; the bytes columns are the point.

Default model: the `tiny` preset widened to d_model 64, d_ff 128, 8 experts (top-2, dropless),
2 layers (Q-Delta mixer), B=16 × T=64 bytes per step: one step takes ≈ 0.1–0.3 s on a 2-core VM
(compiling ≈ 15–35 s per mesh; the six default meshes ≈ 4 minutes in all). Writes --out (JSON:
settings, machine, one row per mesh) and prints a table (--markdown: also as markdown rows).

  python -m experiments.bench_scale --out=runs/bench/bench_scale.json --markdown
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # before jax is imported; a caller that imports us sets its own
    for _flag in ("--xla_force_host_platform_device_count=8",):
        if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Mapping, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments import bench_ep  # noqa: E402
from moejax.models import lm  # noqa: E402
from moejax.parallel import expert_parallel  # noqa: E402
from moejax.parallel import mesh as mesh_lib  # noqa: E402
from moejax.parallel import sharding as sharding_lib  # noqa: E402
from moejax.train import loop  # noqa: E402
from moejax.train import steps as steps_lib  # noqa: E402

FLAGS = flags.FLAGS

DEFAULT_MESHES = ("data:8", "fsdp:8", "data:2,fsdp:4", "data:2,expert:4",
                  "data:2,fsdp:2,expert:2", "expert:8")
DEFAULT_MODEL = dict(preset="tiny", d_model=64, d_ff=128, num_layers=2, num_experts=8, top_k=2)


def define_flags() -> None:
    """Defines the script's flags (only when run as a script, so that importing this module
    never clashes with other experiments' flags)."""
    flags.DEFINE_multi_string(
        "meshes", list(DEFAULT_MESHES),
        "Meshes 'data:D,fsdp:F,expert:X' to time (repeat the flag, or separate with ';').")
    flags.DEFINE_string("out", "bench_scale.json", "Path of the JSON written.")
    flags.DEFINE_string("preset", DEFAULT_MODEL["preset"], "LM preset (moejax.models.lm).")
    flags.DEFINE_integer("d_model", DEFAULT_MODEL["d_model"], "Override: d_model (0: preset's).")
    flags.DEFINE_integer("d_ff", DEFAULT_MODEL["d_ff"], "Override: d_ff (0: preset's).")
    flags.DEFINE_integer("num_layers", DEFAULT_MODEL["num_layers"],
                         "Override: num_layers (0: preset's).")
    flags.DEFINE_integer("num_experts", DEFAULT_MODEL["num_experts"],
                         "Override: routed experts (0: preset's).")
    flags.DEFINE_integer("top_k", DEFAULT_MODEL["top_k"], "Override: top_k (0: preset's).")
    flags.DEFINE_string("mixer", None, "Override: token mixer (default: the preset's).")
    flags.DEFINE_string("dispatcher", None, "Override: dropless or capacity (default: preset's).")
    flags.DEFINE_float("capacity_factor", None, "Override: capacity factor (default: preset's).")
    flags.DEFINE_string("dtype", None, "Override: compute dtype (default: the preset's).")
    flags.DEFINE_integer("batch_size", 16, "B, sequences per step (divisible by every D·F).")
    flags.DEFINE_integer("seq_len", 64, "T, tokens per sequence.")
    flags.DEFINE_integer("steps", 10, "Timed train steps per mesh (median reported).")
    flags.DEFINE_integer("warmup", 2, "Untimed train steps per mesh after compiling.")
    flags.DEFINE_integer("seed", 0, "Seed of the init and the batch.")
    flags.DEFINE_bool("markdown", False, "Also print the table as markdown rows.")


def parse_meshes(values: Sequence[str]) -> list[str]:
    """Mesh specs from flag values (each may hold several, separated by ';'), canonical form."""
    specs = [part.strip() for value in values for part in value.split(";") if part.strip()]
    return [mesh_lib.format_mesh_spec(mesh_lib.parse_mesh_spec(s, name="--meshes"))
            for s in specs]


def model_config(preset: str, *, moe: Mapping[str, Any] | None = None,
                 **overrides: Any) -> lm.LMConfig:
    """`lm.get_preset(preset, ...)` with the overrides that are not None (MoE ones in `moe`)."""
    fields = {k: v for k, v in overrides.items() if v is not None}
    moe = {k: v for k, v in (moe or {}).items() if v is not None}
    if moe:
        fields["moe"] = moe
    return lm.get_preset(preset, **fields)


def lm_all_to_all_bytes(cfg: lm.LMConfig, mesh_shape: Mapping[str, int], *, batch_size: int,
                        seq_len: int) -> dict[str, int]:
    """The all_to_all bytes of one LM train step, per device (the module docstring's formula).

    Args:
      cfg: the LM config (unplaced; only its widths, MoE options and layer kinds are read).
      mesh_shape: `{"data": D, "fsdp": F, "expert": X}` (missing axes are 1).
      batch_size, seq_len: B and T of the global batch.

    Returns:
      `{"forward_rows": L·2·X·C·d·s, "backward_rows": the same, "ids": L·X·C·4, "total",
      "capacity": C, "tokens_per_device": n, "moe_layers": L}`; all 0 when X = 1.
    """
    sizes = {axis: int(mesh_shape.get(axis, 1)) for axis in mesh_lib.AXES}
    x = sizes[mesh_lib.EXPERT]
    shards = sizes[mesh_lib.DATA] * sizes[mesh_lib.FSDP] * x
    n = batch_size * seq_len // shards
    layers = sum(kind == "moe" for kind in cfg.ffns)
    if x == 1 or cfg.moe is None or not layers:
        return {"forward_rows": 0, "backward_rows": 0, "ids": 0, "total": 0, "capacity": 0,
                "tokens_per_device": n, "moe_layers": layers}
    moe = cfg.moe
    k = min(moe.max_assignments, moe.num_experts)
    c = expert_parallel.capacity(n_local=n, num_experts=moe.num_experts, num_expert_shards=x,
                                 k=k, capacity_factor=moe.capacity_factor,
                                 dropless=moe.dispatcher == "dropless")
    s = np.dtype(cfg.compute_dtype).itemsize
    rows = layers * 2 * x * c * cfg.d_model * s
    ids = layers * x * c * 4
    return {"forward_rows": rows, "backward_rows": rows, "ids": ids,
            "total": 2 * rows + ids, "capacity": c, "tokens_per_device": n,
            "moe_layers": layers}


def skip_reason(cfg: lm.LMConfig, spec: str, *, batch_size: int, seq_len: int,
                num_devices: int) -> str | None:
    """Why the mesh `spec` cannot run this model and batch here, or None."""
    sizes = dict(mesh_lib.parse_mesh_spec(spec))
    d, f, x = (sizes[a] for a in mesh_lib.AXES)
    if d * f * x != num_devices:
        return f"needs {d * f * x} devices, there are {num_devices}"
    if cfg.moe is not None and "moe" in cfg.ffns and cfg.moe.num_experts % x:
        return f"expert:{x} does not divide num_experts={cfg.moe.num_experts}"
    if batch_size % (d * f):
        return f"batch_size={batch_size} is not divisible by data×fsdp = {d * f}"
    if x > 1 and (batch_size * seq_len) % (d * f * x):
        return f"B·T={batch_size * seq_len} tokens do not split over {d * f * x} devices"
    return None


def _leaf_bytes(held: Any) -> tuple[int, int, list[tuple[str, int]]]:
    """(replicated size of `held`, bytes of its fully replicated leaves, those leaves' names and
    sizes, largest first)."""
    total = replicated = 0
    names: list[tuple[str, int]] = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(held)[0]:
        nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        total += nbytes
        if leaf.sharding.is_fully_replicated:
            replicated += nbytes
            names.append((jax.tree_util.keystr(path), nbytes))
    return total, replicated, sorted(names, key=lambda p: -p[1])


def measure(cfg: lm.LMConfig, spec: str, *, batch_size: int, seq_len: int, steps: int,
            warmup: int, seed: int) -> dict[str, Any]:
    """One mesh's row (see the module docstring)."""
    mesh = mesh_lib.mesh_from_spec(spec, name="--meshes")
    train_cfg = loop.TrainConfig(steps=max(1, warmup + steps), batch_size=batch_size,
                                 seq_len=seq_len, seed=seed)
    compiled_steps = loop.compiled_steps(lm, cfg, train_cfg, mesh)
    state = loop.init_state(lm, cfg, train_cfg, jax.random.key(seed), mesh=mesh)
    held = {"params": state.params, "opt_state": state.opt_state}
    per_device = sharding_lib.bytes_per_device(held)
    total, replicated_leaves, replicated_names = _leaf_bytes(held)

    toks = np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch_size, seq_len + 1),
                                                dtype=np.int32)
    batch = steps_lib.device_batch({"inputs": toks[:, :-1], "targets": toks[:, 1:]},
                                   compiled_steps.batch)
    key = jax.device_put(jax.random.key(seed + 1), compiled_steps.replicated)
    t0 = time.perf_counter()
    train = compiled_steps.train.lower(state, batch, key).compile()
    compile_s = time.perf_counter() - t0
    hlo_bytes = bench_ep.hlo_all_to_all_bytes(train.as_text())

    times = []
    for i in range(warmup + steps):
        rng = jax.device_put(jax.random.fold_in(key, i), compiled_steps.replicated)
        t0 = time.perf_counter()
        state, metrics = train(state, batch, rng)  # donates the old state
        jax.block_until_ready((state, metrics))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step_s = float(np.median(times)) if times else float("nan")
    loss = float(metrics["loss"])

    formula = lm_all_to_all_bytes(cfg, dict(mesh.shape), batch_size=batch_size, seq_len=seq_len)
    x = mesh_lib.axis_size(mesh, mesh_lib.EXPERT)
    return {
        "mesh": spec, "devices": int(mesh.devices.size),
        "params_opt_bytes_per_device": per_device, "params_opt_bytes_replicated": total,
        "bytes_ratio": per_device / total,
        "replicated_leaf_bytes": replicated_leaves,
        "replicated_leaves_largest": replicated_names[:5],
        "step_seconds": step_s, "step_seconds_min": float(np.min(times)) if times else None,
        "tokens_per_s": batch_size * seq_len / step_s, "compile_seconds": compile_s,
        "final_loss": loss,
        "all_to_all_hlo_bytes_per_device": hlo_bytes,
        "all_to_all_formula_bytes_per_device": formula["total"],
        "all_to_all_hlo_over_formula": (hlo_bytes / formula["total"] if formula["total"]
                                        else None),
        "all_to_all_cross_device_bytes_per_device": hlo_bytes * (x - 1) // x,
        "all_to_all_formula": formula,
    }


def _mib(v: float) -> str:
    return f"{v / 2**20:.2f}"


def _kib(v: float) -> str:
    return f"{v / 2**10:.1f}"


def table(rows: Sequence[dict[str, Any]], *, markdown: bool = False) -> str:
    """The rows as an aligned text table, or as markdown rows with a header."""
    head = ("mesh", "params+opt MiB/dev", "replicated MiB", "ratio", "step ms", "tokens/s",
            "a2a KiB/dev (HLO)", "a2a KiB/dev (formula)", "HLO/formula")
    body = []
    for r in rows:
        if "skipped" in r:
            body.append((r["mesh"], f"skipped: {r['skipped']}", *[""] * (len(head) - 2)))
            continue
        ratio = r["all_to_all_hlo_over_formula"]
        body.append((r["mesh"], _mib(r["params_opt_bytes_per_device"]),
                     _mib(r["params_opt_bytes_replicated"]), f"{r['bytes_ratio']:.3f}",
                     f"{r['step_seconds'] * 1e3:.0f}", f"{r['tokens_per_s']:,.0f}",
                     _kib(r["all_to_all_hlo_bytes_per_device"]),
                     _kib(r["all_to_all_formula_bytes_per_device"]),
                     "—" if ratio is None else f"{ratio:.3f}"))
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(str(row[i])) for row in (head, *body)) for i in range(len(head))]
    return "\n".join("  ".join(str(c).rjust(w) for c, w in zip(row, widths, strict=True))
                     for row in (head, *body))


def run(cfg: lm.LMConfig, meshes: Sequence[str], *, batch_size: int, seq_len: int,
        steps: int, warmup: int, seed: int = 0, out: str | None = None,
        markdown: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measures every mesh of `meshes` (skipping, with a note, those the model or the batch
    cannot use), writes the report to `out` (if given) and prints the table; returns the
    report `{"settings", "model", "machine", "formula", "rows"}`."""
    rows = []
    meshes = parse_meshes(meshes)
    for i, spec in enumerate(meshes):
        reason = skip_reason(cfg, spec, batch_size=batch_size, seq_len=seq_len,
                             num_devices=len(jax.devices()))
        if reason is not None:
            log(f"[{i + 1}/{len(meshes)}] {spec}: skipped ({reason})")
            rows.append({"mesh": spec, "skipped": reason})
            continue
        log(f"[{i + 1}/{len(meshes)}] {spec}: compiling and timing {warmup} + {steps} steps")
        row = measure(cfg, spec, batch_size=batch_size, seq_len=seq_len, steps=steps,
                      warmup=warmup, seed=seed)
        log(f"    {row['step_seconds'] * 1e3:.0f} ms/step, "
            f"{_mib(row['params_opt_bytes_per_device'])} MiB/device, all_to_all "
            f"{row['all_to_all_hlo_bytes_per_device']} B/device (formula "
            f"{row['all_to_all_formula_bytes_per_device']}), compile "
            f"{row['compile_seconds']:.1f} s")
        rows.append(row)
    report = {
        "settings": {"meshes": meshes, "batch_size": batch_size,
                     "seq_len": seq_len, "steps": steps, "warmup": warmup, "seed": seed},
        "model": cfg.to_dict(),
        "machine": {"backend": jax.default_backend(), "devices": len(jax.devices()),
                    "device": str(jax.devices()[0]), "platform": platform.platform(),
                    "cores": os.cpu_count(), "jax": jax.__version__,
                    "loadavg": os.getloadavg(),
                    "xla_flags": os.environ.get("XLA_FLAGS", "")},
        "note": ("simulated XLA:CPU devices share this machine's cores: step times show "
                 "overheads, not speed-ups"),
        "formula": ("all_to_all bytes per device per step = L_moe·(4·X·C·d·s + 4·X·C), "
                    "C = expert_parallel.capacity(n=B·T/(D·F·X), E, X, K, cf, dropless); "
                    "0 when X = 1"),
        "rows": rows,
    }
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(report, f, indent=2)
    log("")
    log(table(rows))
    if markdown:
        log("")
        log(table(rows, markdown=True))
    if out:
        log(f"wrote {out}")
    return report


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        cfg = model_config(
            FLAGS.preset, d_model=FLAGS.d_model or None, d_ff=FLAGS.d_ff or None,
            num_layers=FLAGS.num_layers or None, mixer=FLAGS.mixer, dtype=FLAGS.dtype,
            moe=dict(num_experts=FLAGS.num_experts or None, top_k=FLAGS.top_k or None,
                     dispatcher=FLAGS.dispatcher, capacity_factor=FLAGS.capacity_factor))
        meshes = parse_meshes(FLAGS.meshes)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    run(cfg, meshes, batch_size=FLAGS.batch_size, seq_len=FLAGS.seq_len, steps=FLAGS.steps,
        warmup=FLAGS.warmup, seed=FLAGS.seed, out=FLAGS.out, markdown=FLAGS.markdown)


if __name__ == "__main__":
    define_flags()
    app.run(main)
