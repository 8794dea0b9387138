"""Smoke test of `experiments/bench_scale.py`: two meshes of the 8 simulated CPU devices, one
warm-up and one timed step of a one-layer MoE LM; the bytes per device and the all_to_all bytes
of the compiled train step against the formula."""

from __future__ import annotations

import json
import math

import pytest

from experiments import bench_scale
from moejax.models import lm

MESHES = ["data:8", "data:2,fsdp:2,expert:2"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    # Softmax mixer and ragged_dot experts: the quickest to compile (≈ 4 s per mesh).
    cfg = bench_scale.model_config("tiny", num_layers=1, mixer="softmax",
                                   moe=dict(num_experts=8, top_k=2, gmm_impl="reference"))
    out = tmp_path_factory.mktemp("bench_scale") / "bench_scale.json"
    lines = []
    returned = bench_scale.run(cfg, MESHES + ["expert:16"], batch_size=8, seq_len=16, steps=1,
                               warmup=1, out=str(out), log=lines.append)
    written = json.loads(out.read_text())
    assert written["rows"] == json.loads(json.dumps(returned["rows"]))
    return written, "\n".join(lines)


def test_rows_and_table(report):
    written, log = report
    rows = {r["mesh"]: r for r in written["rows"]}
    assert list(rows) == ["data:8,fsdp:1,expert:1", "data:2,fsdp:2,expert:2",
                          "data:1,fsdp:1,expert:16"]
    assert "skipped" in rows["data:1,fsdp:1,expert:16"]  # 16 devices: not here
    for spec in MESHES:
        row = rows[bench_scale.parse_meshes([spec])[0]]
        assert row["step_seconds"] > 0 and row["tokens_per_s"] > 0
        assert math.isfinite(row["final_loss"])
    assert "HLO/formula" in log and "skipped" in log


def test_bytes_per_device_shrink_with_fsdp_and_expert(report):
    rows = {r["mesh"]: r for r in report[0]["rows"]}
    data, mixed = rows["data:8,fsdp:1,expert:1"], rows["data:2,fsdp:2,expert:2"]
    assert data["params_opt_bytes_per_device"] == data["params_opt_bytes_replicated"]
    assert data["bytes_ratio"] == 1.0
    assert mixed["params_opt_bytes_replicated"] == data["params_opt_bytes_replicated"]
    assert mixed["params_opt_bytes_per_device"] < data["params_opt_bytes_per_device"]
    assert 0.25 <= mixed["bytes_ratio"] < 0.5  # F·X = 4 at best; small leaves stay replicated


def test_all_to_all_bytes_equal_the_formula(report):
    rows = {r["mesh"]: r for r in report[0]["rows"]}
    data, mixed = rows["data:8,fsdp:1,expert:1"], rows["data:2,fsdp:2,expert:2"]
    assert data["all_to_all_hlo_bytes_per_device"] == 0
    assert data["all_to_all_formula_bytes_per_device"] == 0
    # n = 8·16/8 = 16 tokens per device, E_l = 4, dropless: C = n·min(2, 4) = 32 rows; one MoE
    # layer: 4·X·C·d·4 (rows there and back, forward and backward) + 4·X·C (int32 ids).
    x, c, d = 2, 32, 32
    want = 4 * x * c * d * 4 + 4 * x * c
    assert mixed["all_to_all_formula"]["capacity"] == c
    assert mixed["all_to_all_formula_bytes_per_device"] == want
    assert mixed["all_to_all_hlo_bytes_per_device"] == want
    assert mixed["all_to_all_hlo_over_formula"] == 1.0


def test_formula_is_zero_without_an_expert_axis():
    cfg = lm.get_preset("tiny")
    for shape in ({"data": 8}, {"fsdp": 8}, {"data": 2, "fsdp": 4}):
        assert bench_scale.lm_all_to_all_bytes(cfg, shape, batch_size=8, seq_len=16)["total"] == 0
    got = bench_scale.lm_all_to_all_bytes(cfg, {"data": 2, "expert": 4}, batch_size=8,
                                          seq_len=16)
    # tiny: E=4, X=4 → E_l=1, n=16: C = n·min(2, 1) = 16; two MoE layers, d=32.
    assert got["capacity"] == 16 and got["moe_layers"] == 2
    assert got["total"] == 2 * (4 * 4 * 16 * 32 * 4 + 4 * 4 * 16)


def test_skip_reasons():
    cfg = lm.get_preset("tiny")  # E=4
    assert "does not divide num_experts=4" in bench_scale.skip_reason(
        cfg, "expert:8", batch_size=8, seq_len=16, num_devices=8)
    assert "not divisible by data×fsdp" in bench_scale.skip_reason(
        cfg, "data:8", batch_size=4, seq_len=16, num_devices=8)
    assert bench_scale.skip_reason(cfg, "data:2,expert:4", batch_size=8, seq_len=16,
                                   num_devices=8) is None
