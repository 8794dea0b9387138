"""Deviceless compile of the Pallas GPU (Triton) kernels for Hopper (sm_90a), no GPU needed.

What interpret mode and export-lowering cannot see — a Triton verifier error, shared memory over
the 232,448-byte opt-in limit, register spills, dots that run as FMA loops instead of tensor-core
`mma`/`wgmma` — is visible here, on a CPU-only machine, along the two routes a real GPU takes:

  route "triton"  `jax.export(..., platforms=["cuda"])`, the TTIR of every Triton custom call
                  compiled by the CUDA plugin's own Triton (`jax._src.lib.triton.compile`, what
                  jaxlib releases after 0.10.2 run at lowering time) → PTX + shared memory, then
                  `ptxas -v -arch=sm_90a` → registers, spills.
  route "xla"     a full XLA compile against a compile-only H200 (`H200_TARGET_CONFIG`), what
                  jaxlib 0.10.2 does on a GPU: XLA's Triton pipeline, its own ptxas call; launch
                  grid, threads and shared memory from its thunk dump, registers and spills from
                  `ptxas -v` on the PTX it dumped.

Needs the `gpu-compile` extra (`jax-cuda12-plugin` / `jax-cuda12-pjrt` at exactly the installed
jaxlib version, and `nvidia-cuda-nvcc-cu12` for ptxas): `make gpu-compile`. `available()` says
whether this interpreter has them; the rest raises `GpuCompileUnavailable` when it does not.

Each kernel gives a `KernelReport`; `KernelReport.problems()` lists what fails the bar the
project holds every GPU kernel to (compiles; smem ≤ limit; zero spills; tensor-core
instructions when the kernel multiplies matrices). Uses jax internals (`jax._src`), checked on
jax 0.10.2; a jax without them makes `available()` false.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib.util
import math
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

# H200 SXM: dense bf16 and tf32 tensor-core peaks (TFLOP/s) and HBM3e bandwidth (TB/s).
PEAK_TFLOPS = {"bfloat16": 989.4, "float32": 494.7}
HBM_TBPS = 4.8
SMEM_OPTIN_LIMIT = 232_448  # H100/H200: max dynamic shared memory per block (opt-in), bytes.
SMEM_PER_SM = 233_472
REGS_PER_SM = 65_536
THREADS_PER_SM = 2_048
BLOCKS_PER_SM = 32
ARCH = "9.0"

# XLA's device description of an H200 (public figures of the card), for the compile-only
# topology of route "xla".
H200_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 4800000000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 151397597184
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 feature_extension: ACCELERATED_FEATURES }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  thread_dim_limit_x: 1024
  thread_dim_limit_y: 1024
  thread_dim_limit_z: 64
  device_vendor: "NVIDIA Corporation"
  platform_version: "Compute Capability 9.0a"
  name: "NVIDIA H200 141GB HBM3e"
}
platform_name: "CUDA"
device_description_str: "NVIDIA H200 141GB HBM3e"
"""

_TC_RE = re.compile(r"\b(wgmma\.mma_async[\w.]*|mma\.sync[\w.]*)")


class GpuCompileUnavailable(RuntimeError):
    """This interpreter lacks the CUDA plugin or ptxas (install the `gpu-compile` extra)."""


def _nvcc_dir() -> str | None:
    for p in sys.path:
        d = os.path.join(p, "nvidia", "cuda_nvcc")
        if os.path.isfile(os.path.join(d, "bin", "ptxas")):
            return d
    return None


def available() -> bool:
    """True when the CUDA plugin (with its Triton compiler) and ptxas are importable here."""
    try:
        plugin = importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ImportError:  # no `jax_plugins` namespace at all: no jax plugin is installed
        plugin = False
    return plugin and bool(_nvcc_dir())


