"""Metrics files, throughput, and plots."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moejax.train import logging as log_lib
from moejax.train import plots


def write_lines(path, lines):
    path.write_text("".join(lines))


def test_read_metrics_skips_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_lines(path, ['{"step": 1, "loss": 2.0}\n', '{"step": 2, "loss": 1.5}\n',
                       '{"step": 3, "lo'])
    assert [r["step"] for r in log_lib.read_metrics(tmp_path)] == [1, 2]
    assert log_lib.read_metrics(tmp_path / "missing.jsonl") == []


def test_truncate_keeps_steps_up_to_the_restored_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_lines(path, [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 8)])
    log_lib.truncate_metrics(path, last_step=4)
    assert [r["step"] for r in log_lib.read_metrics(path)] == [1, 2, 3, 4]
    log_lib.truncate_metrics(path, last_step=0)
    assert log_lib.read_metrics(path) == []


def test_writer_resume_drops_later_lines_and_appends(tmp_path):
    w = log_lib.MetricsWriter(tmp_path, start_step=0, total_steps=4, progress=False)
    for s in (1, 2, 3):
        w.write({"step": s, "loss": float(s)})
    w.close()
    w = log_lib.MetricsWriter(tmp_path, start_step=2, total_steps=4, progress=False)
    w.write({"step": 3, "loss": 30.0})
    w.close()
    assert [(r["step"], r["loss"]) for r in log_lib.read_metrics(tmp_path)] == [
        (1, 1.0), (2, 2.0), (3, 30.0)
    ]
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2


def test_disabled_writer_writes_nothing(tmp_path):
    w = log_lib.MetricsWriter(tmp_path / "run", start_step=0, total_steps=2, enabled=False)
    w.write({"step": 1, "loss": 1.0})
    w.progress(1, loss=1.0)
    w.close()
    assert not (tmp_path / "run").exists()


def test_to_record_scalars_and_load_summary():
    load = np.array([[0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0.0, 0.0]], np.float32)
    rec = log_lib.to_record(7, {"ce": np.float32(1.5), "load": load, "other": np.ones(3)})
    assert rec["step"] == 7 and rec["ce"] == 1.5 and "other" not in rec
    assert rec["load"] == load.tolist()
    # Layer 0 balanced (cv 0, max-vio 0); layer 1: std 0.25 / mean 0.25 = 1, max 0.5/0.25 - 1 = 1.
    assert rec["load_cv"] == pytest.approx(0.5)
    assert rec["load_max_vio"] == pytest.approx(0.5)
    json.dumps(rec)


def test_throughput_leaves_out_the_compile_step():
    tp = log_lib.Throughput()
    tp.add(100, 10.0, warmup=True)
    tp.add(100, 0.5)
    tp.add(100, 0.5)
    assert tp.rate() == pytest.approx(200.0)
    tp.add(100, 4.0, warmup=True)
    assert tp.rate() == pytest.approx(25.0)  # nothing else in the window
    assert tp.rate() == 0.0


def test_write_plots(tmp_path):
    lines = [{"step": s, "loss": 3.0 / s, "ce": 2.9 / s} for s in range(1, 6)]
    lines[-1].update(val_loss=1.0, load=[[0.5, 0.5], [0.9, 0.1]])
    write_lines(tmp_path / "metrics.jsonl", [json.dumps(r) + "\n" for r in lines])
    paths = plots.write_plots(tmp_path)
    assert [p.name for p in paths] == ["loss_curves.png", "expert_load.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plots.write_plots(tmp_path / "empty") == []
