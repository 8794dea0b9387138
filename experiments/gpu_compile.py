r"""Deviceless sm_90a (H100/H200) compile of every Pallas GPU kernel: the per-kernel table.

Compiles each case of `moejax.kernels.gpu_compile.cases` along both routes (Triton → PTX →
ptxas, and XLA's deviceless compile for a compile-only H200) and reports per kernel: shared
memory, registers, spills, tensor-core instructions, an occupancy estimate, and what fails the
bar (compiles; smem ≤ 232,448 B; zero spills; mma/wgmma when it multiplies matrices). No GPU is
needed; it runs in the `gpu-compile` venv (`make gpu-compile` builds it and runs this with
--full).

Writes `WORKDIR/gpu_compile.json` (one row per case × route × kernel, and each case's
roofline estimate: model FLOPs and minimum bytes against the H200's peaks — an estimate, not a
measurement) and `WORKDIR/gpu_compile.md` (the tables BENCHMARKS.md carries). Exit status 1
when any kernel fails to compile or exceeds shared memory (spills and FMA dots are reported,
not fatal: they are slow, not broken).

  .venv-gpu-compile/bin/python -m experiments.gpu_compile --workdir=runs/gpu_compile --full
  .venv-gpu-compile/bin/python -m experiments.gpu_compile --only=gmm --full
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402
from tqdm import tqdm  # noqa: E402

from moejax.kernels import gpu_compile as gc  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/gpu_compile", "Output folder for the JSON and the table.")
flags.DEFINE_bool("full", False, "The whole matrix (else the CI subset: forward, one shape).")
flags.DEFINE_list("only", [], "Keep cases whose id contains one of these substrings.")
flags.DEFINE_list("skip", [], "Drop cases whose id contains one of these substrings.")


def _table(rows: list[dict]) -> str:
    head = ("| case | route | kernel | smem B | regs | spills st/ld B | tensor cores | "
            "occupancy | problems |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        tc = ", ".join(f"{k.replace('.sync.aligned', '')} ×{v}"
                       for k, v in r["tensor_core_ops"].items()) or "no"
        occ = "" if r["occupancy"] is None else f"{r['occupancy']:.2f}"
        spills = ("" if r["spill_stores"] is None
                  else f"{r['spill_stores']}/{r['spill_loads']}")
        lines.append(f"| {r['case']} | {r['route']} | {r['name']} | {r['smem']} | {r['regs']} | "
                     f"{spills} | {tc} | {occ} | {'; '.join(r['problems']) or 'ok'} |")
    return "\n".join(lines) + "\n"


def _roofline_table(cases) -> str:
    lines = ["| case | GFLOP | MB (min) | FLOP/B | bound | lower bound µs (H200 estimate) |",
             "|---|---|---|---|---|---|"]
    for c in cases:
        r = c.roofline()
        lines.append(f"| {c.id} | {r['gflop']:.2f} | {r['mbytes']:.1f} | "
                     f"{r['intensity_flop_per_byte']:.0f} | {r['bound']} | "
                     f"{r['t_lower_bound_us']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    if not gc.available():
        sys.exit(str(gc.GpuCompileUnavailable("run `make gpu-compile` to build the venv")))
    workdir = Path(FLAGS.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    selected = [c for c in gc.cases(full=FLAGS.full)
                if (not FLAGS.only or any(s in c.id for s in FLAGS.only))
                and not any(s in c.id for s in FLAGS.skip)]
    rows, cache, fatal = [], {}, 0
    for case in tqdm(selected, desc="gpu compile", unit="case"):
        t0 = time.perf_counter()
        for rep in gc.compile_case(case, cache=cache):
            row = {"case": case.id, **rep.row(), "seconds": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            fatal += (not rep.compiled) or (rep.smem or 0) > gc.SMEM_OPTIN_LIMIT
        (workdir / "gpu_compile.json").write_text(json.dumps(rows, indent=1))
    (workdir / "gpu_compile.md").write_text(_table(rows) + "\n" + _roofline_table(selected))
    (workdir / "roofline.json").write_text(json.dumps({c.id: c.roofline() for c in selected},
                                                      indent=1))
    print(_table(rows))
    print(f"{len(rows)} kernel compiles, {fatal} failing to compile or fit; "
          f"results in {workdir}/gpu_compile.json")
    sys.exit(1 if fatal else 0)


if __name__ == "__main__":
    app.run(main)
