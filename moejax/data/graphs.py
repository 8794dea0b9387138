"""Tree-NeighborsMatch (Alon & Yahav 2021, "On the bottleneck of graph neural networks").

A problem of depth r is a complete binary tree of depth r: the root (node 0) is the *target*,
the 2**r leaves carry the information. Following the authors' code (tech-srl/bottleneck,
`tree_dataset.py`), the "number of blue neighbours" of a node is encoded as an integer *key*
feature instead of literal extra nodes:

  * leaf j (0-based, left to right) has key j + 1 and a *label* (value) perm[j], where perm is a
    random permutation of 1..L (L = 2**r leaves);
  * the root has key k ∈ 1..L (drawn at random) and value 0; internal nodes have (0, 0);
  * the answer is the label of the leaf whose key equals the root's key: perm[k - 1]. Classes
    are reported 0-based, `label = perm[k - 1] - 1` ∈ [0, L).

Nodes are numbered breadth first (children of i are 2i+1, 2i+2), so leaves are the indices
`2**r - 1 .. 2**(r+1) - 2`. Edges point from child to parent (information flows to the target,
as in the authors' code); `bidirectional=True` adds the parent→child edges too. Self-loops are
not stored: the layers add them.

Example `i` of seed `s` is a pure function of `(r, s, i)` (`pipeline.example_rng`).

Batches are padded, jit-friendly `GraphBatch`es: the graphs' nodes are laid end to end and padded
to `num_nodes`, their edges to `num_edges` (padding edges have `edge_mask = 0` and point at node
0, padding nodes have `node_mask = 0` and graph index `num_graphs`, one past the last graph).

Axis letters: N padded node count, E padded edge count, G graphs per batch, F feature width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from moejax.data.pipeline import example_rng
from moejax.validation import ArgumentTypeError, check_bool
from moejax.validation import check_int as _check_int

_GRAPH_KEYS = ("features", "senders", "receivers", "target", "label")

DEPTHS = (2, 3, 4, 5, 6)


class GraphBatch(NamedTuple):
    """Padded batch of graphs (numpy on the host, jax arrays once passed to a jitted function).

    Attributes:
      senders: `int32[E]` source node of each edge.
      receivers: `int32[E]` destination node of each edge.
      edge_mask: `float32[E]` 1 for real edges, 0 for padding.
      node_features: `float32[N, F]` (one-hot for NeighborsMatch), zeros on padding nodes.
      node_mask: `float32[N]` 1 for real nodes.
      node_graph: `int32[N]` graph index of each node (G on padding nodes).
      target: `int32[G]` index of each graph's target node in the batch.
      labels: `int32[G]` class of each graph.
      node_high: `bool[N]` nodes expanded by PANDA (all False until `gnn.mark_central`).
    """

    senders: np.ndarray
    receivers: np.ndarray
    edge_mask: np.ndarray
    node_features: np.ndarray
    node_mask: np.ndarray
    node_graph: np.ndarray
    target: np.ndarray
    labels: np.ndarray
    node_high: np.ndarray


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class NeighborsMatchConfig:
    """One NeighborsMatch problem. Hashable; validated on construction.

    Attributes:
      depth: r, tree depth in [2, 6] (distance from the leaves to the target).
      bidirectional: also add parent→child edges (the authors' graphs point to the root only).
    """

    depth: int = 3
    bidirectional: bool = False

    def __post_init__(self):
        _check_int("depth", self.depth, lo=DEPTHS[0], hi=DEPTHS[-1])
        check_bool("bidirectional", self.bidirectional)

    @property
    def num_leaves(self) -> int:
        return 2**self.depth

    @property
    def nodes_per_graph(self) -> int:
        return 2 ** (self.depth + 1) - 1

    @property
    def edges_per_graph(self) -> int:
        return (self.nodes_per_graph - 1) * (2 if self.bidirectional else 1)

    @property
    def num_classes(self) -> int:
        return self.num_leaves

    @property
    def num_features(self) -> int:
        """Width of the one-hot features: key one-hot (L + 1) ++ value one-hot (L + 1)."""
        return 2 * (self.num_leaves + 1)

    @property
    def leaf_indices(self) -> np.ndarray:
        return np.arange(self.num_leaves - 1, self.nodes_per_graph)


def tree_edges(depth: int, *, bidirectional: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(senders, receivers) `int32[E]` of the complete binary tree, child → parent first."""
    child = np.arange(1, 2 ** (depth + 1) - 1, dtype=np.int32)
    parent = (child - 1) // 2
    if bidirectional:
        return np.concatenate([child, parent]), np.concatenate([parent, child])
    return child, parent


def make_example(cfg: NeighborsMatchConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One NeighborsMatch graph: `keys`, `values` `int32[n]`, `senders`, `receivers`, `label`."""
    L = cfg.num_leaves
    perm = rng.permutation(L) + 1
    key = int(rng.integers(1, L + 1))
    keys = np.zeros(cfg.nodes_per_graph, np.int32)
    values = np.zeros(cfg.nodes_per_graph, np.int32)
    keys[cfg.leaf_indices] = np.arange(1, L + 1)
    values[cfg.leaf_indices] = perm
    keys[0] = key
    senders, receivers = tree_edges(cfg.depth, bidirectional=cfg.bidirectional)
    return {"keys": keys, "values": values, "senders": senders, "receivers": receivers,
            "target": np.int32(0), "label": np.int32(perm[key - 1] - 1)}


def one_hot_features(keys: np.ndarray, values: np.ndarray, num_leaves: int) -> np.ndarray:
    """`float32[n, 2 (L + 1)]`: one-hot key ++ one-hot value."""
    eye = np.eye(num_leaves + 1, dtype=np.float32)
    return np.concatenate([eye[keys], eye[values]], axis=-1)


def dataset(cfg: NeighborsMatchConfig, *, seed: int, num_examples: int,
            split: str = "train") -> list[dict[str, np.ndarray]]:
    """Examples `0 .. num_examples - 1` of `(cfg, seed, split)`, each with `features` added."""
    _check_int("seed", seed, lo=0)
    _check_int("num_examples", num_examples, lo=1)
    out = []
    for i in range(num_examples):
        ex = make_example(cfg, example_rng(seed, split, i))
        ex["features"] = one_hot_features(ex["keys"], ex["values"], cfg.num_leaves)
        out.append(ex)
    return out


def pad_graphs(graphs: Sequence[dict[str, np.ndarray]], *, num_nodes: int | None = None,
               num_edges: int | None = None) -> GraphBatch:
    """Packs graphs (dicts with `features [n, F]`, `senders`, `receivers`, `target`, `label`).

    Args:
      graphs: at least one graph, each with at least one node and edges inside `[0, n)`.
      num_nodes: N, padded node count (default: the exact total).
      num_edges: E, padded edge count (default: the exact total).

    Returns:
      A numpy `GraphBatch` with G = len(graphs).

    Raises:
      ValueError / ArgumentTypeError: naming the graph (by index) and the key at fault.
    """
    if isinstance(graphs, str | bytes) or not isinstance(graphs, Sequence):
        raise ArgumentTypeError(f"graphs must be a sequence of graph dicts, got "
                                f"{type(graphs).__name__}")
    if not graphs:
        raise ValueError("graphs must hold at least one graph, got an empty sequence")
    for gi, g in enumerate(graphs):
        if not isinstance(g, Mapping):
            raise ArgumentTypeError(f"graph {gi} must be a dict with keys {_GRAPH_KEYS}, got "
                                    f"{type(g).__name__}")
        missing = [k for k in _GRAPH_KEYS if k not in g]
        if missing:
            raise ValueError(f"graph {gi} has no {missing[0]!r} (a graph dict needs "
                             f"{', '.join(_GRAPH_KEYS)})")
        if np.ndim(g["features"]) != 2:
            raise ValueError(f"graph {gi}: features must be [n, F], got shape "
                             f"{np.shape(g['features'])}")
    widths = {int(np.shape(g["features"])[1]) for g in graphs}
    if len(widths) > 1:
        raise ValueError(f"graphs' features have different widths {sorted(widths)}")
    sizes = [int(np.shape(g["features"])[0]) for g in graphs]
    for gi, (g, n) in enumerate(zip(graphs, sizes, strict=True)):
        if n == 0:
            raise ValueError(f"graph {gi} is empty (0 nodes)")
        s, r = np.asarray(g["senders"]), np.asarray(g["receivers"])
        if s.shape != r.shape or s.ndim != 1:
            raise ValueError(f"graph {gi}: senders {s.shape} and receivers {r.shape} must be "
                             "1-d and of equal length")
        if s.size and (min(s.min(), r.min()) < 0 or max(s.max(), r.max()) >= n):
            raise ValueError(f"graph {gi}: an edge points outside the graph's {n} nodes "
                             f"(senders in [{s.min()}, {s.max()}], receivers in "
                             f"[{r.min()}, {r.max()}])")
        if not 0 <= int(g["target"]) < n:
            raise ValueError(f"graph {gi}: target={int(g['target'])} outside [0, {n})")
    total_n = sum(sizes)
    total_e = sum(len(g["senders"]) for g in graphs)
    num_nodes = total_n if num_nodes is None else num_nodes
    num_edges = total_e if num_edges is None else num_edges
    _check_int("num_nodes", num_nodes, lo=total_n)
    _check_int("num_edges", num_edges, lo=total_e)

    G, F = len(graphs), int(np.shape(graphs[0]["features"])[1])
    b = GraphBatch(
        senders=np.zeros(num_edges, np.int32), receivers=np.zeros(num_edges, np.int32),
        edge_mask=np.zeros(num_edges, np.float32),
        node_features=np.zeros((num_nodes, F), np.float32),
        node_mask=np.zeros(num_nodes, np.float32),
        node_graph=np.full(num_nodes, G, np.int32), target=np.zeros(G, np.int32),
        labels=np.zeros(G, np.int32), node_high=np.zeros(num_nodes, bool))
    n0 = e0 = 0
    for gi, (g, n) in enumerate(zip(graphs, sizes, strict=True)):
        e = len(g["senders"])
        b.senders[e0:e0 + e] = np.asarray(g["senders"]) + n0
        b.receivers[e0:e0 + e] = np.asarray(g["receivers"]) + n0
        b.edge_mask[e0:e0 + e] = 1
        b.node_features[n0:n0 + n] = g["features"]
        b.node_mask[n0:n0 + n] = 1
        b.node_graph[n0:n0 + n] = gi
        b.target[gi] = n0 + int(g["target"])
        b.labels[gi] = int(g["label"])
        if "high" in g:
            b.node_high[n0:n0 + n] = g["high"]
        n0, e0 = n0 + n, e0 + e
    return b


def batches(cfg: NeighborsMatchConfig, *, seed: int, num_examples: int, batch_size: int,
            split: str = "train") -> list[GraphBatch]:
    """The split cut into padded batches of `batch_size` trees (last partial batch dropped).

    All batches share N = batch_size · nodes_per_graph and E = batch_size · edges_per_graph, so
    one compiled step serves them all.
    """
    _check_int("num_examples", num_examples, lo=1)
    _check_int("batch_size", batch_size, lo=1, hi=num_examples)
    data = dataset(cfg, seed=seed, num_examples=num_examples, split=split)
    return [pad_graphs(data[i:i + batch_size]) for i in range(0, len(data) - batch_size + 1,
                                                             batch_size)]
