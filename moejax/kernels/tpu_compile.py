"""Deviceless compile of the Pallas TPU (Mosaic) kernels for real TPU chips, no TPU needed.

libtpu's compile-only devices (`jax.experimental.topologies.get_topology_desc(platform="tpu",
...)`, the recipe of MaxText's `train_compile.py`) run the whole Mosaic pipeline and XLA's TPU
backend on a CPU-only machine: `jax.jit(f).lower(*args).compile()` of a function whose
arguments are `ShapeDtypeStruct`s placed on such a device fails exactly where it would on a TPU
host (a Mosaic layout or lowering error, a block over the VMEM limit) and otherwise gives the
compiled executable's `memory_analysis()` and the scoped VMEM each kernel reserves.
`impl="pallas"` picks the Mosaic kernels at lowering time (platform "tpu"), so the public
`delta_rule` is compiled as a model would run it.

Needs `libtpu` in this interpreter: `jax[tpu]` at exactly the installed jax version (jax 0.10.2
pins libtpu 0.0.42.*). `available()` says whether it is importable; the rest raises
`TpuCompileUnavailable` when it is not. Compile-only devices coexist with `JAX_PLATFORMS=cpu`.

Cases (`cases()`): the delta-rule kernels, forward (`o`) and gradient (of every float input), in
each mode the kernels take: the four scalar-decay modes, per-channel decay (`gk`, with and
without λ) and chunk restarts (`cu_seqlens`, with and without gk). `compile_case` gives a
`Report` per (case, target).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import re
import time
from typing import Any

# Target name -> `get_topology_desc` arguments (one chip of each; device 0 is compiled for).
TARGETS = {
    "v5e": dict(topology_name="v5e:1x1", chip_config_name="default",
                chips_per_host_bounds=(1, 1, 1)),
    "v6e": dict(topology_name="v6e:1x1", chip_config_name="default",
                chips_per_host_bounds=(1, 1, 1)),
    "v5p": dict(topology_name="v5:2x2x1", chip_config_name="megacore",
                chips_per_host_bounds=(2, 2, 1)),
    "v4": dict(topology_name="v4:2x2x1", chip_config_name="megacore",
               chips_per_host_bounds=(2, 2, 1)),
    "tpu7x": dict(topology_name="tpu7x:1x1x1", chip_config_name="default",
                  chips_per_host_bounds=(1, 1, 1)),
}
# VMEM per core as the compiler sees it (bytes).
VMEM_BYTES = {"v5e": 128 << 20, "v6e": 128 << 20, "v5p": 64 << 20, "v4": 16 << 20,
              "tpu7x": 64 << 20}

# mode -> (g, λ, gk, packed)
DELTA_RULE_MODES = {
    "deltanet": (False, False, False, False),
    "gated_deltanet": (True, False, False, False),
    "qdelta": (False, True, False, False),
    "gated_qdelta": (True, True, False, False),
    "kda": (False, False, True, False),
    "kda_qdelta": (False, True, True, False),
    "packed_gated_qdelta": (True, True, False, True),
    "packed_kda": (False, False, True, True),
}
# B, T, H, Dk, Dv, C of the default cases (`B = 1` for the packed modes, 3 sequences): one
# 128-lane Dk block, two Dv tiles.
DEFAULT_SHAPE = (2, 512, 4, 128, 256, 64)
# The largest: the TPU chunk length of 128 with head dims 256 / 512.
LARGE_SHAPE = (1, 512, 2, 256, 512, 128)


class TpuCompileUnavailable(RuntimeError):
    """This interpreter has no libtpu (install `jax[tpu]` at the installed jax version)."""


def available() -> bool:
    """True when libtpu and jax's topology API are importable here."""
    try:
        return (importlib.util.find_spec("libtpu") is not None
                and importlib.util.find_spec("jax.experimental.topologies") is not None)
    except (ImportError, ValueError):
        return False


def _require() -> None:
    if not available():
        raise TpuCompileUnavailable(
            "the deviceless TPU compile needs libtpu: pip install 'jax[tpu]==<jax version>' "
            "(jax 0.10.2: libtpu 0.0.42.*)")
    # No GCE metadata server here; parallel processes may each load libtpu.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


@functools.cache
def device(target: str):
    """The compile-only device 0 of `target` (a key of `TARGETS`)."""
    _require()
    from jax.experimental.topologies import get_topology_desc

    topo = get_topology_desc(platform="tpu", num_slices=1, wrap=(False, False, False),
                             **TARGETS[target])
    return topo.devices[0]


@dataclasses.dataclass(frozen=True)
class Case:
    """One delta-rule compile: `mode` (a key of `DELTA_RULE_MODES`), `what` ("fwd": o;
    "grad": the gradients of every float input), the dtype of q/k/v/β/λ, and
    `shape = (B, T, H, Dk, Dv, C)`."""

    mode: str
    what: str = "fwd"
    dtype: str = "bfloat16"
    shape: tuple[int, ...] = DEFAULT_SHAPE

    @property
    def id(self) -> str:
        B, T, H, Dk, Dv, C = self.shape
        B = 1 if DELTA_RULE_MODES[self.mode][3] else B
        return f"delta_rule[{self.mode}].{self.what}.{self.dtype}.B{B}T{T}H{H}K{Dk}V{Dv}C{C}"


