"""`experiments.mass_expand`: tiny end-to-end run, resume, plots, MASS growth, bad input."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from experiments import mass_expand as me
from experiments.sweep import ResultsFile
from moejax import parallel

# A tiny sweep built so that MASS must grow: a drift threshold p < 0.99 fires on almost any
# gradient-norm history, the cosine gate (δ = 1) always passes, and expansion lasts the whole run.
TINY = dict(ks=(2,), routers=("top_p", "mass"), starts=("random",), seeds=(0,), steps=16,
            dense_steps=8, k_init=1, k_max=3, num_concepts=2, num_states=2, vocab_size=16,
            emission_support=2, seq_len=8, batch_size=4, val_batches=1, val_batch_size=4,
            d_model=8, d_ff=4, num_heads=1, head_dim=8, warmup_steps=2, warm_steps=2, window=3,
            p_threshold=0.99, cos_delta=1.0, expand_fraction=1.0, removal="none", log_every=4,
            eval_every=4)


def test_mass_end_to_end_grows_resumes_and_plots(tmp_path, monkeypatch):
    """One real MASS run (one compilation), then a rerun that must train only the new cell."""
    cfg = me.ExperimentConfig(**{**TINY, "routers": ("mass",)})
    out = me.run(cfg, str(tmp_path), progress=False)
    (mass,) = out["cells"]
    assert (mass["start"], mass["router"], mass["num_experts"], mass["seed"]) == (
        "random", "mass", 3, 0)
    for name in ("results.json", me.PLOT_LOSS, me.PLOT_TRAJ, me.PLOT_CURVES):
        assert (tmp_path / name).stat().st_size > 0
    run_dir = tmp_path / "runs" / "random_mass_K3_seed0"
    assert (run_dir / "metrics.jsonl").exists() and (run_dir / "tensorboard").is_dir()
    assert mass["final_k"] > cfg.k_init and mass["final_k"] <= cfg.k_max  # it grew
    assert mass["n_clones"] >= 1 and mass["clone_steps"]
    ks = [t["k"] for t in mass["trajectory"]]
    assert ks[0] == cfg.k_init and ks[-1] == mass["final_k"] and ks == sorted(ks)
    assert all(t["avg_k"] >= 1 for t in mass["trajectory"])
    assert [p["step"] for p in mass["val_curve"]] == [4, 8, 12, 16]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["experiment"] == "mass_expand"
    assert saved["summary"]["starts"]["random"]["mass"]["final_k"]["n"] == 1

    calls = []

    def fake_cell(start, router, k, seed, cfg, workdir, **_):
        calls.append((start, router, k, seed))
        return {**mass, "seed": seed}

    monkeypatch.setattr(me, "train_cell", fake_cell)
    again = me.run(dataclasses.replace(cfg, seeds=(0, 1)), str(tmp_path), progress=False)
    assert calls == [("random", "mass", 3, 1)]  # seed 0 was done: skipped
    assert len(again["cells"]) == 2
    assert again["summary"]["starts"]["random"]["mass"]["final_k"]["n"] == 2


def test_upcycled_params_take_the_dense_model_and_copy_its_ffn():
    cfg = me.ExperimentConfig(**TINY)
    dense, _ = me.lm.init(jax.random.key(0), cfg.lm_config("dense", 0))
    moe, _ = me.lm.init(jax.random.key(1), cfg.lm_config("top_p", 3))
    out = me.upcycled_params(moe, dense, cfg.num_layers)
    ffn, bank = dense["blocks"][0]["ffn"], out["blocks"][0]["ffn"]
    for name in ("w_gate", "w_up", "w_down"):
        for e in range(3):
            np.testing.assert_array_equal(bank["experts"][name][e], ffn[name])
    np.testing.assert_array_equal(bank["router"]["w_g"], moe["blocks"][0]["ffn"]["router"]["w_g"])
    rest = lambda p: {k: v for k, v in p.items() if k != "blocks"} | {  # noqa: E731
        "block": {k: v for k, v in p["blocks"][0].items() if k != "ffn"}}
    jax.tree.map(np.testing.assert_array_equal, rest(out), rest(dense))  # all else: dense


@pytest.mark.slow  # two compilations (dense + MoE)
def test_upcycled_start_copies_the_dense_ffn_into_every_expert(tmp_path, monkeypatch):
    """The dense LM is trained once per seed and kept; the MoE starts from all its weights with
    every expert slot its FFN (so the fixed-K model's first loss is the dense model's)."""
    cfg = me.ExperimentConfig(**{**TINY, "routers": ("top_p",), "starts": ("upcycled",)})
    seen = {}
    real_fit = me.loop.fit

    def spy_fit(state, data, **kw):
        if kw["model_cfg"].ffn == "moe":
            seen["params"] = jax.device_get(state.params)
        return real_fit(state, data, **kw)

    monkeypatch.setattr(me.loop, "fit", spy_fit)
    (cell,) = me.run(cfg, str(tmp_path), progress=False)["cells"]
    dense = me.dense_start(cfg, 0, str(tmp_path))  # from the file now
    assert (tmp_path / "dense" / "seed0.pkl").exists()
    ffn, bank = dense["params"]["blocks"][0]["ffn"], seen["params"]["blocks"][0]["ffn"]["experts"]
    for name in ("w_gate", "w_up", "w_down"):
        for e in range(2):
            np.testing.assert_array_equal(bank[name][e], ffn[name])
    np.testing.assert_array_equal(seen["params"]["embed"], dense["params"]["embed"])
    assert cell["start"] == "upcycled" and cell["dense_val_loss"] == dense["val_loss"]


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
    for a, b in zip(one["val_curve"], two["val_curve"], strict=True):
        assert b == pytest.approx(a, rel=1e-4)
    for k in ("val_loss", "val_avg_k", "train_loss"):
        assert two[k] == pytest.approx(one[k], rel=1e-4), k
    for a, b in zip(one["trajectory"], two["trajectory"], strict=True):
        assert b == pytest.approx(a, rel=1e-4)
    with pytest.raises(ValueError, match="mass K=3: batch_size=4 is not divisible by the batch "
                                         "axes data×fsdp = 8"):
        me.run(cfg, str(tmp_path / "bad"), progress=False, mesh=parallel.make_mesh(8))
    assert not (tmp_path / "bad").exists()


def _fake_cell(router, k, seed, loss, avg_k, final_k=None, start="random"):
    cell = {"start": start, "router": router, "num_experts": k, "seed": seed, "val_loss": loss,
            "val_avg_k": avg_k, "final_k": float(final_k or k),
            "val_curve": [{"step": s, "val_loss": loss + 1.0 / s} for s in (100, 200, 300, 400,
                                                                           500)]}
    if router == "mass":
        cell.update(n_clones=6, n_removed=1, clone_steps=[40, 50], trajectory=[
            {"step": 1, "k": 8.0, "avg_k": 1.0}, {"step": 50, "k": float(final_k),
                                                 "avg_k": avg_k}])
    return cell


def test_summary_comparisons_and_plots(tmp_path):
    cfg = me.ExperimentConfig(ks=(8, 12, 16), seeds=(0, 1, 2, 3, 4), starts=("random",))
    loss = {8: 2.30, 12: 2.10, 16: 2.05}
    noise = (-0.01, 0.0, 0.01, 0.005, -0.004)
    cells = []
    for seed, eps in enumerate(noise):
        for k, v in loss.items():
            cells.append(_fake_cell("top_p", k, seed, v + eps, 1.3 + 0.01 * k))
        # MASS: 0.1 below fixed K = 8 on every seed, level with K = 16 (±0.001), 11-13 experts.
        cells.append(_fake_cell("mass", 16, seed, 2.05 + eps + (0.001 if seed % 2 else -0.001),
                                1.35, final_k=11 + seed % 3))
    s = me.summarize(cells, cfg)
    r = s["starts"]["random"]
    assert r["best_k"] == 16
    assert r["curves"]["top_p"]["12"]["val_loss"]["mean"] == pytest.approx(2.1 + np.mean(noise))
    assert r["mass"]["final_k"]["mean"] == pytest.approx(np.mean([11, 12, 13, 11, 12]))
    c = r["compare"]
    assert c["C1"]["verdict"] == "reproduced" and c["C1"]["signs"] == ["-"] * 5
    assert c["C2"]["verdict"] == "not separated"
    assert c["C3"]["verdict"] == "reproduced" and c["C4"]["verdict"] == "reproduced"
    assert r["near_best_k"]  # |log2(11.8 / 16)| < 0.5
    cv = r["convergence"]
    assert cv["plateaued"] is False and len(cv["per_seed_plateaued"]) == 5  # 1/s still falls
    worse = [dict(c, val_loss=c["val_loss"] + 0.3) if c["router"] == "mass" else c
             for c in cells]
    assert me.summarize(worse, cfg)["starts"]["random"]["compare"]["C2"]["verdict"] == "opposite"
    me.plot_loss(cells, s, cfg, str(tmp_path / "loss.png"))
    me.plot_trajectory(cells, cfg, str(tmp_path / "traj.png"))
    me.plot_curves(cells, cfg, str(tmp_path / "curves.png"))
    for name in ("loss.png", "traj.png", "curves.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_defaults_follow_the_authors():
    cfg = me.ExperimentConfig()
    e = cfg.expansion_config()
    assert (e.k_init, e.k_max, e.expand_fraction, e.p_threshold, e.removal_patience,
            e.redundancy_weight) == (8, 16, 0.1, 0.01, 3, 0.01)
    assert (e.statistic, e.alignment, e.removal, e.cos_leaves, e.source) == (
        "authors", "once", "authors", "fc1", "first")
    assert e.t_warm == max(30, int(0.05 * cfg.steps)) and e.omega == max(60, int(0.09 * cfg.steps))
    # δ: the authors' 1e-3 at 4096·1024 fc1 weights, scaled to 2·d_model·d_ff.
    assert cfg.delta() == pytest.approx(1e-3 * np.sqrt(4096 * 1024 / (2 * 32 * 16)))
    assert me.ExperimentConfig(cos_delta=0.01).delta() == 0.01
    moe = cfg.lm_config("top_p", 8).moe
    assert dict(moe.router_kwargs) == {"top_p": 0.5, "renormalize": True}
    assert len(cfg.seeds) >= 5 and cfg.starts == ("random", "upcycled")


@pytest.mark.slow
def test_full_tiny_sweep_all_routers(tmp_path):
    """All routers and both starts trained for real (several compilations: minutes)."""
    cfg = me.ExperimentConfig(**{**TINY, "routers": me.ROUTERS, "starts": me.STARTS})
    out = me.run(cfg, str(tmp_path), progress=False)
    assert {(c["start"], c["router"], c["num_experts"]) for c in out["cells"]} == {
        (s, r, k) for s in me.STARTS for r, k in (("topk", 2), ("top_p", 2), ("mass", 3))}
    topk = next(c for c in out["cells"] if c["router"] == "topk")
    assert topk["val_avg_k"] == pytest.approx(2.0)
    assert "compare" in out["summary"]["starts"]["upcycled"]


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
    (dict(confidence=1.0), "confidence"),
    (dict(alignment="never"), "alignment"),
    (dict(removal="off"), "removal"),
    (dict(starts=("pretrained",)), "starts"),
    (dict(renormalize=1), "renormalize"),
    (dict(dense_steps=0), "dense_steps"),
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
