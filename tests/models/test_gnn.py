"""GCN/GIN against a dense adjacency-matrix oracle; PANDA widths, selection, gradients, jit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.data import graphs
from moejax.models import gnn
from moejax.testing import RATIO_F32, assert_close

F, C = 3, 4

# jitted once per config: eager mode would compile every primitive separately (slow on CPU)
_apply = jax.jit(gnn.apply, static_argnames="cfg")


def _hand_graph(node_high=None) -> graphs.GraphBatch:
    """Two graphs (4 + 3 nodes, directed edges), one padding node and two padding edges."""
    g0 = dict(features=np.arange(12, dtype=np.float32).reshape(4, 3) / 10,
              senders=np.array([1, 2, 3, 0, 3]), receivers=np.array([0, 0, 1, 2, 2]),
              target=0, label=1)
    g1 = dict(features=-np.arange(9, dtype=np.float32).reshape(3, 3) / 7,
              senders=np.array([0, 1, 2]), receivers=np.array([1, 2, 0]), target=2, label=3)
    b = graphs.pad_graphs([g0, g1], num_nodes=8, num_edges=10)
    if node_high is not None:
        b = b._replace(node_high=np.asarray(node_high, bool))
    return b


def _dense_oracle(params: dict, b: graphs.GraphBatch, cfg: gnn.GNNConfig) -> np.ndarray:
    """The backbone with a dense `A[i, j] = #edges j → i` (numpy float64)."""
    P = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    n = b.node_mask.shape[0]
    A = np.zeros((n, n))
    for s, r, m in zip(b.senders, b.receivers, b.edge_mask, strict=True):
        A[r, s] += m
    A_hat = A + np.diag(b.node_mask)
    deg = A_hat.sum(1)
    inv = np.where(deg > 0, 1 / np.sqrt(np.maximum(deg, 1)), 0)
    norm = inv[:, None] * A_hat * inv[None, :]
    h = b.node_features @ P["embed"]["w"] + P["embed"]["b"]
    for lp, nrm in zip(P["layers"], P["norms"], strict=True):
        if cfg.backbone == "gcn":
            z = norm @ h @ lp["w"] + lp["b"]
        else:
            agg = (1 + lp["eps"]) * h + A @ h
            z = np.maximum(agg @ lp["mlp1"]["w"] + lp["mlp1"]["b"], 0) @ lp["mlp2"]["w"]
            z = z + lp["mlp2"]["b"]
        h = h + np.maximum(z, 0) if cfg.residual else np.maximum(z, 0)
        if cfg.layer_norm:
            mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
            h = (h - mu) / np.sqrt(var + 1e-5) * nrm["scale"] + nrm["bias"]
    return h[b.target] @ P["readout"]["w"] + P["readout"]["b"]


def _perturbed(params, key):
    """Random biases / eps / norm params so that the oracle checks them too."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape)
                                     for x, k in zip(leaves, keys, strict=True)])


@pytest.mark.parametrize("backbone", gnn.BACKBONES)
@pytest.mark.parametrize("residual, layer_norm", [(True, True), (False, False)])
def test_backbone_matches_dense_oracle(backbone, residual, layer_norm):
    cfg = gnn.GNNConfig(in_features=F, num_classes=C, backbone=backbone, hidden=5,
                        num_layers=2, residual=residual, layer_norm=layer_norm)
    params = _perturbed(gnn.init(jax.random.key(0), cfg), jax.random.key(1))
    b = _hand_graph()
    got = _apply(params, b, cfg=cfg)
    assert got.shape == (2, C)
    assert_close(f"{backbone} logits", _dense_oracle(params, b, cfg), got, ratio=RATIO_F32)


def _panda_cfg(backbone="gcn", **kw):
    return gnn.GNNConfig(in_features=F, num_classes=C, backbone=backbone, hidden=4,
                         num_layers=2, panda=True, width_factor=3, **kw)


HIGH = [False, True, True, False, False, True, False, False]   # high→low and low→high edges