def _require() -> str:
    if not available():
        raise GpuCompileUnavailable(
            "the deviceless GPU compile needs the 'gpu-compile' extra (jax-cuda12-plugin and "
            "jax-cuda12-pjrt at the installed jaxlib version, nvidia-cuda-nvcc-cu12): run "
            "`make gpu-compile`, or use .venv-gpu-compile/bin/python")
    return _nvcc_dir()  # type: ignore[return-value]


@dataclasses.dataclass
class KernelReport:
    """One compiled kernel.

    Attributes:
      name: the kernel's name (the `pallas_call`'s `name`).
      route: "triton" or "xla" (see the module docstring).
      compiled: whether it compiled to a cubin.
      error: the compiler's message when it did not.
      smem: shared memory per block, bytes (route "triton": Triton's figure; "xla": the launch's).
      regs: registers per thread (ptxas).
      spill_stores, spill_loads: bytes of register spills (ptxas).
      stack: stack frame bytes (ptxas).
      tensor_core_ops: `mma`/`wgmma` instructions in the PTX, by kind.
      threads: threads per block (num_warps · 32).
      num_warps, num_stages: launch options (route "triton").
      grid: launch grid.
      matmul: whether the kernel multiplies matrices (a `tt.dot`), so must use tensor cores.
    """

    name: str
    route: str
    compiled: bool = False
    error: str | None = None
    smem: int | None = None
    regs: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack: int | None = None
    tensor_core_ops: dict[str, int] = dataclasses.field(default_factory=dict)
    threads: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    grid: tuple[int, ...] | None = None
    matmul: bool = True

    @property
    def uses_tensor_cores(self) -> bool:
        return sum(self.tensor_core_ops.values()) > 0

    def occupancy(self) -> float | None:
        """Estimated resident warps per SM over the maximum (64), from regs, smem and threads."""
        if not (self.compiled and self.regs and self.threads):
            return None
        warps = self.threads // 32
        regs_per_warp = math.ceil(self.regs * 32 / 256) * 256  # allocation unit: 256 registers
        by_regs = REGS_PER_SM // (regs_per_warp * warps)
        by_smem = SMEM_PER_SM // max(self.smem or 0, 1) if self.smem else BLOCKS_PER_SM
        by_threads = THREADS_PER_SM // self.threads
        blocks = min(by_regs, by_smem, by_threads, BLOCKS_PER_SM)
        return blocks * warps / (THREADS_PER_SM // 32)

    def problems(self) -> list[str]:
        """What fails the bar (empty when the kernel passes)."""
        if not self.compiled:
            return [f"does not compile: {(self.error or '')[:600]}"]
        out = []
        if self.smem is not None and self.smem > SMEM_OPTIN_LIMIT:
            out.append(f"shared memory {self.smem} B > {SMEM_OPTIN_LIMIT} B")
        if self.spill_stores or self.spill_loads:
            out.append(f"register spills: {self.spill_stores} B stored, {self.spill_loads} B "
                       "loaded")
        if self.matmul and not self.uses_tensor_cores:
            out.append("no tensor-core instruction (mma/wgmma): its dots run as FMA loops")
        return out

    def row(self) -> dict[str, Any]:
        """A JSON-able summary."""
        out = dataclasses.asdict(self)
        out["uses_tensor_cores"] = self.uses_tensor_cores
        occ = self.occupancy()
        out["occupancy"] = None if occ is None else round(occ, 3)
        out["problems"] = self.problems()
        return out


# ------------------------------------------------------------------------------ ptxas / PTX


def tensor_core_ops(ptx: str) -> dict[str, int]:
    """Counts of tensor-core instructions (`wgmma.mma_async…`, `mma.sync…`) in PTX text."""
    out: dict[str, int] = {}
    for m in _TC_RE.finditer(ptx):
        out[m[1]] = out.get(m[1], 0) + 1
    return out


def split_entries(ptx: str) -> dict[str, str]:
    """PTX text of each `.entry` (kernel) of a module, by name."""
    starts = [(m.start(), m[1]) for m in re.finditer(r"\.entry\s+(\w+)\s*\(", ptx)]
    return {name: ptx[s:(starts[i + 1][0] if i + 1 < len(starts) else len(ptx))]
            for i, (s, name) in enumerate(starts)}


def parse_ptxas(text: str) -> dict[str, dict[str, int]]:
    """Per-entry figures from `ptxas -v` output: regs, spill_stores, spill_loads, stack."""
    out = {}
    for block in re.split(r"(?=ptxas info\s+: Compiling entry function)", text):
        m = re.search(r"Compiling entry function '([^']+)'", block)
        if not m:
            continue
        d = {}
        if mm := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes "
                           r"spill loads", block):
            d.update(stack=int(mm[1]), spill_stores=int(mm[2]), spill_loads=int(mm[3]))
        if mm := re.search(r"Used (\d+) registers", block):
            d["regs"] = int(mm[1])
        out[m[1]] = d
    return out


