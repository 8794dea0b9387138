"""`experiments/mqar.py` end to end on a tiny setting: results.json, per-cell metrics, the plot,
resume (a rerun trains only the missing cells) and the errors for bad grids and foreign workdirs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from absl import app, flags

from experiments import mqar
from experiments.sweep import ResultsFile
from moejax import parallel

# L=16 with 2 pairs, V=32, d=16: a couple of seconds of compile per mixer (softmax compiles
# fastest; the Q-Delta-vs-DeltaNet bookkeeping is checked on synthetic cells below).
TINY = dict(mixers=("qdelta", "softmax"), d_models=(16,), settings=((16, 2),), lrs=(1e-2,),
            seeds=(0,), steps=2, batch_size=4, vocab_size=32, num_train=8, num_eval=8,
            log_every=1, eval_every=1)


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
        assert {"loss", "acc", "lr", "grad_norm", "val_acc"} <= set(records[0])
        assert "test_acc" in records[-1]
        assert c["curve_steps"] == [1, 2]  # the learning curve: val acc every eval_every steps
        assert c["curve_val_acc"] == [records[0]["val_acc"], records[1]["val_acc"]]
        assert any((tmp_path / c["metrics"] / "tensorboard").iterdir())
    rows = saved["summary"]["best_lr"]
    assert {r["mixer"] for r in rows} == {"qdelta", "softmax"}
    assert rows[0]["by_lr"] == {"0.01": rows[0]["test_acc"]}
    assert rows[0]["curve_steps"] == [1, 2] and "plateaued" in rows[0]["plateau"]
    assert saved["summary"]["chance"] == pytest.approx(1 / 16)
    assert saved["summary"]["claims"] == []  # no DeltaNet in this sweep
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


def test_a_diverging_cell_is_recorded_with_accuracy_zero(tmp_path, monkeypatch):
    """A too-large lr (non-finite loss) does not stop the sweep: the cell has `diverged`."""
    def fit(*args, **kwargs):
        raise FloatingPointError("non-finite loss (nan) at step 2")

    monkeypatch.setattr(mqar.loop, "fit", fit)
    res = mqar.run(mqar.ExperimentConfig(**{**TINY, "mixers": ("softmax",)}), str(tmp_path),
                   progress=False)
    (cell,) = res["cells"]
    assert cell["diverged"].startswith("non-finite loss") and cell["test_acc"] == 0.0
    assert res["summary"]["best_lr"][0]["curve_steps"] == []


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


def _cell(mixer, lr, val, test, seed=0, curve=(0.1, 0.5, 0.9, 0.9, 0.9, 0.9)):
    return dict(mixer=mixer, d_model=64, seq_len=64, num_kv_pairs=4, lr=lr, seed=seed,
                val_acc=val, test_acc=test, curve_steps=[100, 200, 300, 400, 500, 600],
                curve_val_acc=list(curve))


def test_summary_picks_the_lr_on_val_and_reports_test():
    cells = [_cell("qdelta", 1e-3, 0.5, 0.9), _cell("qdelta", 1e-2, 0.6, 0.4),
             _cell("deltanet", 1e-3, 0.7, 0.7), _cell("deltanet", 1e-3, 0.9, 0.5, seed=1,
                                                      curve=(0.1, 0.3, 0.5, 0.7, 0.8, 0.9)),
             _cell("gated_deltanet", 1e-2, 0.2, 0.3), _cell("softmax", 1e-2, 1.0, 1.0)]
    rows = {r["mixer"]: r for r in mqar.summarize(cells)}
    assert list(rows) == ["qdelta", "deltanet", "gated_deltanet", "softmax"]  # MIXERS order
    assert rows["qdelta"]["best_lr"] == 1e-2 and rows["qdelta"]["test_acc"] == 0.4
    assert rows["qdelta"]["by_lr"] == {"0.001": 0.9, "0.01": 0.4}
    assert rows["deltanet"]["test_acc"] == pytest.approx(0.6)  # mean over seeds
    assert rows["deltanet"]["n_seeds"] == 2
    assert rows["deltanet"]["test_acc_std"] == pytest.approx(0.1)
    assert rows["deltanet"]["test_acc_by_seed"] == {"0": 0.7, "1": 0.5}
    # Two seeds: t(0.975, 1) = 12.706, sd = 0.1414 → half = 12.706 · 0.1414 / √2 = 1.2706.
    assert rows["deltanet"]["test_interval"]["half"] == pytest.approx(1.2706, rel=1e-3)
    # Mean curve: still rising over the last 20 % (steps 500, 600: best 0.9 against 0.8 before).
    assert rows["deltanet"]["curve_val_acc"] == pytest.approx([0.1, 0.4, 0.7, 0.8, 0.85, 0.9])
    assert rows["deltanet"]["plateau"]["plateaued"] is False
    assert rows["deltanet"]["plateau"]["last_change"] == pytest.approx(0.125)
    assert "| qdelta | 64 | 64 | 4 | 0.01 | 1 | 0.400 ± n/a | 0.600 | yes |" in mqar.format_table(
        list(rows.values()))


def test_claim_pairs_gated_qdelta_with_gated_deltanet_per_seed():
    """Each mixer at its own best lr, paired by seed; the verdict is `stats.compare`'s; ungated
    Q-Delta is compared with DeltaNet apart."""
    gq = [0.80, 0.85, 0.90, 0.88, 0.86]
    gd = [0.70, 0.72, 0.75, 0.74, 0.69]
    cells = [_cell("gated_qdelta", 3e-3, 0.9, a, seed=i) for i, a in enumerate(gq)]
    cells += [_cell("gated_qdelta", 1e-2, 0.1, 0.1, seed=i) for i in range(5)]  # worse on val
    cells += [_cell("gated_deltanet", 1e-2, 0.8, b, seed=i) for i, b in enumerate(gd)]
    cells += [_cell("qdelta", 1e-2, 0.5, 0.5, seed=i) for i in range(3)]
    cells += [_cell("deltanet", 1e-2, 0.5, 0.6 + 0.01 * i, seed=i) for i in range(3)]
    claims = mqar.claim_check(mqar.summarize(cells))
    assert [(c["qdelta_mixer"], c["baseline"]) for c in claims] == [
        ("gated_qdelta", "gated_deltanet"), ("qdelta", "deltanet")]
    g, u = claims
    assert (g["qdelta_lr"], g["baseline_lr"], g["seeds"]) == (3e-3, 1e-2, [0, 1, 2, 3, 4])
    diff = np.subtract(gq, gd)
    half = 2.776445 * diff.std(ddof=1) / np.sqrt(5)  # t(0.975, 4)
    assert g["difference"]["mean"] == pytest.approx(diff.mean())
    assert g["difference"]["half"] == pytest.approx(half, rel=1e-4)
    assert g["difference"]["signs"] == ["+"] * 5 and g["verdict"] == "reproduced"
    assert g["baseline_plateau"]["plateaued"] is True  # flat at 0.9 over the last 20 %
    assert u["seeds"] == [0, 1, 2] and u["verdict"] == "opposite"
    assert u["difference"]["signs"] == ["-", "-", "-"]
    text = mqar.format_claims(claims)
    assert "gated_qdelta (lr 0.003)" in text and "-> reproduced" in text


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
        (dict(num_eval=2), r"num_eval=2 must be >= batch_size=4"),
        (dict(eval_every=-1), r"eval_every must be an int >= 0"),
        (dict(init_std=0.0), r"init_std must be in"),
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
    assert full.mixers == mqar.MIXERS


def test_default_controls_and_init_flags():
    """Default: the authors' gated pair, 5 seeds, N(0, 0.02²) init; --controls: the issue's
    controls; --init_std=fan_in: the fan-in init."""
    fv = flags.FlagValues()
    mqar.define_flags(fv)
    fv(["mqar"])
    cfg = mqar.config_from_flags(fv)
    assert cfg.mixers == ("gated_qdelta", "gated_deltanet") and len(cfg.seeds) >= 5
    assert cfg.lrs == (1e-2,) and cfg.steps == 2000 and cfg.settings == ((32, 4),)
    assert cfg.eval_every > 0 and cfg.ffn == "dense"
    assert cfg.init_std == 0.02 and cfg.model("gated_qdelta", 64, 64).init_std == 0.02
    fv = flags.FlagValues()
    mqar.define_flags(fv)
    fv(["mqar", "--controls", "--init_std=fan_in", "--seeds=0,1"])
    ctl = mqar.config_from_flags(fv)
    assert ctl.d_models == (64, 128) and ctl.settings == ((64, 4), (128, 8))
    assert set(ctl.mixers) == {"qdelta", "gated_qdelta", "deltanet", "gated_deltanet"}
    assert ctl.lrs == (1e-3, 3.16e-3, 1e-2) and ctl.seeds == (0, 1)
    assert ctl.init_std is None and ctl.model("deltanet", 64, 64).init_std is None
    for argv, match in ((["--controls", "--full"], "two presets"),
                        (["--init_std=big"], "--init_std: expected")):
        fv = flags.FlagValues()
        mqar.define_flags(fv)
        fv(["mqar", *argv])
        with pytest.raises(app.UsageError, match=match):
            mqar.config_from_flags(fv)


@pytest.mark.slow
def test_cli_reports_a_bad_mixer_as_a_usage_error(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "experiments.mqar", f"--workdir={tmp_path}", "--mixers=lstm"],
        capture_output=True, text=True, cwd=Path(__file__).parents[2], timeout=120)
    assert out.returncode != 0
    assert "unknown mixer(s) ['lstm']; valid mixers are qdelta" in out.stderr
    assert not (tmp_path / "results.json").exists()