@pytest.mark.parametrize("backbone", gnn.BACKBONES)
def test_panda_without_expanded_nodes_is_its_backbone(backbone):
    cfg = _panda_cfg(backbone)
    params = _perturbed(gnn.init(jax.random.key(2), cfg), jax.random.key(3))
    base = gnn.GNNConfig(in_features=F, num_classes=C, backbone=backbone, hidden=4, num_layers=2)
    ref = _apply(params["low"], _hand_graph(), cfg=base)
    assert_close("top_k=0", ref, _apply(params, _hand_graph([False] * 8), cfg=cfg),
                 ratio=RATIO_F32)
    r1 = gnn.GNNConfig(in_features=F, num_classes=C, backbone=backbone, hidden=4, num_layers=2,
                       panda=True, width_factor=1)
    assert_close("width_factor=1", ref, _apply(params, _hand_graph(HIGH), cfg=r1),
                 ratio=RATIO_F32)


def test_panda_widths():
    cfg = _panda_cfg()
    params = gnn.init(jax.random.key(0), cfg)
    assert params["high"]["layers"][0]["w"].shape == (12, 12)
    assert params["low"]["layers"][0]["w"].shape == (4, 4)
    assert params["lift"][0].shape == (4, 12) and params["sel"][0].shape == (12, 12)
    h_lo, h_hi = jax.jit(gnn.panda_states, static_argnames="cfg")(params, _hand_graph(HIGH),
                                                                      cfg=cfg)
    assert h_lo.shape == (8, 4) and h_hi.shape == (8, 12)
    high = np.array(HIGH)
    assert np.all(np.abs(np.asarray(h_hi))[high].sum(-1) > 0)
    np.testing.assert_array_equal(np.asarray(h_hi)[~high], 0)
    np.testing.assert_array_equal(np.asarray(h_lo)[high], 0)
    assert _apply(params, _hand_graph(HIGH), cfg=cfg).shape == (2, C)


def test_top_d_selection_picks_the_highest_scores():
    # positive inputs: no ReLU zeros, so no tied scores at the cut
    h = jax.random.uniform(jax.random.key(0), (6, 12), minval=0.1)
    w = jax.random.uniform(jax.random.key(1), (12, 12), minval=0.1)
    got = np.asarray(gnn.top_d_select(h, w, 5))
    s = np.asarray(jax.nn.softmax(jax.nn.relu(h @ w), axis=-1))
    for i in range(6):
        keep = np.sort(np.argsort(-s[i])[:5])
        np.testing.assert_allclose(got[i], np.asarray(h)[i, keep] * s[i, keep], rtol=1e-6)


@pytest.mark.parametrize("backbone", gnn.BACKBONES)
def test_gradient_reaches_selection_and_lift(backbone):
    cfg = _panda_cfg(backbone)
    params = gnn.init(jax.random.key(0), cfg)
    b = _hand_graph(HIGH)
    grads = jax.jit(jax.grad(lambda p: gnn.loss_fn(p, b, cfg)[0]))(params)
    assert float(jnp.abs(grads["sel"][0]).sum()) > 0
    assert float(jnp.abs(grads["lift"][0]).sum()) > 0
    # and the selection really shapes the output (not only the gradient)
    p2 = dict(params, sel=[s * 0 + 1 for s in params["sel"]])
    assert not np.allclose(_apply(params, b, cfg=cfg), _apply(p2, b, cfg=cfg))


def test_jit_matches_eager():
    cfg = _panda_cfg("gin")
    params = gnn.init(jax.random.key(4), cfg)
    b = _hand_graph(HIGH)
    fn = jax.jit(gnn.apply, static_argnames="cfg")
    assert_close("jit", gnn.apply(params, b, cfg), fn(params, b, cfg=cfg), ratio=RATIO_F32)