def ptxas(ptx: str, *, arch: str = "sm_90a") -> dict[str, dict[str, int]]:
    """Runs `ptxas -v` on PTX text; per-entry figures (see `parse_ptxas`).

    Raises:
      RuntimeError: ptxas refused the PTX (its message).
    """
    ptxas_bin = os.path.join(_require(), "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([ptxas_bin, "-v", f"-arch={arch}", "--warn-on-spills", src, "-o",
                            os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"ptxas failed: {(r.stdout + r.stderr)[-1500:]}")
    return parse_ptxas(r.stdout + r.stderr)


# ------------------------------------------------------------------------------ route "triton"


@dataclasses.dataclass(frozen=True)
class TritonCall:
    """A Triton custom call of an exported module."""

    name: str
    ir: bytes
    num_warps: int
    num_stages: int
    grid: tuple[int, ...]


def export_triton_calls(fn: Callable, args: Sequence[Any]) -> list[TritonCall]:
    """The Triton kernels `jax.jit(fn)(*args)` launches on CUDA (no device needed).

    Args:
      fn: the function (forward or gradient).
      args: arrays or `jax.ShapeDtypeStruct`s.
    """
    _require()
    import jax
    from jax._src.interpreters import mlir
    from jax._src.lib.mlir import ir

    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    text = jax.export.export(jax.jit(fn), platforms=["cuda"],
                             disabled_checks=checks)(*args).mlir_module()
    calls: list[TritonCall] = []
    with mlir.make_ir_context():
        module = ir.Module.parse(text)

        def visit(op):
            if (op.name == "stablehlo.custom_call"
                    and "triton" in ir.StringAttr(op.attributes["call_target_name"]).value):
                cfg = ir.DictAttr(op.attributes["mhlo.backend_config"])
                num = lambda key: ir.IntegerAttr(cfg[key]).value  # noqa: E731
                calls.append(TritonCall(
                    name=ir.StringAttr(cfg["name"]).value, ir=ir.StringAttr(cfg["ir"]).value_bytes,
                    num_warps=num("num_warps"), num_stages=num("num_stages"),
                    grid=(num("grid_x"), num("grid_y"), num("grid_z"))))
            return ir.WalkResult.ADVANCE

        module.operation.walk(visit)
    return calls


def _has_dot(ttir: bytes) -> bool:
    """Whether a kernel's TTIR bytecode holds a `tt.dot` (so it must use tensor cores)."""
    from jax._src.interpreters import mlir
    from jax._src.lib import triton
    from jax._src.lib.mlir import ir

    with mlir.make_ir_context() as ctx:
        triton.dialect.register_dialect(ctx)
        return "tt.dot" in str(ir.Module.parse(ttir))


