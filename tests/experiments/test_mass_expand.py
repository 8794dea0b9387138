"""`experiments.mass_expand`: tiny end-to-end run, resume, plots, MASS growth, bad input."""

import dataclasses
import json

import pytest

from experiments import mass_expand as me
from experiments.sweep import ResultsFile
from moejax import parallel

# A tiny sweep built so that MASS must grow: a drift threshold p < 0.99 fires on almost any
# gradient-norm history, the cosine gate (δ = 1) always passes, and expansion lasts the whole run.
TINY = dict(ks=(2,), routers=("topk", "mass"), seeds=(0,), steps=16, k_init=1, k_max=3,
            num_concepts=2, num_states=2, vocab_size=16, emission_support=2, seq_len=8,
            batch_size=4, val_batches=1, val_batch_size=4, d_model=8, d_ff=4, num_heads=1,
            head_dim=8, warmup_steps=2, warm_steps=2, window=3, p_threshold=0.99, cos_delta=1.0,
            expand_fraction=1.0, removal=False, log_every=4)


def test_mass_end_to_end_grows_resumes_and_plots(tmp_path, monkeypatch):
    """One real MASS run (one compilation), then a rerun that must train only the new cell."""
    cfg = me.ExperimentConfig(**{**TINY, "routers": ("mass",)})
    out = me.run(cfg, str(tmp_path), progress=False)
    (mass,) = out["cells"]
    assert (mass["router"], mass["num_experts"], mass["seed"]) == ("mass", 3, 0)
    for name in ("results.json", me.PLOT_LOSS, me.PLOT_TRAJ):
        assert (tmp_path / name).stat().st_size > 0
    run_dir = tmp_path / "runs" / "mass_K3_seed0"
    assert (run_dir / "metrics.jsonl").exists() and (run_dir / "tensorboard").is_dir()
    assert mass["final_k"] > cfg.k_init and mass["final_k"] <= cfg.k_max  # it grew
    assert mass["n_clones"] >= 1 and mass["clone_steps"]
    ks = [t["k"] for t in mass["trajectory"]]
    assert ks[0] == cfg.k_init and ks[-1] == mass["final_k"] and ks == sorted(ks)
    assert all(t["avg_k"] >= 1 for t in mass["trajectory"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["experiment"] == "mass_expand"
    assert saved["summary"]["mass"]["final_k"]["n"] == 1

    calls = []

    def fake_cell(router, k, seed, cfg, workdir, **_):
        calls.append((router, k, seed))
        return {**mass, "seed": seed}

    monkeypatch.setattr(me, "train_cell", fake_cell)
    again = me.run(dataclasses.replace(cfg, seeds=(0, 1)), str(tmp_path), progress=False)
    assert calls == [("mass", 3, 1)]  # seed 0 was done: skipped
    assert len(again["cells"]) == 2 and again["summary"]["mass"]["final_k"]["n"] == 2


def test_a_two_device_mesh_gives_the_one_device_results(tmp_path, monkeypatch):
    """The smoke test's MASS run on a 2-device data mesh (`run(mesh=)`, what `--mesh=data:2`
    builds on two devices: the expansion hooks and their evaluation on the mesh) grows and
    scores as on one device; a mesh the batch does not split over is refused before anything
    is written."""
    for name in ("plot_loss", "plot_trajectory"):  # drawn by the smoke test above
        monkeypatch.setattr(me, name, lambda *a, **k: None)
    cfg = me.ExperimentConfig(**{**TINY, "routers": ("mass",)})
    cells = {name: me.run(cfg, str(tmp_path / name), progress=False, mesh=mesh)["cells"]
             for name, mesh in (("one", None), ("two", parallel.make_mesh(2)))}
    (one,), (two,) = cells["one"], cells["two"]
    for k in ("final_k", "n_clones", "n_removed", "clone_steps", "active"):
        assert two[k] == one[k], k
    for k in ("val_loss", "val_avg_k", "train_loss"):
        assert two[k] == pytest.approx(one[k], rel=1e-4), k
    for a, b in zip(one["trajectory"], two["trajectory"], strict=True):
        assert b == pytest.approx(a, rel=1e-4)
    with pytest.raises(ValueError, match="mass K=3: batch_size=4 is not divisible by the batch "
                                         "axes data×fsdp = 8"):
        me.run(cfg, str(tmp_path / "bad"), progress=False, mesh=parallel.make_mesh(8))
    assert not (tmp_path / "bad").exists()


def _fake_cell(router, k, seed, loss, avg_k, final_k=None):
    cell = {"router": router, "num_experts": k, "seed": seed, "val_loss": loss,
            "val_avg_k": avg_k, "final_k": float(final_k or k)}
    if router == "mass":
        cell.update(n_clones=6, n_removed=1, trajectory=[
            {"step": 1, "k": 2.0, "avg_k": 1.0}, {"step": 50, "k": float(final_k),
                                                 "avg_k": avg_k}])
    return cell


def test_summary_elbow_verdict_and_plots(tmp_path):
    cfg = me.ExperimentConfig(ks=(2, 4, 8, 16), seeds=(0, 1))
    loss = {2: 3.0, 4: 2.3, 8: 2.05, 16: 2.0}
    cells = []
    for seed, noise in ((0, -0.01), (1, 0.01)):
        for k, v in loss.items():
            cells.append(_fake_cell("topk", k, seed, v + noise, 2.0))
            cells.append(_fake_cell("top_p", k, seed, v + 0.02 + noise, 1.3))
        cells.append(_fake_cell("mass", 24, seed, 2.04 + noise, 1.4, final_k=7 + seed))
    s = me.summarize(cells, cfg)
    assert s["elbow"]["topk"]["k"] == 8 and s["elbow"]["top_p"]["k"] == 8
    assert s["curves"]["topk"]["4"]["val_loss"] == {"mean": pytest.approx(2.3),
                                                    "std": pytest.approx(0.01), "n": 2}
    assert s["mass"]["final_k"]["mean"] == pytest.approx(7.5)
    v = s["verdict"]
    assert v["near_elbow"] and v["loss_equal_or_better"] and v["fewer_experts_per_token"]
    assert v["claim_holds"]
    worse = [dict(c, val_loss=2.5) if c["router"] == "mass" else c for c in cells]
    assert not me.summarize(worse, cfg)["verdict"]["claim_holds"]
    me.plot_loss(cells, s, str(tmp_path / "loss.png"))
    me.plot_trajectory(cells, cfg, str(tmp_path / "traj.png"))
    assert (tmp_path / "loss.png").stat().st_size > 0 and (tmp_path / "traj.png").stat().st_size


@pytest.mark.slow
def test_full_tiny_sweep_all_routers(tmp_path):
    """All three routers trained for real (three compilations: minutes on a loaded CPU)."""
    cfg = me.ExperimentConfig(**{**TINY, "routers": me.ROUTERS})
    out = me.run(cfg, str(tmp_path), progress=False)
    assert {(c["router"], c["num_experts"]) for c in out["cells"]} == {
        ("topk", 2), ("top_p", 2), ("mass", 3)}
    topk = next(c for c in out["cells"] if c["router"] == "topk")
    assert topk["val_avg_k"] == pytest.approx(2.0)
    assert "verdict" in out["summary"] and (tmp_path / me.PLOT_LOSS).exists()


def test_elbow_rule():
    curve = {2: 3.0, 4: 2.2, 8: 2.05, 16: 2.01, 24: 2.0}  # drop 1.0; 90% reached at K = 8
    assert me.elbow(curve, 0.9) == 8
    assert me.elbow(curve, 1.0) == 24
    assert me.elbow({2: 1.0, 4: 1.1}, 0.9) == 2  # no drop: the smallest K


@pytest.mark.parametrize("over, field", [
    (dict(ks=(0, 4)), "ks"),
    (dict(ks=()), "ks"),
    (dict(ks=(2, 2)), "ks"),
    (dict(k_init=5, k_max=4), "k_init"),
    (dict(k_init=0), "k_init"),
    (dict(routers=("topk", "expert_choice")), "routers"),
    (dict(seeds=(-1,)), "seeds"),
    (dict(steps=0), "steps"),
    (dict(cos_delta=2.0), "cos_delta"),
    (dict(top_p=0.0), "top_p"),
    (dict(elbow_fraction=0.0), "elbow_fraction"),
    (dict(projection="never"), "projection"),
])
def test_bad_config_names_the_field(over, field):
    with pytest.raises(ValueError, match=field):
        me.ExperimentConfig(**over)


def test_refuses_foreign_and_mismatched_workdirs(tmp_path):
    cfg = me.ExperimentConfig(**TINY)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="not a mass_expand sweep"):
        me.run(cfg, str(tmp_path / "foreign"), progress=False)
    ResultsFile(tmp_path / "other", "routing_hmm", fixed={}).write()
    with pytest.raises(ValueError, match="experiment 'routing_hmm'"):
        me.run(cfg, str(tmp_path / "other"), progress=False)
    ResultsFile(tmp_path / "mine", "mass_expand", fixed=cfg.fixed()).write()
    changed = dataclasses.replace(cfg, steps=cfg.steps + 1)
    with pytest.raises(ValueError, match="steps"):
        me.run(changed, str(tmp_path / "mine"), progress=False)
