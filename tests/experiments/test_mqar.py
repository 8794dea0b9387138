"""`experiments/mqar.py` end to end on a tiny setting: results.json, per-cell metrics, the plot,
resume (a rerun trains only the missing cells) and the errors for bad grids and foreign workdirs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from absl import app, flags

from experiments import mqar
from experiments.sweep import ResultsFile
from moejax import parallel

# L=16 with 2 pairs, V=32, d=16: a couple of seconds of compile per mixer (softmax compiles
# fastest; the Q-Delta-vs-DeltaNet bookkeeping is checked on synthetic cells below).
TINY = dict(mixers=("qdelta", "softmax"), d_models=(16,), settings=((16, 2),), lrs=(1e-2,),
            seeds=(0,), steps=2, batch_size=4, vocab_size=32, num_train=8, num_eval=8,
            log_every=1)


def test_runs_writes_results_and_plot_then_resumes(tmp_path, monkeypatch):
    cfg = mqar.ExperimentConfig(**TINY)
    res = mqar.run(cfg, str(tmp_path), progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["experiment"] == "mqar" and saved["fixed"]["vocab_size"] == 32
    assert "mixers" not in saved["fixed"]  # sweep axes may grow between reruns
    assert [(c["mixer"], c["lr"]) for c in saved["cells"]] == [("qdelta", 1e-2),
                                                                ("softmax", 1e-2)]
    for c in saved["cells"]:
        assert 0.0 <= c["val_acc"] <= 1.0 and 0.0 <= c["test_acc"] <= 1.0
        records = [json.loads(line) for line in (tmp_path / c["metrics"] / "metrics.jsonl")
                   .read_text().splitlines()]
        assert [r["step"] for r in records] == [1, 2, 2]
        assert {"loss", "acc", "lr", "grad_norm"} <= set(records[0])
        assert "test_acc" in records[-1]
        assert any((tmp_path / c["metrics"] / "tensorboard").iterdir())
    rows = saved["summary"]["best_lr"]
    assert {r["mixer"] for r in rows} == {"qdelta", "softmax"}
    assert rows[0]["by_lr"] == {"0.01": rows[0]["test_acc"]}
    assert saved["summary"]["chance"] == pytest.approx(1 / 16)
    assert saved["summary"]["claim_qdelta_ge_deltanets"] == []  # no DeltaNet in this sweep
    assert res["summary"] == saved["summary"]
    assert (tmp_path / mqar.PLOT).stat().st_size > 0

    # A rerun with one more lr trains only the two new cells and keeps the old ones.
    trained = []
    real = mqar.train_cell
    monkeypatch.setattr(mqar, "train_cell",
                        lambda cfg, m, d, s, lr, seed, *a, **k:
                        trained.append((m, lr)) or real(cfg, m, d, s, lr, seed, *a, **k))
    mqar.run(mqar.ExperimentConfig(**{**TINY, "lrs": (1e-2, 3e-2)}), str(tmp_path),
             progress=False)
    assert trained == [("qdelta", 3e-2), ("softmax", 3e-2)]
    saved2 = json.loads((tmp_path / "results.json").read_text())
    assert saved2["cells"][:2] == saved["cells"] and len(saved2["cells"]) == 4
    assert set(saved2["summary"]["best_lr"][0]["by_lr"]) == {"0.01", "0.03"}
    trained.clear()
    mqar.run(mqar.ExperimentConfig(**{**TINY, "lrs": (1e-2, 3e-2)}), str(tmp_path),
             progress=False)
    assert trained == []


def test_a_two_device_mesh_gives_the_one_device_results(tmp_path, monkeypatch):
    """The smoke setting's softmax cell on a 2-device data mesh (`run(mesh=)`, what
    `--mesh=data:2` builds on two devices) matches the one-device cell; a mesh the batch does
    not split over is refused before anything is written."""
    monkeypatch.setattr(mqar, "plot", lambda *a, **k: None)  # drawn by the smoke test above
    cfg = mqar.ExperimentConfig(**{**TINY, "mixers": ("softmax",)})
    runs = {name: mqar.run(cfg, str(tmp_path / name), progress=False, mesh=mesh)["cells"]
            for name, mesh in (("one", None), ("two", parallel.make_mesh(2)))}
    (one,), (two,) = runs["one"], runs["two"]
    for k in ("val_acc", "val_loss", "test_acc", "test_loss", "final_train_loss"):
        assert two[k] == pytest.approx(one[k], rel=1e-4), k
    records = {name: [json.loads(line) for line in
                      (tmp_path / name / c["metrics"] / "metrics.jsonl").read_text().splitlines()]
               for name, c in (("one", one), ("two", two))}
    losses = {name: [r["loss"] for r in rs if "loss" in r] for name, rs in records.items()}
    assert len(losses["one"]) == 2 and losses["two"] == pytest.approx(losses["one"], rel=1e-4)
    with pytest.raises(ValueError, match="batch_size=4 is not divisible by the batch axes "
                                         "data×fsdp = 8"):
        mqar.run(cfg, str(tmp_path / "bad"), progress=False, mesh=parallel.make_mesh(8))
    assert not (tmp_path / "bad").exists()


def test_summary_picks_the_lr_on_val_and_reports_test():
    def cell(mixer, lr, val, test, seed=0):
        return dict(mixer=mixer, d_model=64, seq_len=64, num_kv_pairs=4, lr=lr, seed=seed,
                    val_acc=val, test_acc=test)

    cells = [cell("qdelta", 1e-3, 0.5, 0.9), cell("qdelta", 1e-2, 0.6, 0.4),
             cell("deltanet", 1e-3, 0.7, 0.7), cell("deltanet", 1e-3, 0.9, 0.5, seed=1),
             cell("gated_deltanet", 1e-2, 0.2, 0.3), cell("softmax", 1e-2, 1.0, 1.0)]
    rows = {r["mixer"]: r for r in mqar.summarize(cells)}
    assert list(rows) == ["qdelta", "deltanet", "gated_deltanet", "softmax"]  # MIXERS order
    assert rows["qdelta"]["best_lr"] == 1e-2 and rows["qdelta"]["test_acc"] == 0.4
    assert rows["qdelta"]["by_lr"] == {"0.001": 0.9, "0.01": 0.4}
    assert rows["deltanet"]["test_acc"] == pytest.approx(0.6)  # mean over seeds
    assert rows["deltanet"]["n_seeds"] == 2
    assert rows["deltanet"]["test_acc_std"] == pytest.approx(0.1)
    (claim,) = mqar.claim_check(list(rows.values()))
    assert claim["best_deltanet"] == pytest.approx(0.6)
    assert claim["margin"] == pytest.approx(-0.2)
    assert "| qdelta | 64 | 64 | 4 | 0.01 | 0.400 | 0.600 |" in mqar.format_table(
        list(rows.values()))


def test_refuses_foreign_and_changed_workdirs(tmp_path):
    ResultsFile(tmp_path / "other", "panda_neighbors", fixed={}).write()
    with pytest.raises(ValueError, match="experiment 'panda_neighbors', not 'mqar'"):
        mqar.run(mqar.ExperimentConfig(**TINY), str(tmp_path / "other"), progress=False)
    ResultsFile(tmp_path / "old", "mqar", fixed=mqar.ExperimentConfig(**TINY).fixed()).write()
    with pytest.raises(ValueError, match="steps: 2 != 3"):
        mqar.run(mqar.ExperimentConfig(**{**TINY, "steps": 3}), str(tmp_path / "old"),
                 progress=False)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not a mqar sweep"):
        mqar.run(mqar.ExperimentConfig(**TINY), str(tmp_path / "junk"), progress=False)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(settings=((64, 20),)), r"settings: \(L, n_kv\) = \(64, 20\).*num_kv_pairs=20 "
                                     r"needs seq_len >= 4 \* num_kv_pairs = 80"),
        (dict(settings=((64, 4),), vocab_size=48), r"vocab_size=48 must be > seq_len=64"),
        (dict(settings=((64,),)), r"settings: each entry is \(L, n_kv\)"),
        (dict(mixers=("qdelta", "lstm")), r"unknown mixer\(s\) \['lstm'\]; valid mixers are "
                                          r"qdelta, gated_qdelta, deltanet"),
        (dict(d_models=(15,)), r"d_models: each must be a positive multiple of num_heads=2"),
        (dict(lrs=(0.0,)), r"lrs must be > 0"),
        (dict(lrs=()), r"lrs must not be empty"),
        (dict(steps=0), r"steps must be an int >= 1"),
        (dict(seeds=(-1,)), r"seeds must be non-negative"),
        (dict(num_train=2), r"num_train=2 must be >= batch_size=4"),
    ],
)
def test_bad_grid_raises_value_error_naming_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        mqar.ExperimentConfig(**{**TINY, **overrides})


def test_parse_settings():
    assert mqar.parse_settings(["64:4", "128:8"]) == ((64, 4), (128, 8))
    for bad in ("64", "64:4:2", "a:4"):
        with pytest.raises(app.UsageError, match="--settings: expected L:n_kv pairs"):
            mqar.parse_settings([bad])


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--mixers=lstm"], r"unknown mixer\(s\) \['lstm'\]; valid mixers are qdelta"),
        (["--settings=64:40"], r"num_kv_pairs=40 needs seq_len >= 4 \* num_kv_pairs"),
        (["--settings=512:8"], r"vocab_size=256 must be > seq_len=512"),
        (["--settings=64"], r"--settings: expected L:n_kv pairs"),
        (["--lrs=fast"], r"--lrs: expected a comma-separated list of floats"),
    ],
)
def test_flags_report_bad_input_as_usage_errors(argv, match):
    fv = flags.FlagValues()
    mqar.define_flags(fv)
    fv(["mqar", *argv])
    with pytest.raises(app.UsageError, match=match):
        mqar.config_from_flags(fv)


def test_flags_default_and_full_configs():
    fv = flags.FlagValues()
    mqar.define_flags(fv)
    fv(["mqar", "--mixers=qdelta,softmax", "--settings=64:4", "--seeds=0,1"])
    cfg = mqar.config_from_flags(fv)
    assert cfg.mixers == ("qdelta", "softmax") and cfg.settings == ((64, 4),)
    assert cfg.seeds == (0, 1) and not cfg.is_paper_scale
    fv = flags.FlagValues()
    mqar.define_flags(fv)
    fv(["mqar", "--full"])
    full = mqar.config_from_flags(fv)
    assert full.is_paper_scale and full.settings == ((64, 4), (128, 8), (256, 16), (512, 64))
    assert full.d_models == (64, 128, 256) and len(full.lrs) == 4


@pytest.mark.slow
def test_cli_reports_a_bad_mixer_as_a_usage_error(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "experiments.mqar", f"--workdir={tmp_path}", "--mixers=lstm"],
        capture_output=True, text=True, cwd=Path(__file__).parents[2], timeout=120)
    assert out.returncode != 0
    assert "unknown mixer(s) ['lstm']; valid mixers are qdelta" in out.stderr
    assert not (tmp_path / "results.json").exists()