def compile_triton_call(call: TritonCall) -> KernelReport:
    """Compiles one Triton call for sm_90a (Triton → PTX → ptxas)."""
    _require()
    from jax._src.lib import triton

    rep = KernelReport(name=call.name, route="triton", num_warps=call.num_warps,
                       num_stages=call.num_stages, grid=call.grid, threads=32 * call.num_warps,
                       matmul=_has_dot(call.ir))
    try:
        with _captured_stderr() as err:
            out = triton.compile("cuda", call.ir, ARCH, num_warps=call.num_warps, num_ctas=1,
                                 num_stages=call.num_stages)
    except Exception as ex:  # noqa: BLE001 — the compiler's own error is the report
        rep.error = f"{type(ex).__name__}: {ex} | {err.text()[-1500:]}"
        return rep
    rep.smem = int(out.smem_bytes)
    rep.tensor_core_ops = tensor_core_ops(out.asm)
    try:
        stats = next(iter(ptxas(out.asm).values()), {})
    except RuntimeError as ex:
        rep.error = str(ex)
        return rep
    rep.compiled = True
    for key, value in stats.items():
        setattr(rep, key, value)
    return rep


def compile_triton(fn: Callable, args: Sequence[Any], *,
                   cache: dict[str, KernelReport] | None = None) -> list[KernelReport]:
    """Route "triton": every Triton kernel of `jax.jit(fn)(*args)`, compiled for sm_90a.

    Args:
      fn, args: as for `export_triton_calls`.
      cache: reports by kernel hash (TTIR + launch options), shared across calls so identical
        kernels compile once.
    """
    reports = []
    for call in export_triton_calls(fn, args):
        key = hashlib.sha1(call.ir + bytes([call.num_warps, call.num_stages])).hexdigest()
        if cache is not None and key in cache:
            reports.append(dataclasses.replace(cache[key]))
            continue
        rep = compile_triton_call(call)
        if cache is not None:
            cache[key] = rep
        reports.append(rep)
    return reports


class _Captured:
    def __init__(self, f):
        self._f = f

    def text(self) -> str:
        self._f.seek(0)
        return self._f.read().decode(errors="replace")


class _captured_stderr:
    """Redirects file descriptor 2 (where the C++ compilers print) into a temporary file."""

    def __enter__(self) -> _Captured:
        self._f = tempfile.TemporaryFile()
        self._saved = os.dup(2)
        os.dup2(self._f.fileno(), 2)
        return _Captured(self._f)

    def __exit__(self, *exc) -> None:
        os.dup2(self._saved, 2)
        os.close(self._saved)


# ------------------------------------------------------------------------------ route "xla"


def h200_device():
    """The compile-only H200 device (a `jax.Device` of a compile-only topology)."""
    _require()
    from jax.experimental import topologies

    topo = topologies.get_topology_desc("", platform="cuda", target_config=H200_TARGET_CONFIG,
                                        topology="1x1x1")
    return topo.devices[0]


def _parse_thunks(dump_dir: str) -> dict[str, dict[str, Any]]:
    out = {}
    for path in glob.glob(os.path.join(dump_dir, "*thunk_sequence.txt")):
        with open(path) as f:
            for line in f:
                m = re.search(r"\] (\S+) grid: \[([\d, ]+)\] threads: \[([\d, ]+)\]\s+"
                              r"shared_memory: (\d+) bytes", line)
                if m:
                    threads = math.prod(int(x) for x in m[3].split(","))
                    out[m[1]] = dict(grid=tuple(int(x) for x in m[2].split(",")),
                                     threads=threads, smem=int(m[4]))
    return out


