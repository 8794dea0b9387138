"""The all_to_all byte counts of `experiments/bench_ep.py`: analytic, parsed from HLO, and the two
against each other on a compiled expert-parallel layer (8 simulated CPU devices)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import pytest

from experiments import bench_ep
from moejax import parallel
from moejax.moe.layer import MoEConfig, init, moe_apply

B, T, D, F, E, K = 8, 4, 8, 16, 8, 2  # N = 32 tokens: 4 per device on 8 devices


@pytest.mark.parametrize(
    ("dropless", "capacity"),
    # n = 4 local tokens, E_l = 2: dropless C = n·min(K, E_l) = 8; cf=0.5: ⌈0.5·4·2/4⌉ = 1.
    [(True, 8), (False, 1)],
    ids=["dropless", "capacity"],
)
def test_analytic_bytes(dropless, capacity):
    got = bench_ep.all_to_all_bytes(num_tokens=B * T, d_model=D, num_experts=E,
                                    num_expert_shards=4, num_token_shards=8, k=K,
                                    capacity_factor=0.5, dropless=dropless)
    buffer = 2 * 8 * 4 * capacity * D * 4  # there and back · devices · X · C · d · f32
    assert got == {"buffer": buffer, "cross_device": buffer * 3 // 4,
                   "formula": 2 * B * T * K * 0.5 * D * 4, "capacity": capacity}


def test_hlo_bytes_counts_only_all_to_all_results():
    hlo = "\n".join([
        "  %a = f32[4,3,8]{2,1,0} all-to-all(f32[4,3,8]{2,1,0} %x), replica_groups={{0,1}}",
        "  %b = (bf16[2,5]{1,0}, s32[2]{0}) all-to-all(bf16[2,5] %y, s32[2] %z), dimensions={0}",
        "  %c = f32[100,100]{1,0} dot(f32[100,100] %p, f32[100,100] %q)",
        "  %d = f32[64]{0} all-reduce(f32[64]{0} %r), to_apply=%sum",
        "  ROOT %e = pred[7]{0} all-to-all(pred[7]{0} %m)",
    ])
    assert bench_ep.hlo_all_to_all_bytes(hlo) == 4 * 3 * 8 * 4 + 2 * 5 * 2 + 2 * 4 + 7
    assert bench_ep.hlo_all_to_all_bytes("") == 0


def test_hlo_bytes_of_a_compiled_layer_match_the_analytic_count():
    # Moved from tests/parallel/test_expert_parallel.py (tight capacity, (2, 4) mesh).
    cfg = MoEConfig(d_model=D, d_ff=F, num_experts=E, router="topk", top_k=K,
                    gmm_impl="reference", dispatcher="capacity", capacity_factor=0.5)
    params, state = init(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (B, T, D))
    ep_cfg = dataclasses.replace(
        cfg, parallel=parallel.ExpertParallel(mesh=parallel.make_mesh(2, 4)))
    compiled = jax.jit(functools.partial(moe_apply, cfg=ep_cfg, train=True)).lower(
        params, state, x).compile()
    want = bench_ep.all_to_all_bytes(num_tokens=B * T, d_model=D, num_experts=E,
                                     num_expert_shards=4, num_token_shards=8, k=K,
                                     capacity_factor=0.5, dropless=False)
    hlo = bench_ep.hlo_all_to_all_bytes(compiled.as_text()) * 8
    # all_to_all bytes in the HLO = analytic count + int32 expert ids (sent one way: 1/(2d)).
    assert hlo == want["buffer"] * (2 * D + 1) // (2 * D)
