"""The Pallas GPU (Triton) kernel in interpret mode on CPU against the oracle.

`impl="pallas"` on CPU runs the GPU kernel with `interpret=True` (GPU semantics), so the shared
test base exercises it through the public op. Interpret mode is slow: the default run keeps a
representative subset (every mode, every chunk size, T ∈ {1, 63, 100, 300}, ragged head dims,
bf16); the full matrix is behind `-m slow`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.test_util import check_grads

from moejax.kernels.delta_rule import pallas_gpu
from moejax.kernels.delta_rule.reference import delta_rule_reference
from moejax.testing import RATIO_F32, assert_close
from tests.kernels.delta_rule.inputs import MODES, make_inputs
from tests.kernels.delta_rule.test_base import CHUNKS, DeltaRuleTestBase

PALLAS_T = (1, 63, 100, 300)
# (mode, chunk_size, T): each mode, chunk size and T at least once.
FAST_CASES = [("gated_qdelta", 32, 100), ("deltanet", 16, 63), ("gated_deltanet", 64, 1),
              ("qdelta", 64, 300)]
FULL_CASES = [(m, c, t) for m in MODES for c in CHUNKS for t in PALLAS_T
              if (m, c, t) not in FAST_CASES]
ARG_NAMES = ("q", "k", "v", "beta", "g", "lam", "initial_state")


class TestPallasGpu(DeltaRuleTestBase):
    impl = "pallas"

    def ratios(self, dtype):
        # DESIGN/issue thresholds: fp32 1e-5 / 1e-4; bf16 5e-3 outputs, 8e-3 gradients.
        if dtype == jnp.bfloat16:
            return 5e-3, 8e-3, 8e-3
        return 1e-5, 1e-4, 1e-4

    @pytest.mark.parametrize("mode,chunk_size,T", FAST_CASES)
    def test_matches_oracle_fp32(self, mode, chunk_size, T):
        self._check_against_oracle(mode, T, chunk_size)

    @pytest.mark.slow
    @pytest.mark.parametrize("mode,chunk_size,T", FULL_CASES)
    def test_matches_oracle_fp32_full(self, mode, chunk_size, T):
        self._check_against_oracle(mode, T, chunk_size)

    @pytest.mark.parametrize("mode", ["gated_qdelta"])
    def test_matches_oracle_bf16(self, mode):
        self._check_against_oracle(mode, 100, 32, dtype=jnp.bfloat16)

    @pytest.mark.slow
    @pytest.mark.parametrize("mode", ["deltanet", "gated_deltanet", "qdelta"])
    def test_matches_oracle_bf16_full(self, mode):
        self._check_against_oracle(mode, 100, 32, dtype=jnp.bfloat16)

    @pytest.mark.parametrize("Dk,Dv", [(60, 100)], ids=["Dk60-Dv100"])
    def test_ragged_head_dims(self, Dk, Dv):
        self._check_against_oracle("gated_qdelta", 100, 32, Dk=Dk, Dv=Dv, B=1, H=1)

    @pytest.mark.slow
    @pytest.mark.parametrize("Dk,Dv", [(7, 5), (20, 36), (128, 96)])
    def test_ragged_head_dims_full(self, Dk, Dv):
        self._check_against_oracle("gated_qdelta", 100, 32, Dk=Dk, Dv=Dv, B=1, H=3)

    @pytest.mark.parametrize("mode", ["gated_qdelta"])
    def test_split_sequence_carries_state(self, mode):
        super().test_split_sequence_carries_state(mode)

    @pytest.mark.slow
    @pytest.mark.parametrize("mode", ["deltanet", "gated_deltanet", "qdelta"])
    def test_split_sequence_carries_state_full(self, mode):
        super().test_split_sequence_carries_state(mode)

    @pytest.mark.slow
    @pytest.mark.parametrize("mode", list(MODES))
    def test_decode_loop_equals_full(self, mode):
        super().test_decode_loop_equals_full(mode)

    @pytest.mark.slow
    def test_no_final_state(self):
        super().test_no_final_state()


def _opts(**kw):
    return pallas_gpu.DeltaRuleOptions(scale=kw.pop("scale", 0.25), interpret=True, **kw)


def _run(a, opts):
    return jax.jit(pallas_gpu.delta_rule_gpu, static_argnums=7)(
        *[a[n] for n in ARG_NAMES], opts)


def test_block_v_tiles_match_untiled():
    """Dv split over several state-kernel programs equals one tile (state columns independent)."""
    a = make_inputs("gated_qdelta", B=1, T=40, H=1, Dk=16, Dv=64)
    o1, S1 = _run(a, _opts(chunk_size=16, block_v=16))
    o2, S2 = _run(a, _opts(chunk_size=16, block_v=64))
    assert_close("o", o2, o1, ratio=RATIO_F32)
    assert_close("S", S2, S1, ratio=RATIO_F32)


def test_head_dim_padding_is_exact():
    """Zero-padding Dk/Dv inside the op gives the result of the unpadded math."""
    a = make_inputs("gated_qdelta", B=1, T=20, H=1, Dk=16, Dv=16)
    pad = lambda x, n: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n)])
    b = dict(a, q=pad(a["q"], 5), k=pad(a["k"], 5), v=pad(a["v"], 3),
             initial_state=jnp.pad(a["initial_state"], ((0, 0), (0, 0), (0, 5), (0, 3))))
    o1, S1 = _run(a, _opts(chunk_size=16))
    o2, S2 = _run(b, _opts(chunk_size=16))
    assert_close("o", o1, o2[..., :16], ratio=RATIO_F32)
    assert_close("S", S1, S2[..., :16, :16], ratio=RATIO_F32)
    assert float(jnp.max(jnp.abs(o2[..., 16:]))) == 0.0


def test_check_grads():
    """Numerical vs custom-VJP gradients of the kernel itself (float32, tiny shape)."""
    a = make_inputs("gated_qdelta", B=1, T=5, H=1, Dk=4, Dv=3)
    opts = _opts(chunk_size=16)

    def f(*args):
        o, S = pallas_gpu.delta_rule_gpu(*args, opts)
        return jnp.sum(jnp.sin(o)) + jnp.sum(S**2)

    check_grads(jax.jit(f), [a[n] for n in ARG_NAMES], order=1, modes=["rev"], atol=1e-2,
                rtol=1e-2, eps=1e-3)


@pytest.mark.slow
def test_oracle_direct_no_initial_state():
    a = make_inputs("qdelta", B=1, T=17, H=2, Dk=8, Dv=8, initial_state=False)
    h0 = jnp.zeros((1, 2, 8, 8))
    o, S = _run(dict(a, initial_state=h0), _opts(chunk_size=16))
    o_ref, S_ref = delta_rule_reference(*[a[n] for n in ARG_NAMES], scale=0.25)
    assert_close("o", o_ref, o, ratio=RATIO_F32)
    assert_close("S", S_ref, S, ratio=RATIO_F32)