def compile_xla(fn: Callable, args: Sequence[Any], *, kernel_re: str,
                matmul: dict[str, bool] | None = None) -> list[KernelReport]:
    """Route "xla": a deviceless XLA compile of `jax.jit(fn)` for a compile-only H200.

    Args:
      fn: the function.
      args: `jax.ShapeDtypeStruct`s (their sharding is replaced by the H200 device's).
      kernel_re: which of the module's kernels to report (the Pallas ones, by name).
      matmul: kernel name -> whether it multiplies matrices (from route "triton"'s reports);
        a kernel not named counts as multiplying, so it must show tensor cores.

    Returns:
      one report per matching kernel; one failed report named "<module>" if XLA refused it.
    """
    nvcc = _require()
    import jax

    sharding = jax.sharding.SingleDeviceSharding(h200_device())
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) for a in args]
    with tempfile.TemporaryDirectory() as dump:
        try:
            with _captured_stderr() as err:
                jax.jit(fn).trace(*args).lower().compile(compiler_options={
                    "xla_dump_to": dump, "xla_gpu_cuda_data_dir": nvcc})
        except Exception as ex:  # noqa: BLE001 — XLA's own error is the report
            return [KernelReport(name="<module>", route="xla",
                                 error=f"{type(ex).__name__}: {str(ex)[:1500]} | "
                                       f"{err.text()[-800:]}")]
        thunks = _parse_thunks(dump)
        ptx = {}
        for path in glob.glob(os.path.join(dump, "*.ptx")):
            with open(path) as f:
                ptx.update(split_entries(f.read()))
        reports = []
        for name, launch in sorted(thunks.items()):
            if not re.search(kernel_re, name) or name not in ptx:
                continue
            header = ptx[name]
            module_ptx = _module_with_entry(dump, name)
            rep = KernelReport(name=name, route="xla", grid=launch["grid"],
                               threads=launch["threads"], smem=launch["smem"],
                               tensor_core_ops=tensor_core_ops(header),
                               matmul=(matmul or {}).get(name, True))
            try:
                stats = ptxas(module_ptx).get(name, {})
            except RuntimeError as ex:
                rep.error = str(ex)
            else:
                rep.compiled = True
                for key, value in stats.items():
                    setattr(rep, key, value)
            reports.append(rep)
    return reports


def _module_with_entry(dump: str, name: str) -> str:
    for path in glob.glob(os.path.join(dump, "*.ptx")):
        with open(path) as f:
            text = f.read()
        if re.search(rf"\.entry\s+{re.escape(name)}\s*\(", text):
            return text
    raise KeyError(name)


# ------------------------------------------------------------------------------ the cases

DELTA_RULE_MODES = ("deltanet", "gated_deltanet", "qdelta", "gated_qdelta")
# Per-channel decay (gk, Kimi Delta Attention; with λ, the fullest: g is folded into gk, so a
# gated KDA mode runs the same kernels) and packed sequences (the chunk-restart kernels), at the
# largest head dims only.
GK_MODES = ("kda_qdelta",)
PACKED_MODES = ("gated_qdelta:packed", "kda_qdelta:packed")
PACKED_SEQUENCES = 3
# (Dk, Dv) of the presets that target a GPU: 64/128 (small, demo), 128/256 (340m), 256/512.
DELTA_RULE_HEAD_DIMS = ((64, 128), (128, 256), (256, 512))
# What the matrix covers, so what the ops' impl="auto" may send to a GPU kernel.
COVERED_DTYPES = ("bfloat16", "float32")
DELTA_RULE_MAX_HEAD_DIMS = tuple(max(d) for d in zip(*DELTA_RULE_HEAD_DIMS, strict=True))
# gmm: (experts, d_model, d_ff) of the MoE presets that target a GPU.
GMM_SHAPES = tuple((e, 2048, f) for e in (8, 64) for f in (1408, 5632))


