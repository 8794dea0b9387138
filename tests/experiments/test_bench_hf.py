"""Smoke test of `experiments/bench_hf.py` end to end on a tiny Qwen3-Next and Kimi Linear
(needs torch and transformers). Run as a subprocess: the script's absl flags (`workdir`,
`batch_size`, ...) would clash with those of the other experiment scripts imported by this test
process. The subprocess inherits conftest's XLA_FLAGS / JAX_PLATFORMS (CPU, unoptimised XLA
backend: faster compile)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="bench_hf compares against torch; torch is not installed")
pytest.importorskip("transformers",
                    reason="bench_hf builds a Qwen3-Next with transformers; not installed")
pytest.importorskip("safetensors", reason="load_hf reads safetensors; not installed")

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("arch,mixers", [("qwen3_next", ["gated_deltanet", "gated_softmax"]),
                                         ("kimi_linear", ["kda", "mla"])])
def test_end_to_end_tiny(tmp_path, arch, mixers):
    workdir = tmp_path / "bench_hf"
    cmd = [sys.executable, "-m", "experiments.bench_hf", f"--workdir={workdir}", "--reps=1",
           "--batch_size=2", "--seq_len=16", "--d_model=32", "--num_layers=2",
           "--vocab_size=64", "--num_experts=4", "--device=cpu", f"--arch={arch}"]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ratio moejax / transformers" in proc.stdout
    assert (workdir / "hf_model" / "config.json").exists()
    report = json.loads((workdir / "bench_hf.json").read_text())
    for side in ("moejax", "transformers"):
        assert report[side]["tokens_per_s"] > 0
        assert len(report[side]["all_step_seconds"]) == 1
    assert report["loss"]["rel_diff"] <= 1e-3
    assert report["moejax_config"]["layer_mixers"] == mixers
    assert report["settings"]["arch"] == arch
    assert report["transformers"]["device"] == "cpu"
    assert report["tokens_per_s_ratio_moejax_over_transformers"] > 0
    assert report["versions"]["torch"] and report["versions"]["transformers"]
