"""`experiments.star_shift` end to end on a tiny setting, and its input checks."""

import json

import numpy as np
import pytest

from experiments import hmm_common as hc
from experiments import star_shift as ss
from experiments.sweep import ResultsFile
from moejax import parallel
from moejax.data import hmm

TINY = dict(model=hc.ModelSpec(d_model=16, num_layers=1, num_heads=1, head_dim=8, d_ff=16,
                               num_experts=4),
            train=hc.TrainSpec(steps=4, batch_size=4, warmup_steps=1),
            hmm=hmm.HMMConfig(seq_len=16, num_concepts=2, num_states=4, vocab_size=16,
                              emission_support=4))


def tiny(**kw) -> ss.ExperimentConfig:
    return ss.ExperimentConfig(**{**TINY, "seeds": (0,), "shifts": (0.0, 1.0), "eta": 5e-5,
                                  "tta_etas": (5e-3,), "baseline": "topk", "stream_batches": 3,
                                  "eval_every": 2,
                                  "stream_batch_size": 4, "heldout_batches": 2,
                                  "heldout_batch_size": 4, **kw})


@pytest.mark.slow  # ~15 s of compiles (two trainings, three eval modes); `make test-slow`
def test_end_to_end_then_rerun_skips_done_cells(tmp_path, monkeypatch):
    cfg = tiny()
    out = ss.run(cfg, str(tmp_path), progress=False)
    cells = {(c["variant"], c["shift"]): c for c in out["cells"] if c.get("kind") != "training"}
    curves = {c["model"]: c["curve"] for c in out["cells"] if c.get("kind") == "training"}
    assert set(curves) == {"star", "topk"} and curves["star"]["step"] == [0, 2, 4]
    assert set(cells) == {(v, lam) for v in ("topk_frozen", "star_frozen", "star_tta_eta0.005")
                          for lam in (0.0, 1.0)}
    for lam in (0.0, 1.0):
        frozen, tta = cells["star_frozen", lam], cells["star_tta_eta0.005", lam]
        assert frozen["v_shift"] == 0.0 and frozen["after"] == frozen["before"]
        assert tta["v_shift"] > 0  # the test-time pass moved V ...
        assert tta["before"] == frozen["before"]  # ... starting from the same trained model
    # shifted tokens are harder for a model trained on λ = 0
    assert (cells["topk_frozen", 1.0]["before"]["val_loss"]
            != cells["topk_frozen", 0.0]["before"]["val_loss"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["experiment"] == "star_shift" and len(saved["cells"]) == 6 + 2  # + training
    summary = saved["summary"]
    assert set(summary["variants"]) == {"topk_frozen", "star_frozen", "star_tta_eta0.005"}
    assert summary["training"]["star"]["step"] == [0, 2, 4]
    assert summary["plateau"]["model"] in ("star", "topk")
    d = summary["variants"]["star_tta_eta0.005"]["1"]["delta_vs_star_frozen"]
    assert d["n"] == 1 and d["verdict"] == "not separated"  # one seed: no interval
    assert (tmp_path / ss.PLOT).stat().st_size > 0

    monkeypatch.setattr(ss.hc, "train", lambda *a, **k: pytest.fail("retrained a done seed"))
    again = ss.run(cfg, str(tmp_path), progress=False)
    assert again["cells"] == out["cells"]


def test_test_time_pass_updates_only_router_state():
    h = TINY["hmm"]  # the configs and shapes of the end-to-end test: its compilations are reused
    frozen = hc.lm_config("star", TINY["model"], h, eta=5e-5)
    tta = hc.lm_config("star", TINY["model"], h, eta=5e-3, test_time_update=True)
    ts = hc.init_state(frozen, TINY["train"], h.seq_len, seed=0)
    params, state = ts.params, ts.model_state
    batch = hc.batches(h, split="test", seed=0, batch_size=4, num_batches=2)
    ev = hc.evaluate(params, state, tta, batch, num_labels=h.num_labels, update_state=True)
    v0 = np.asarray(state["blocks"][0]["router"]["v"])
    v1 = np.asarray(ev["model_state"]["blocks"][0]["router"]["v"])
    assert np.abs(v1 - v0).max() > 0
    np.testing.assert_allclose(np.linalg.norm(v1, axis=1), 1.0, atol=1e-5)  # unit rows
    ev_frozen = hc.evaluate(params, state, frozen, batch, num_labels=h.num_labels,
                            update_state=True)
    np.testing.assert_array_equal(ev_frozen["model_state"]["blocks"][0]["router"]["v"], v0)


def test_a_two_device_mesh_gives_the_one_device_results(tmp_path):
    """`eval_cells` (frozen STAR and test-time updates) of a STAR model on a 2-device data mesh,
    as `run(mesh=)` does it (what `--mesh=data:2` builds on two devices), matches one device, at
    λ = 1 of the smoke setting (the model fresh from `init_state`, whose init and eval compiles
    the test above shares: training on a mesh, `hc.train(mesh=)`, is checked in
    test_routing_hmm); a mesh the batch does not split over is refused before anything is
    written."""
    cfg = tiny(shifts=(1.0,))
    star = hc.lm_config("star", cfg.model, cfg.hmm, eta=cfg.eta)
    cells = {}
    for name, mesh in (("one", None), ("two", parallel.make_mesh(2))):
        trained = {"star": hc.init_state(star, cfg.train, cfg.hmm.seq_len, 0, mesh=mesh)}
        cells[name] = ss.eval_cells(0, 1.0, trained, cfg, {"star_tta_eta0.005"}, mesh=mesh)
    (one,), (two,) = cells["one"], cells["two"]
    assert one["v_shift"] > 0 and two["v_shift"] == pytest.approx(one["v_shift"], rel=1e-4)
    for part in ("stream", "before", "after"):
        for k, v in one[part].items():
            assert two[part][k] == pytest.approx(v, rel=1e-4, abs=1e-6), (part, k)
    with pytest.raises(ValueError, match="star: batch_size=4 is not divisible by the batch axes "
                                         "data×fsdp = 8"):
        ss.run(cfg, str(tmp_path / "bad"), progress=False, mesh=parallel.make_mesh(8))
    assert not (tmp_path / "bad").exists()


def test_summary_pairs_tta_with_frozen_star_per_seed():
    def cell(variant, seed, loss, lam=1.0):
        ev = {m: 0.0 for m in ss.METRICS} | {"val_loss": loss}
        return {"variant": variant, "seed": seed, "shift": lam, "stream": ev, "before": ev,
                "after": ev, "v_shift": 0.0}

    cells = [*(cell("star_frozen", s, v) for s, v in enumerate([5.0, 5.1, 5.2, 5.0, 5.3])),
             *(cell("star_tta_eta0.005", s, v) for s, v in enumerate([4.9, 5.0, 5.1, 4.95,
                                                                      5.2])),
             *(cell("topk_frozen", s, 5.0) for s in range(5))]
    s = ss.summarize(cells)["variants"]["star_tta_eta0.005"]["1"]
    d = s["delta_vs_star_frozen"]
    assert d["signs"] == ["-"] * 5 and d["diff_mean"] == pytest.approx(-0.09)
    assert d["verdict"] == "reproduced" and d["hi"] < 0
    assert s["delta_vs_topk_frozen"]["signs"] == ["-", "0", "+", "-", "+"]


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="eta"):
        tiny(eta=0.0)
    with pytest.raises(ValueError, match="eta"):
        tiny(tta_etas=(5e-5, -1.0))
    with pytest.raises(ValueError, match="valid routers: topk_switch, topk"):
        tiny(baseline="topq")
    with pytest.raises(ValueError, match="other than 'star'"):
        tiny(baseline="star")
    with pytest.raises(ValueError, match="shift"):
        tiny(shifts=(0.0, 1.5))
    with pytest.raises(ValueError, match="recipe"):
        tiny(recipe="paper")
    ResultsFile(tmp_path, "routing_hmm", fixed={}).write()
    with pytest.raises(ValueError, match="experiment 'routing_hmm', not 'star_shift'"):
        ss.run(tiny(), str(tmp_path), progress=False)