@dataclasses.dataclass(frozen=True)
class Case:
    """One function to compile: a Pallas op, forward or gradient, at one shape and dtype."""

    # "delta_rule[<mode>]", "delta_rule[<mode>:authors]" (the released Q-Delta kernel's
    # pairing, `delta_rule(pairing="authors")`), "delta_rule[<mode>:packed]" (packed sequences,
    # `cu_seqlens`: the chunk-restart kernels; B = 1) or "gmm[up]" / "gmm[down]". A mode
    # starting "kda" passes a per-channel decay gk (`GK_MODES`).
    op: str
    grad: bool
    dtype: str  # "bfloat16" or "float32"
    dims: tuple[int, ...]  # delta_rule: (B, T, H, Dk, Dv, C); gmm: (M, K, N, G)
    # float32 dots: "tf32" (jax's default matmul precision) or "tf32x3" (compiled under
    # `jax.default_matmul_precision("highest")`, the delta-rule kernels' float32-accurate mode).
    fp32: str = "tf32"

    @property
    def id(self) -> str:
        prec = ".tf32x3" if self.dtype == "float32" and self.fp32 == "tf32x3" else ""
        return (f"{self.op}.{'grad' if self.grad else 'fwd'}.{self.dtype}{prec}."
                + "x".join(map(str, self.dims)))

    @property
    def matmul_precision(self) -> str:
        """The `jax.default_matmul_precision` the case is traced under."""
        return "highest" if self.fp32 == "tf32x3" else "tensorfloat32"

    def flops_and_bytes(self) -> tuple[float, float]:
        """Model FLOPs and the minimum HBM bytes (inputs read once, outputs written once).

        Delta rule, per chunk of C steps and (B·H): the WY pieces (X Kᵀ, the triangular solve,
        W and U: C²Dk + C³/3 + C²Dk + C²Dv MACs), the state pass (W S and Kᵀ U: 2·C·Dk·Dv) and
        the output (Q S, Q Kᵀ, P U: C·Dk·Dv + C²Dk + C²Dv); the backward counts 2× the forward.
        gmm: 2·M·K·N; its gradient adds dlhs and drhs (3× in all).
        """
        item = 2 if self.dtype == "bfloat16" else 4
        if self.op.startswith("delta_rule"):
            B, T, H, K, V, C = self.dims
            macs_chunk = (2 * C * C * K + C**3 / 3 + C * C * V + 3 * C * K * V
                          + C * C * K + C * C * V)
            flops = 2.0 * B * H * (T / C) * macs_chunk
            io = B * T * H * (2 * K + 2 * V + 3) * item + B * H * K * V * 4
            return (3 * flops, 2 * io) if self.grad else (flops, io)
        M, K, N, G = self.dims
        flops = 2.0 * M * K * N
        io = (M * K + G * K * N + M * N) * item
        return (3 * flops, 2.5 * io) if self.grad else (flops, io)

    def roofline(self) -> dict[str, float]:
        """An estimate, not a measurement: the H200 lower-bound time of the case's FLOPs at the
        dtype's tensor-core peak and of its minimum bytes at HBM bandwidth."""
        flops, nbytes = self.flops_and_bytes()
        t_compute = flops / (PEAK_TFLOPS[self.dtype] * 1e12)
        t_memory = nbytes / (HBM_TBPS * 1e12)
        return {"gflop": flops / 1e9, "mbytes": nbytes / 1e6,
                "intensity_flop_per_byte": flops / nbytes,
                "t_compute_us": t_compute * 1e6, "t_memory_us": t_memory * 1e6,
                "bound": "compute" if t_compute >= t_memory else "memory",
                "t_lower_bound_us": max(t_compute, t_memory) * 1e6}

    def build(self) -> tuple[Callable, list[Any]]:
        """`(fn, args)`: the function and its argument shapes (`jax.ShapeDtypeStruct`s)."""
        import jax
        import jax.numpy as jnp

        S, dt = jax.ShapeDtypeStruct, jnp.dtype(self.dtype)
        if self.op.startswith("delta_rule"):
            from moejax.kernels.delta_rule import delta_rule

            mode, _, variant = self.op[self.op.index("[") + 1:-1].partition(":")
            pairing = "authors" if variant == "authors" else "recurrence"
            B, T, H, K, V, C = self.dims
            args = [S((B, T, H, K), dt), S((B, T, H, K), dt), S((B, T, H, V), dt),
                    S((B, T, H), dt)]
            names = (["g"] if "gated" in mode else []) + (["lam"] if "qdelta" in mode else [])
            args += [S((B, T, H), jnp.float32 if n == "g" else dt) for n in names]
            if mode.startswith("kda"):
                names.append("gk")
                args.append(S((B, T, H, K), jnp.float32))
            if variant == "packed":  # PACKED_SEQUENCES sequences of uneven lengths, traced
                names.append("cu_seqlens")
                args.append(S((PACKED_SEQUENCES + 1,), jnp.int32))

            def fn(*a):
                return delta_rule(*a[:4], **dict(zip(names, a[4:], strict=True)),
                                  impl="pallas", chunk_size=C, pairing=pairing)[0]

            n_diff = 3
        else:
            from moejax.kernels.gmm import gmm

            M, K, N, G = self.dims
            args = [S((M, K), dt), S((G, K, N), dt), S((G,), jnp.int32)]
            fn = lambda lhs, rhs, gs: gmm(lhs, rhs, gs, impl="pallas")  # noqa: E731
            n_diff = 2
        if self.grad:
            fwd = fn
            # q, k, v (and gk: its gradient runs the per-channel factors' VJP)
            argnums = tuple(range(n_diff)) + ((4 + names.index("gk"),)
                                              if self.op.startswith("delta_rule")
                                              and "gk" in names else ())
            fn = jax.grad(lambda *a: fwd(*a).astype(jnp.float32).sum(), argnums=argnums)
        return fn, args


