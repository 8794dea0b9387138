"""Tree-NeighborsMatch generator: determinism, labels by brute force, padding, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from moejax.data import graphs


def _brute_force_label(ex: dict) -> int:
    """Finds the leaves as the nodes nothing points to, then the leaf matching the root's key."""
    n = len(ex["keys"])
    has_child = np.zeros(n, bool)
    has_child[ex["receivers"]] = True
    leaves = [v for v in range(n) if not has_child[v]]
    target = int(ex["target"])
    match = [v for v in leaves if ex["keys"][v] == ex["keys"][target]]
    assert len(match) == 1
    return int(ex["values"][match[0]]) - 1


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_labels_match_brute_force(depth):
    cfg = graphs.NeighborsMatchConfig(depth=depth)
    data = graphs.dataset(cfg, seed=3, num_examples=50)
    for ex in data:
        assert len(ex["keys"]) == cfg.nodes_per_graph == 2 ** (depth + 1) - 1
        assert len(ex["senders"]) == cfg.edges_per_graph
        leaf_vals = ex["values"][cfg.leaf_indices]
        assert sorted(leaf_vals) == list(range(1, cfg.num_leaves + 1))   # a permutation
        assert 1 <= ex["keys"][0] <= cfg.num_leaves
        assert int(ex["label"]) == _brute_force_label(ex)
        # every node but the root has exactly one parent, and its path reaches the root
        assert sorted(ex["senders"]) == list(range(1, cfg.nodes_per_graph))
    labels = [int(ex["label"]) for ex in data]
    assert len(set(labels)) > 1


def test_deterministic_per_seed_and_split():
    cfg = graphs.NeighborsMatchConfig(depth=3)
    a = graphs.dataset(cfg, seed=0, num_examples=20)
    b = graphs.dataset(cfg, seed=0, num_examples=20)
    c = graphs.dataset(cfg, seed=1, num_examples=20)
    v = graphs.dataset(cfg, seed=0, num_examples=20, split="val")
    stack = lambda d: np.stack([np.concatenate([e["keys"], e["values"]]) for e in d])
    np.testing.assert_array_equal(stack(a), stack(b))
    assert not np.array_equal(stack(a), stack(c))
    assert not np.array_equal(stack(a), stack(v))


def test_one_hot_and_bidirectional():
    cfg = graphs.NeighborsMatchConfig(depth=2, bidirectional=True)
    ex = graphs.dataset(cfg, seed=0, num_examples=1)[0]
    assert ex["features"].shape == (7, cfg.num_features)
    np.testing.assert_array_equal(ex["features"].sum(-1), 2)
    np.testing.assert_array_equal(ex["features"][:, :5].argmax(-1), ex["keys"])
    edges = set(zip(ex["senders"].tolist(), ex["receivers"].tolist(), strict=True))
    assert (1, 0) in edges and (0, 1) in edges and len(edges) == 12


def test_padding_layout():
    cfg = graphs.NeighborsMatchConfig(depth=2)
    data = graphs.dataset(cfg, seed=0, num_examples=3)
    b = graphs.pad_graphs(data, num_nodes=25, num_edges=20)
    assert b.senders.shape == (20,) and b.node_features.shape == (25, cfg.num_features)
    np.testing.assert_array_equal(b.node_mask, [1] * 21 + [0] * 4)
    np.testing.assert_array_equal(b.edge_mask, [1] * 18 + [0] * 2)
    np.testing.assert_array_equal(b.node_graph, [0] * 7 + [1] * 7 + [2] * 7 + [3] * 4)
    np.testing.assert_array_equal(b.target, [0, 7, 14])
    np.testing.assert_array_equal(b.labels, [int(e["label"]) for e in data])
    np.testing.assert_array_equal(b.senders[6:12], data[1]["senders"] + 7)
    assert not b.node_high.any()
    bs = graphs.batches(cfg, seed=0, num_examples=10, batch_size=4)
    assert len(bs) == 2 and all(x.node_mask.shape == (28,) for x in bs)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: graphs.NeighborsMatchConfig(depth=1), "depth must be >= 2"),
        (lambda: graphs.NeighborsMatchConfig(depth=7), "depth must be <= 6"),
        (lambda: graphs.pad_graphs([]), "at least one graph"),
        (lambda: graphs.pad_graphs([dict(features=np.zeros((0, 2)), senders=np.zeros(0, int),
                                         receivers=np.zeros(0, int), target=0, label=0)]),
         "graph 0 is empty"),
        (lambda: graphs.pad_graphs([dict(features=np.zeros((2, 2)), senders=np.array([0, 2]),
                                         receivers=np.array([1, 0]), target=0, label=0)]),
         "outside the graph's 2 nodes"),
        (lambda: graphs.pad_graphs(graphs.dataset(graphs.NeighborsMatchConfig(depth=2), seed=0,
                                                  num_examples=2), num_nodes=10),
         "num_nodes must be >= 14"),
        (lambda: graphs.batches(graphs.NeighborsMatchConfig(depth=2), seed=0, num_examples=2,
                                batch_size=3), "batch_size must be <= 2"),
    ],
)
def test_bad_input(make, match):
    with pytest.raises(ValueError, match=match):
        make()
