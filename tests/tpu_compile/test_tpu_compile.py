"""Deviceless Mosaic compile of the Pallas TPU delta-rule kernels (marker `tpu_compile`).

Runs only where libtpu is importable (`jax[tpu]` at the installed jax version); elsewhere it is
skipped. Each case (`moejax.kernels.tpu_compile.cases`: the four scalar-decay modes, per-channel
decay gk and chunk restarts, forward and gradient) is lowered with `impl="pallas"` for a
compile-only v5e and v6e chip and compiled by libtpu to the end: it must compile, run its
Mosaic kernels (not a fallback), and every kernel's scoped VMEM must fit the chip.
`MOEJAX_TPU_COMPILE_FULL=1` runs the whole matrix (float32, the largest head dims and C = 128)
on all five generations. A control checks that an over-large VMEM scratch is refused, so a pass
means something.
"""

from __future__ import annotations

import os

import pytest

from moejax.kernels import tpu_compile as tc

pytestmark = [
    pytest.mark.tpu_compile,
    pytest.mark.skipif(not tc.available(), reason="needs libtpu (pip install 'jax[tpu]')"),
]

FULL = os.environ.get("MOEJAX_TPU_COMPILE_FULL") == "1"
TARGETS = tuple(tc.TARGETS) if FULL else ("v5e", "v6e")
CASES = tc.cases(full=FULL)


def _expected_kernels(case: tc.Case) -> set[str]:
    gk = tc.DELTA_RULE_MODES[case.mode][2]
    intra = "delta_rule_intra_fwd_gk" if gk else "delta_rule_intra_fwd"
    names = {intra, "delta_rule_state_fwd"}
    if case.what == "grad":
        names |= {"delta_rule_state_bwd", "delta_rule_intra_bwd_gk" if gk else
                  "delta_rule_intra_bwd"}
    return names


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_delta_rule_kernels_compile_and_fit_vmem(case, target):
    report = tc.compile_case(case, target)
    print(report.row())
    assert report.compiled, report.error
    names = {k.name for k in report.kernels}
    assert _expected_kernels(case) <= names, names
    assert report.max_scoped_vmem <= tc.VMEM_BYTES[target], report.row()


@pytest.mark.parametrize("target", TARGETS[:1])
def test_control_vmem_overflow_is_refused(target):
    """A 256 MiB VMEM scratch (more than any TPU has) must not compile."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu

    def kernel(x_ref, o_ref, s_ref):
        s_ref[...] = jnp.zeros_like(s_ref) + jnp.sum(x_ref[...])
        o_ref[...] = x_ref[...] + jnp.sum(s_ref[0:8, 0:128])

    f = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
                       scratch_shapes=[pltpu.VMEM((65536, 1024), jnp.float32)])
    sharding = jax.sharding.SingleDeviceSharding(tc.device(target))
    x = jax.ShapeDtypeStruct((8, 128), jnp.float32, sharding=sharding)
    with pytest.raises(Exception, match=r"(?i)vmem|memory|RESOURCE_EXHAUSTED"):
        jax.jit(f).lower(x).compile()