def cases(*, full: bool) -> list[Case]:
    """The compile matrix. `full=False`: forward kernels at one shape (the CI subset: the
    plainest and the fullest delta-rule mode, per-channel decay with packed sequences, gmm
    up-projection), bf16. `full=True`: every mode × head dims × forward/gradient in bf16, fp32
    (TF32 dots) and fp32 at 3×TF32 (gated Q-Delta also with `pairing="authors"`; per-channel
    decay `GK_MODES` and packed sequences `PACKED_MODES` at the largest head dims), gmm at
    `GMM_SHAPES` (up and down projections) in bf16 and fp32."""
    if not full:
        return [Case("delta_rule[deltanet]", False, "bfloat16", (2, 256, 4, 64, 128, 64)),
                Case("delta_rule[gated_qdelta]", False, "bfloat16", (2, 256, 4, 64, 128, 64)),
                Case("delta_rule[kda_qdelta:packed]", False, "bfloat16",
                     (1, 512, 4, 64, 128, 64)),
                Case("gmm[up]", False, "bfloat16", (4096, 2048, 1408, 8))]
    out = []
    for dtype, fp32 in (("bfloat16", "tf32"), ("float32", "tf32"), ("float32", "tf32x3")):
        for grad in (False, True):
            for mode in (*DELTA_RULE_MODES, "gated_qdelta:authors"):
                for dk, dv in DELTA_RULE_HEAD_DIMS:
                    out.append(Case(f"delta_rule[{mode}]", grad, dtype, (2, 256, 4, dk, dv, 64),
                                    fp32))
            dk, dv = DELTA_RULE_MAX_HEAD_DIMS
            for mode in GK_MODES:
                out.append(Case(f"delta_rule[{mode}]", grad, dtype, (2, 256, 4, dk, dv, 64), fp32))
            for mode in PACKED_MODES:
                out.append(Case(f"delta_rule[{mode}]", grad, dtype, (1, 512, 4, dk, dv, 64), fp32))
            if fp32 == "tf32x3":  # gmm has no 3×TF32 mode: "highest" means FMA dots there.
                continue
            for e, d, f in GMM_SHAPES:
                out.append(Case("gmm[up]", grad, dtype, (4096, d, f, e)))
                out.append(Case("gmm[down]", grad, dtype, (4096, f, d, e)))
    return out


def compile_case(case: Case, *, cache: dict[str, KernelReport] | None = None
                 ) -> list[KernelReport]:
    """Both routes for one case: route "triton"'s reports, then route "xla"'s."""
    import jax

    with jax.default_matmul_precision(case.matmul_precision):
        fn, args = case.build()
        triton_reports = compile_triton(fn, args, cache=cache)
        matmul = {r.name: r.matmul for r in triton_reports}
        return triton_reports + compile_xla(fn, args, kernel_re=r"delta_rule|moejax",
                                            matmul=matmul)