def cases(full: bool = False) -> list[Case]:
    """Every mode, forward and gradient, in bfloat16 at the default shape; `full` adds float32
    and the TPU chunk length of 128 with the largest head dims (Dk 256, Dv 512)."""
    out = [Case(m, w) for m in DELTA_RULE_MODES for w in ("fwd", "grad")]
    if full:
        out += [Case(m, w, "float32") for m in DELTA_RULE_MODES for w in ("fwd", "grad")]
        out += [Case(m, w, shape=LARGE_SHAPE) for m in DELTA_RULE_MODES
                for w in ("fwd", "grad")]
    return out


def build(case: Case, sharding) -> tuple[Any, list[Any]]:
    """`(f, args)`: the function to compile and its `ShapeDtypeStruct` arguments on
    `sharding`."""
    import jax
    import jax.numpy as jnp

    from moejax.kernels.delta_rule import delta_rule

    use_g, use_lam, use_gk, packed = DELTA_RULE_MODES[case.mode]
    B, T, H, Dk, Dv, C = case.shape
    if packed:
        B = 1
    dt = jnp.dtype(case.dtype)
    spec = lambda shape, d=dt: jax.ShapeDtypeStruct(shape, d, sharding=sharding)
    args = [spec((B, T, H, Dk)), spec((B, T, H, Dk)), spec((B, T, H, Dv)), spec((B, T, H))]
    names = []
    if use_g:
        args.append(spec((B, T, H), jnp.float32))
        names.append("g")
    if use_lam:
        args.append(spec((B, T, H)))
        names.append("lam")
    if use_gk:
        args.append(spec((B, T, H, Dk), jnp.float32))
        names.append("gk")
    n_diff = len(args)
    if packed:
        args.append(spec((4,), jnp.int32))  # 3 packed sequences (traced boundaries)
        names.append("cu_seqlens")

    def fwd(*a):
        o, _ = delta_rule(*a[:4], **dict(zip(names, a[4:], strict=True)), impl="pallas",
                          chunk_size=C)
        return o

    if case.what == "fwd":
        return fwd, args
    grad = jax.grad(lambda *a: jnp.sum(fwd(*a).astype(jnp.float32)),
                    argnums=tuple(range(n_diff)))
    return grad, args


@dataclasses.dataclass
class KernelInfo:
    """One Mosaic kernel (`tpu_custom_call`) of a compiled executable."""

    name: str
    scoped_vmem_bytes: int | None  # the scoped VMEM XLA reserved for it
    flops: int | None  # its cost estimate


@dataclasses.dataclass
class Report:
    """A compile of one case for one target."""

    case: str
    target: str
    compiled: bool = False
    error: str | None = None
    device_kind: str | None = None
    memory: dict[str, int] | None = None  # `memory_analysis()`: argument/output/temp bytes
    kernels: list[KernelInfo] = dataclasses.field(default_factory=list)
    lower_s: float | None = None
    compile_s: float | None = None

    @property
    def max_scoped_vmem(self) -> int:
        return max((k.scoped_vmem_bytes or 0 for k in self.kernels), default=0)

    def row(self) -> str:
        mib = lambda b: "-" if b is None else f"{b / 2**20:.2f}"
        ks = ", ".join(f"{k.name.removeprefix('delta_rule_')}={mib(k.scoped_vmem_bytes)}"
                       for k in self.kernels)
        head = f"{self.target:6s} {self.case}: "
        if not self.compiled:
            return head + f"FAILED {self.error}"
        temp = (self.memory or {}).get("temp_size_in_bytes")
        return (head + f"ok ({self.compile_s}s) temp={mib(temp)} MiB; scoped VMEM MiB: {ks}")


_CALL_RE = re.compile(r'^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=.*custom_call_target="tpu_custom_call"')


def kernels_of(hlo_text: str) -> list[KernelInfo]:
    """The Mosaic kernels of compiled HLO text, with their scoped VMEM and flops."""
    out = []
    for line in hlo_text.splitlines():
        m = _CALL_RE.match(line)
        if not m:
            continue
        line = re.sub(r'"body":"[^"]*"', "", line)  # the serialized kernel
        used = re.search(r'"used_scoped_memory_configs":\[([^\]]*)\]', line)
        vmem = None
        if used:
            vmem = sum(int(x) for x in re.findall(
                r'"memory_space":"1","offset":"\d+","size":"(\d+)"', used[1]))
        flops = re.search(r'"cost_estimate":\{"flops":"(\d+)"', line)
        out.append(KernelInfo(re.sub(r"\.\d+$", "", m[1]), vmem,
                              int(flops[1]) if flops else None))
    return out


def compile_case(case: Case, target: str) -> Report:
    """Lowers and compiles `case` for `target`; a compile error is reported, not raised."""
    import jax

    rep = Report(case.id, target)
    dev = device(target)
    rep.device_kind = dev.device_kind
    f, args = build(case, jax.sharding.SingleDeviceSharding(dev))
    try:
        t = time.time()
        lowered = jax.jit(f).lower(*args)
        rep.lower_s = round(time.time() - t, 2)
        t = time.time()
        compiled = lowered.compile()
        rep.compile_s = round(time.time() - t, 2)
    except Exception as e:  # noqa: BLE001 (Mosaic/XLA errors come as several types)
        rep.error = f"{type(e).__name__}: {e}"[:4000]
        return rep
    rep.compiled = True
    ma = compiled.memory_analysis()
    if ma is not None:
        rep.memory = {k: int(getattr(ma, k)) for k in (
            "argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes")}
    rep.kernels = kernels_of(compiled.as_text())
    return rep
