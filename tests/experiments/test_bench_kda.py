"""Smoke test of `experiments/bench_kda.py` at tiny sizes, as a subprocess (its absl flags would
clash with other experiment scripts'): every measurement lands in the JSON and is sane."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_end_to_end_tiny(tmp_path):
    cmd = [sys.executable, "-m", "experiments.bench_kda", f"--workdir={tmp_path}",
           "--shape=1,2,96,8,8", "--chunk_sizes=16", "--reps=1", "--seq_len=48",
           "--num_docs=6", "--d_model=32", "--mixers=kda"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "TQDM_DISABLE": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "bench_kda.json").read_text())
    (op,) = report["op"]["rows"]
    assert op["chunk_size"] == 16 and op["gk_seconds"] > 0 and op["kda_over_gdn"] > 0
    (pack,) = report["packing"]["rows"]
    assert pack["mixer"] == "kda" and pack["padded_rows"] == 6
    assert pack["packed_rows"] <= pack["padded_rows"] and pack["packed_tokens_per_s"] > 0
    cache = {r["shape"]: r for r in report["mla_cache"]}
    # DeepSeek-V3: (512 + 64) bf16 per token against 2 · 128 heads · 192 channels.
    assert cache["deepseek_v3"]["mla_bytes_per_token"] == 576 * 2
    assert cache["deepseek_v3"]["mha_bytes_per_token"] == 2 * 128 * 192 * 2
