"""`experiments.routing_hmm` end to end on a tiny setting, its input checks, the paired
comparisons of its summary, and the metric / config plumbing of `experiments.hmm_common`."""

import json
import math

import numpy as np
import pytest

from experiments import hmm_common as hc
from experiments import routing_hmm as rh
from experiments import stats
from experiments.sweep import ResultsFile
from moejax import parallel
from moejax.data import hmm

TINY = dict(model=hc.ModelSpec(d_model=16, num_layers=1, num_heads=1, head_dim=8, d_ff=16,
                               num_experts=4),
            train=hc.TrainSpec(steps=4, batch_size=4, warmup_steps=1),
            hmm=hmm.HMMConfig(seq_len=16, num_concepts=2, num_states=4, vocab_size=16,
                              emission_support=4))


def tiny(**kw) -> rh.ExperimentConfig:
    return rh.ExperimentConfig(**{**TINY, "routers": ("star",), "etas": (5e-5,), "seeds": (0,),
                                  "recipes": ("synthetic",), "data": ("overlap",),
                                  "eval_every": 2, "val_batches": 2, "val_batch_size": 4, **kw})


def test_end_to_end_then_rerun_skips_done_cells(tmp_path, monkeypatch):
    cfg = tiny()
    out = rh.run(cfg, str(tmp_path), progress=False)
    (cell,) = out["cells"]
    assert cell["router"] == "star_eta5e-05" and cell["curve"]["step"] == [0, 2, 4]
    assert (cell["data"], cell["recipe"]) == ("overlap", "synthetic")
    assert cell["curve"]["flip_rate"][0] is None and cell["curve"]["flip_rate"][1] is not None
    f = cell["final"]
    assert 0 <= f["mi"] <= math.log(4) + 1e-6 and 0 <= f["load_entropy"] <= 1 + 1e-6
    assert f["v_drift"] > 0  # GHA moved STAR's subspace during training
    assert np.asarray(cell["joint"]).shape == (1, 4, 8)  # [L, E, C·S]
    assert np.asarray(cell["joint"]).sum() == 2 * 4 * 16  # every val token counted once
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["experiment"] == "routing_hmm"
    assert saved["summary"]["groups"]["overlap/synthetic/star_eta5e-05"]["final"]["mi"]["n"] == 1
    for png in (rh.PLOT, rh.DIFF_PLOT, rh.HEATMAP):
        assert (tmp_path / png).stat().st_size > 0
    run_dir = tmp_path / "runs" / "overlap_synthetic_star_eta5e-05_seed0"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 4] and "val_mi" in records[-1]
    assert (run_dir / "tensorboard").is_dir()

    def boom(*a, **k):
        raise AssertionError("a finished cell was retrained")

    monkeypatch.setattr(rh, "train_cell", boom)
    again = rh.run(cfg, str(tmp_path), progress=False)
    assert again["cells"] == out["cells"]


def test_a_two_device_mesh_gives_the_one_device_results(tmp_path, monkeypatch):
    """The smoke setting on a 2-device data mesh (`run(mesh=)`, what `--mesh=data:2` builds on
    two devices: training and the routing evaluation on the mesh) matches one device; a mesh
    the batch does not split over is refused before anything is written."""
    for name in ("plot_curves", "plot_heatmaps"):  # drawn by the smoke test above
        monkeypatch.setattr(rh, name, lambda *a, **k: None)
    cells = {name: rh.run(tiny(), str(tmp_path / name), progress=False, mesh=mesh)["cells"]
             for name, mesh in (("one", None), ("two", parallel.make_mesh(2)))}
    (one,), (two,) = cells["one"], cells["two"]
    assert two["joint"] == one["joint"] and two["curve"]["step"] == one["curve"]["step"]
    for k, v in one["final"].items():
        assert two["final"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    for k in rh.CURVE_METRICS:  # flip_rate is None at step 0
        a, b = ([np.nan if v is None else v for v in c["curve"][k]] for c in (one, two))
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6, err_msg=k)
    with pytest.raises(ValueError, match="star_eta5e-05: batch_size=4 is not divisible by the "
                                         "batch axes data×fsdp = 8"):
        rh.run(tiny(), str(tmp_path / "bad"), progress=False, mesh=parallel.make_mesh(8))
    assert not (tmp_path / "bad").exists()


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown routers entry 'nope'; valid: topk_switch"):
        tiny(routers=("nope",))
    tiny(etas=(0.0,))  # the frozen-V control
    with pytest.raises(ValueError, match="eta"):
        tiny(etas=(-1e-5,))
    with pytest.raises(ValueError, match="unknown recipes entry 'paper'"):
        tiny(recipes=("paper",))
    with pytest.raises(ValueError, match="unknown data entry 'mixed'"):
        tiny(data=("mixed",))
    with pytest.raises(ValueError, match="emission_support"):  # 16 // 2 = 8 tokens per concept
        tiny(data=("disjoint",), hmm=hmm.HMMConfig(seq_len=16, num_concepts=2, num_states=4,
                                                  vocab_size=16, emission_support=9))
    with pytest.raises(ValueError, match="gate_init"):
        hc.ModelSpec(gate_init="xavier")
    with pytest.raises(ValueError, match="recipe"):
        hc.lm_config("topk", hc.ModelSpec(), hmm.HMMConfig(), recipe="paper")
    with pytest.raises(ValueError, match="seeds"):
        tiny(seeds=())
    with pytest.raises(ValueError, match="label"):
        tiny(label="colour")
    with pytest.raises(ValueError, match="valid routers"):
        hc.lm_config("switch", hc.ModelSpec(), hmm.HMMConfig())
    with pytest.raises(ValueError, match="test_time_update"):
        hc.lm_config("topk", hc.ModelSpec(), hmm.HMMConfig(), test_time_update=True)