def test_centrality_and_mark_central():
    path = (np.array([0, 1, 2, 3]), np.array([1, 2, 3, 4]))
    np.testing.assert_array_equal(gnn.centrality(*path, 5), [1, 2, 2, 2, 1])
    np.testing.assert_allclose(gnn.centrality(*path, 5, kind="betweenness"), [0, 3, 4, 3, 0])
    cfg = graphs.NeighborsMatchConfig(depth=2)
    b = graphs.batches(cfg, seed=0, num_examples=2, batch_size=2)[0]
    marked = gnn.mark_central(b, k=3)   # internal nodes (degree 3) then the root (degree 2)
    np.testing.assert_array_equal(np.flatnonzero(marked.node_high), [0, 1, 2, 7, 8, 9])
    bt = gnn.mark_central(b, k=1, kind="betweenness")   # node 1 and 2 tie (9 each); root 9 too
    assert bt.node_high.sum() == 2
    with pytest.raises(ValueError, match="k=8 is larger than graph 0's node count 7"):
        gnn.mark_central(b, k=8)
    with pytest.raises(ValueError, match="centrality kind must be one of"):
        gnn.mark_central(b, k=1, kind="pagerank")


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(hidden=0), "hidden"),
        (dict(num_layers=0), "num_layers"),
        (dict(width_factor=0), "width_factor"),
        (dict(backbone="gat"), "backbone"),
        (dict(in_features=2.5), "in_features"),
        (dict(num_classes=0), "num_classes"),
    ],
)
def test_bad_config_names_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        gnn.GNNConfig(**{"in_features": F, "num_classes": C, **kw})


def test_experiment_smoke_run_and_resume(tmp_path):
    """`experiments/panda_neighbors.py` end to end: 2 cells of 2 steps, then a rerun that skips
    them. The script runs in a subprocess (its absl flags would clash with other scripts')."""
    import json
    import os
    import subprocess
    import sys

    from experiments import panda_neighbors

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "experiments.panda_neighbors", f"--workdir={tmp_path}",
           "--depths=2", "--models=gcn,panda_gcn", "--seeds=0", "--steps=2", "--hidden=8",
           "--max_examples=128"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train accuracy" in proc.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    cells = results["cells"]
    assert [(c["depth"], c["model"], c["seed"]) for c in cells] == [
        (2, "gcn", 0), (2, "panda_gcn", 0)]
    assert all(0 <= c["train_acc"] <= 1 and np.isfinite(c["train_loss"]) for c in cells)
    assert set(results["summary"]) == {"gcn", "panda_gcn"}
    assert (tmp_path / panda_neighbors.PLOT).exists()

    cfg = panda_neighbors.ExperimentConfig(depths=(2,), models=("gcn", "panda_gcn"), seeds=(0,),
                                           steps=2, hidden=8, max_examples=128)
    again = panda_neighbors.run(cfg, str(tmp_path))   # nothing left to train
    assert again["cells"] == cells
    with pytest.raises(ValueError, match="models must be"):
        panda_neighbors.ExperimentConfig(models=("gat",))


def test_experiment_on_a_two_device_mesh_gives_the_one_device_results(tmp_path, monkeypatch):
    """`experiments/panda_neighbors.py`'s smoke setting (its GCN cell) on a 2-device data mesh
    (`run(mesh=)`, what `--mesh=data:2` builds on two devices; the graph batches replicated)
    matches one device."""
    from experiments import panda_neighbors
    from moejax import parallel

    monkeypatch.setattr(panda_neighbors, "plot", lambda *a, **k: None)  # drawn by the smoke test
    cfg = panda_neighbors.ExperimentConfig(depths=(2,), models=("gcn",), seeds=(0,),
                                           steps=2, hidden=8, max_examples=128)
    (one,) = panda_neighbors.run(cfg, str(tmp_path / "one"))["cells"]
    (two,) = panda_neighbors.run(cfg, str(tmp_path / "two"),
                                 mesh=parallel.make_mesh(2))["cells"]
    for k in ("train_acc", "train_loss", "last_batch_loss"):
        assert two[k] == pytest.approx(one[k], rel=1e-4), k


def test_no_high_to_low_promise():
    assert gnn.has_high_to_low(_hand_graph(HIGH))
    # graph 0: 0 ← 1, 0 ← 2, 1 ← 3, 2 ← 0, 2 ← 3; expanding 0, 1, 2 leaves only low → high edges
    # (plus graph 1 with nothing expanded)
    up = [True, True, True, False, False, False, False, False]
    assert not gnn.has_high_to_low(_hand_graph(up))
    cfg = _panda_cfg()
    params = gnn.init(jax.random.key(5), cfg)
    fast = gnn.GNNConfig(**{**{f: getattr(cfg, f) for f in cfg.__slots__},
                            "no_high_to_low": True})
    assert_close("no_high_to_low", _apply(params, _hand_graph(up), cfg=cfg),
                 _apply(params, _hand_graph(up), cfg=fast), ratio=RATIO_F32)
