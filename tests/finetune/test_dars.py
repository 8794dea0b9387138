"""DARS (moejax.finetune.dars): subspace, scores, budget split, masked optimizer, config, smoke."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moejax.finetune import dars
from moejax.testing import init_lm

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_subspace_matches_top_eigenvectors_of_the_second_moment():
    rng = np.random.default_rng(0)
    # Anisotropic data with well-separated spectrum.
    x = rng.normal(size=(500, 6)) * np.array([5.0, 3.0, 2.0, 1.0, 0.5, 0.1])
    x = x @ np.linalg.qr(rng.normal(size=(6, 6)))[0]
    u = dars.principal_subspace(x, 3)
    assert u.shape == (6, 3)
    np.testing.assert_allclose(u.T @ u, np.eye(3), atol=1e-5)
    evals, evecs = np.linalg.eigh(x.T @ x / len(x))
    top = evecs[:, np.argsort(evals)[::-1][:3]]
    # Same subspace (projectors equal) and same directions up to sign.
    np.testing.assert_allclose(u @ u.T, top @ top.T, atol=1e-5)
    np.testing.assert_allclose(np.abs(np.sum(u * top, axis=0)), 1.0, atol=1e-5)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    np.testing.assert_allclose(np.abs(u), np.abs(vt[:3].T), atol=1e-5)
    assert dars.principal_subspace(x[:2], 5).shape == (6, 2)  # r capped at N


def test_scores_by_hand():
    g = np.array([[1.0, 0.0, 3.0],
                  [2.0, 5.0, 4.0]])          # [d_in=2, d_out=3]; channel j = column j
    u = np.array([[1.0], [0.0]])            # subspace = first input axis
    np.testing.assert_allclose(dars.channel_scores(g, u), [1.0, 0.0, 3.0])
    np.testing.assert_allclose(dars.channel_scores(g, np.eye(2)), [np.sqrt(5), 5.0, 5.0])
    u = np.array([[0.6], [0.8]])
    np.testing.assert_allclose(dars.channel_scores(g, u), [2.2, 4.0, 5.0], rtol=1e-6)
    ge = np.stack([g, -2 * g])             # [E=2, d_in, d_out]
    np.testing.assert_allclose(dars.channel_scores(ge, u), [[2.2, 4.0, 5.0], [4.4, 8.0, 10.0]],
                               rtol=1e-6)


@pytest.mark.parametrize("n,budget,rho", [(100, 0.1, 0.3), (1000, 0.05, 0.1), (50, 0.2, 0.0),
                                          (50, 0.2, 1.0), (7, 0.01, 0.5), (64, 1.0, 0.3)])
def test_budget_split(n, budget, rho):
    scores = np.random.default_rng(1).permutation(n).astype(np.float32)
    cfg = dars.DarsConfig(budget=budget, rho=rho, seed=3)
    sel = dars.select_channels(scores, cfg)
    m = min(n, max(1, round(budget * n)))
    assert len(sel.random) == round(rho * m) and len(sel.top) == m - round(rho * m)
    assert len(np.intersect1d(sel.top, sel.random)) == 0 and len(sel.all) == m
    # Top part = the highest scores.
    np.testing.assert_array_equal(np.sort(sel.top), np.sort(np.argsort(-scores)[:len(sel.top)]))
    again = dars.select_channels(scores, cfg)
    np.testing.assert_array_equal(sel.random, again.random)
    np.testing.assert_array_equal(sel.top, again.top)


def test_random_part_depends_on_seed():
    scores = np.arange(1000.0)
    a = dars.select_channels(scores, dars.DarsConfig(budget=0.1, rho=0.5, seed=0))
    b = dars.select_channels(scores, dars.DarsConfig(budget=0.1, rho=0.5, seed=1))
    np.testing.assert_array_equal(a.top, b.top)
    assert not np.array_equal(a.random, b.random)


def test_masked_adamw_freezes_exactly():
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"w": jax.random.normal(k1, (8, 6)), "e": jax.random.normal(k2, (2, 8, 4)),
              "b": jnp.ones((6,))}
    sel = {("w",): np.array([1, 4]), ("e",): np.array([0, 7])}
    mask = dars.channel_mask(params, sel)
    assert mask["w"][:, [1, 4]].all() and mask["w"].sum() == 16
    assert mask["e"][0, :, 0].all() and mask["e"][1, :, 3].all() and mask["e"].sum() == 16
    assert not mask["b"].any()
    opt = dars.masked(optax.chain(optax.clip_by_global_norm(1.0),
                                  optax.adamw(1e-2, weight_decay=0.5)), mask)
    state = opt.init(params)
    p = params

    def loss(q):
        return sum(jnp.sum(jnp.sin(3 * x) ** 2) for x in jax.tree.leaves(q))

    for _ in range(5):
        g = jax.grad(loss)(p)
        upd, state = opt.update(g, state, p)
        p = optax.apply_updates(p, upd)
    for name in params:
        before, after, m = np.asarray(params[name]), np.asarray(p[name]), np.asarray(mask[name])
        np.testing.assert_array_equal(after[~m], before[~m])   # bit-identical
        if m.any():
            assert np.all(after[m] != before[m])
    assert dars.masked(optax.sgd(1.0), None) is not None


def test_select_methods_on_an_lm():
    from moejax.models import lm
    cfg = lm.get_preset("tiny", ffn="dense", num_layers=1)
    params, state = init_lm(jax.random.key(0), cfg)
    toks = jax.random.randint(jax.random.key(1), (2, 16), 0, 256)
    fn = jax.jit(lambda t: dars.lm_block_inputs(params, state, t, cfg=cfg))
    acts = dars.collect_activations(fn, [toks])
    assert acts[("ffn", 0)].shape == (32, cfg.d_model)
    batch = {"inputs": toks, "targets": toks}
    grads = jax.jit(jax.grad(lambda q: lm.loss_fn(q, state, batch, cfg=cfg, train=False)[0]))(
        params)
    targets = dars.lm_targets(params)
    assert ("blocks", 0, "ffn", "w_up") in targets and ("blocks", 0, "mixer", "w_q") in targets
    dcfg = dars.DarsConfig(budget=0.1, rho=0.3, rank=4)
    for method in ("random", "top", "dars"):
        mask, info = dars.select(method, params, targets, dcfg, acts=acts, grads=grads)
        want = sum(max(1, round(0.1 * dars.get_path(params, p).shape[-1])) for p in targets)
        assert info["selected"] == want
        assert not mask["embed"].any() and not mask["blocks"][0]["ffn"]["w_down"].any()
    assert dars.select("full", params, targets, dcfg)[0] is None
    with pytest.raises(ValueError, match="method"):
        dars.select("nope", params, targets, dcfg)
    with pytest.raises(ValueError, match="acts and grads"):
        dars.select("top", params, targets, dcfg)


def test_expert_weights_are_channels_per_expert():
    from moejax.models import lm
    cfg = lm.get_preset("tiny", ffn="moe", num_layers=1)
    params, _ = init_lm(jax.random.key(0), cfg)
    targets = dars.lm_targets(params)
    path = ("blocks", 0, "ffn", "experts", "w_up")
    assert targets[path] == ("ffn", 0)
    mask, info = dars.select("random", params, {path: ("ffn", 0)},
                             dars.DarsConfig(budget=0.25, rho=0.5))
    m = mask["blocks"][0]["ffn"]["experts"]["w_up"]         # [E, d, d_ff]
    per_channel = m.all(axis=1)
    assert per_channel.sum() == info["selected"] == round(0.25 * cfg.moe.num_experts * cfg.d_ff)
    assert (m.any(axis=1) == per_channel).all()             # whole columns only


@pytest.mark.parametrize("kw,field", [(dict(budget=0.0), "budget"), (dict(budget=1.5), "budget"),
                                      (dict(rho=-0.1), "rho"), (dict(rho=1.01), "rho"),
                                      (dict(rank=0), "rank"), (dict(seed=-1), "seed"),
                                      (dict(budget=float("nan")), "budget")])
def test_bad_config(kw, field):
    with pytest.raises(ValueError, match=field):
        dars.DarsConfig(**kw)


def test_bad_inputs():
    with pytest.raises(ValueError, match="rank"):
        dars.principal_subspace(np.ones((3, 2)), 0)
    with pytest.raises(ValueError, match="acts"):
        dars.principal_subspace(np.ones((0, 2)), 1)
    with pytest.raises(ValueError, match="disagree"):
        dars.channel_scores(np.ones((3, 2)), np.ones((2, 1)))


@pytest.mark.slow  # the CLI end to end (~60 s); MASK_HOOKS in the loop: the test below
def test_experiment_smoke(tmp_path):
    cmd = [sys.executable, "-m", "experiments.dars_finetune", f"--workdir={tmp_path}",
           "--pretrain_steps=3", "--finetune_steps=2", "--methods=random,dars",
           "--budgets=0.05", "--rhos=0.3"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=120)
    with open(tmp_path / "results.json") as f:
        res = json.load(f)
    assert {(c["method"], c["rho"]) for c in res["cells"]} == {("random", None), ("dars", 0.3)}
    for c in res["cells"]:
        assert np.isfinite(c["target_loss"]) and np.isfinite(c["forgetting"])
    assert (tmp_path / "dars_finetune.png").exists()
    # A rerun (in-process: nothing left to train) skips the finished cells.
    from experiments import dars_finetune
    cfg = dars_finetune.ExperimentConfig(pretrain_steps=3, finetune_steps=2,
                                         methods=("random", "dars"), budgets=(0.05,), rhos=(0.3,))
    again = dars_finetune.run(cfg, str(tmp_path))
    assert [dars_finetune.cell_key(c) for c in again["cells"]] == [
        dars_finetune.cell_key(c) for c in res["cells"]]
    assert again["cells"] == res["cells"]
    # Changed settings (not just the sweep) are refused rather than mixed in.
    with pytest.raises(ValueError, match="rank"):
        dars_finetune.run(dataclasses.replace(cfg, rank=2), str(tmp_path))


def test_experiment_on_a_two_device_mesh_gives_the_one_device_results(tmp_path, monkeypatch):
    """`experiments.dars_finetune` at the smoke scale (one DARS cell, 2 pretraining and 2
    fine-tuning steps sharing one compiled step; a one-layer softmax LM instead of the `tiny`
    delta-rule preset, which compiles for a minute) on a 2-device data mesh (`run(mesh=)`, what
    `--mesh=data:2` builds on two devices: training, activations, gradients, evaluation) matches
    one device; a mesh the batch does not split over is refused before anything is written."""
    from experiments import dars_finetune as df
    from moejax import parallel
    from moejax.models import lm

    small = lm.LMConfig(vocab_size=256, d_model=16, num_layers=1, num_heads=1, head_dim=16,
                        mixer="softmax", ffn="dense", d_ff=32, max_seq_len=64)
    monkeypatch.setattr(df, "model_config", lambda: small)
    monkeypatch.setattr(df, "plot", lambda *a, **k: None)  # drawn by test_experiment_smoke
    cfg = df.ExperimentConfig(pretrain_steps=2, finetune_steps=2, methods=("dars",),
                              budgets=(0.05,), rhos=(0.3,), max_bytes=2**16)
    one = df.run(cfg, str(tmp_path / "one"))
    two = df.run(cfg, str(tmp_path / "two"), mesh=parallel.make_mesh(2))
    assert two["pretrained"] == pytest.approx(one["pretrained"], rel=1e-4)
    (a,), (b,) = one["cells"], two["cells"]
    assert (b["selected"], b["channels"], b["params"]) == (a["selected"], a["channels"],
                                                           a["params"])
    for k in ("target_loss", "source_loss", "forgetting"):  # forgetting: a difference of losses
        assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-4 * a["source_loss"]), k
    with pytest.raises(ValueError, match="pretraining: batch_size=16 is not divisible by the "
                                         "batch axes data×fsdp = 3"):
        df.run(cfg, str(tmp_path / "bad"), mesh=parallel.make_mesh(3))
    assert not (tmp_path / "bad").exists()


def test_mask_hooks_train_only_the_masked_entries():
    """`dars.MASK_HOOKS` in the library loop: frozen entries (weight decay included) stay as they
    were, trainable ones move; two masks share one compiled step."""
    from moejax.train import loop
    from tests.train import stand_in
    from tests.train.test_loop import batches, train_cfg

    cfg, tcfg = stand_in.StandInConfig(), train_cfg(steps=3, weight_decay=0.5)
    start = loop.init_state(stand_in, cfg, tcfg, jax.random.key(0), hooks=dars.MASK_HOOKS)
    before = jax.device_get(start.params)
    mask = jax.tree.map(lambda p: np.zeros(np.shape(p), bool), before)
    mask["w"] = np.zeros(before["w"].shape, bool)
    mask["w"][..., 0] = True  # one output channel of every layer's matrix
    ends = {}
    for name, m in (("masked", mask), ("full", None)):
        state = dars.with_mask(jax.tree.map(jnp.array, start), m)
        ends[name] = jax.device_get(loop.fit(state, batches(), model=stand_in, model_cfg=cfg,
                                             train_cfg=tcfg, rng=jax.random.key(1),
                                             hooks=dars.MASK_HOOKS).state.params)
    masked, full = ends["masked"], ends["full"]
    for key in ("embed", "w_g", "scale", "out"):
        np.testing.assert_array_equal(masked[key], before[key], err_msg=key)
        assert not np.array_equal(full[key], before[key]), key
    np.testing.assert_array_equal(masked["w"][..., 1:], before["w"][..., 1:])
    assert not np.array_equal(masked["w"][..., 0], before["w"][..., 0])