def test_refuses_workdir_of_another_experiment(tmp_path):
    ResultsFile(tmp_path, "star_shift", fixed={}).write()
    with pytest.raises(ValueError, match="experiment 'star_shift', not 'routing_hmm'"):
        rh.run(tiny(), str(tmp_path), progress=False)
    other = tmp_path / "other"
    rh.ResultsFile(other, "routing_hmm", fixed=tiny(eval_every=1).fixed()).write()
    with pytest.raises(ValueError, match="eval_every: 1 != 2"):
        rh.run(tiny(), str(other), progress=False)


def test_mutual_information_known_answers():
    C = 4
    one_to_one = np.eye(C) * 25  # C equiprobable labels, each always on its own expert
    assert hc.mi_nats(one_to_one) == pytest.approx(math.log(C), abs=1e-5)
    independent = np.outer([1, 2, 3, 4], [5, 1, 2, 2])  # p(e, l) = p(e) p(l)
    assert hc.mi_nats(independent) == pytest.approx(0.0, abs=1e-6)
    two_to_one = np.array([[10, 10, 0, 0], [0, 0, 10, 10]])  # expert = label // 2
    assert hc.mi_nats(two_to_one) == pytest.approx(math.log(2), abs=1e-5)


def test_summary_compares_star_with_topk_per_seed():
    def cell(router, seed, mi, loss, ent=0.9, data="overlap"):
        final = {m: 0.0 for m in rh.FINAL_METRICS} | {"mi": mi, "val_loss": loss,
                                                      "load_entropy": ent}
        curve = {"step": [0, 10, 20, 30, 40, 50]} | {m: [None if m == "flip_rate" else 0.0] * 6
                                                     for m in rh.CURVE_METRICS}
        curve["val_loss"] = [3.0, 2.6, 2.5, 2.49, 2.495, loss]
        return {"data": data, "recipe": "lm", "router": router, "seed": seed, "final": final,
                "curve": curve}

    topk = [cell("topk", s, mi, 2.5) for s, mi in enumerate([1.0, 1.1, 1.2])]
    star = [cell("star_eta5e-05", s, mi, 2.6) for s, mi in enumerate([1.3, 1.0, 1.6])]
    frozen = [cell("star_eta0", s, 1.0, 2.6) for s in range(3)]
    other = [cell("topk", 0, 0.0, 9.0, data="disjoint")]
    s = rh.summarize([*topk, *star, *frozen, *other])
    g = s["groups"]["overlap/lm/topk"]["final"]
    assert g["mi"]["n"] == 3 and g["mi"]["mean"] == pytest.approx(1.1)
    comps = s["comparisons"]["overlap/lm"]
    d = comps["star_eta5e-05-topk/mi"]
    want = stats.compare([1.3, 1.0, 1.6], [1.0, 1.1, 1.2], direction="greater")
    assert d["signs"] == ["+", "-", "+"] and d["diff_mean"] == pytest.approx(0.2)
    assert d["half"] == pytest.approx(want["half"]) and d["verdict"] == "not separated"
    loss = comps["star_eta5e-05-topk/val_loss"]  # STAR 0.1 worse on every seed
    assert loss["signs"] == ["+"] * 3 and loss["verdict"] == "opposite"
    assert comps["star_eta5e-05-star_eta0/mi"]["values"] == pytest.approx([0.3, 0.0, 0.6])
    assert "star_eta0-topk/mi" not in comps  # the control is compared with STAR only
    assert s["plateau"]["overlap/lm"]["router"] == "topk"  # the only baseline
    # best before the last 20 % (steps ≥ 40): 2.49; in it 2.495: no improvement, plateaued
    assert s["plateau"]["overlap/lm"]["plateaued"] is True
    assert "disjoint/lm" not in s["comparisons"]  # no STAR cell there


def test_lm_config_recipes_and_gate_init():
    spec, h = TINY["model"], TINY["hmm"]
    syn = hc.lm_config("topk", spec, h, recipe="synthetic")
    lmr = hc.lm_config("star", spec, h, eta=0.0, recipe="lm")
    assert syn.moe.top_k == 2 and dict(syn.moe.router_kwargs)["load_balance_weight"] == 0.0
    kw = dict(lmr.moe.router_kwargs)
    assert lmr.moe.top_k == 1 and kw["load_balance_weight"] == 1e-2 and kw["eta"] == 0.0
    assert kw["gate_init_std"] == 0.01
    ts = hc.init_state(syn, TINY["train"], h.seq_len, seed=0, gate_std=0.01)
    ref = hc.init_state(syn, TINY["train"], h.seq_len, seed=0)
    w, w0 = (np.asarray(t.params["blocks"][0]["ffn"]["router"]["w_g"]) for t in (ts, ref))
    np.testing.assert_allclose(w, w0 * 0.01 * 16**0.5, rtol=1e-6)  # same draw, rescaled
    lib = hc.ModelSpec(d_model=16, num_layers=1, num_heads=1, head_dim=8, d_ff=16,
                       num_experts=4, gate_init="library")
    assert hc.gate_std(lib) is None and hc.gate_std(spec) == 0.01
    assert dict(hc.lm_config("star", lib, h, eta=1e-3).moe.router_kwargs)["gate_init_std"] is None
