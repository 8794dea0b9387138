r"""Message-passing GNNs over padded edge lists: GCN, GIN and PANDA (Choi et al., ICML 2025).

Aggregation is `jax.ops.segment_sum` over the edges of a `moejax.data.graphs.GraphBatch`
(padding edges carry `edge_mask = 0`, padding nodes `node_mask = 0`).

  * **GCN** (Kipf & Welling): `H' = D^{-1/2} (A + I) D^{-1/2} H W + b`, where `A[i, j] = 1` for an
    edge j → i and `D` holds the in-degrees of `A + I` (PyG's `gcn_norm` on directed graphs; the
    usual symmetric normalisation on undirected ones).
  * **GIN** (Xu et al.): `H' = MLP((1 + ε) H + A H)`, MLP = Linear–ReLU–Linear, ε learned.

A model is `embed → num_layers × [h ← norm(h + relu(layer(h)))] → linear readout at each graph's
target node`; residual and layer norm can be switched off.

**PANDA** (DESIGN §7, "expanded width-aware message passing"): the top-k nodes of each graph by
centrality (`mark_central`, on the host: degree by default, or betweenness by Brandes' algorithm)
carry width `r·d`, the others `d` (r = `width_factor`). Each layer has the backbone's parameters
twice, at width `d` (`params["low"]`) and at `r·d` (`params["high"]`), and the four kinds of
message are

  * high → high at `r·d`, low → low at `d`, unchanged;
  * low → high: `h_j W_lift`, a learned linear map `d → r·d` (initialised to `[I 0]`);
  * high → low: top-d dimension selection. Scores `s = softmax(ReLU(h_j W_sel))` over the `r·d`
    dimensions; the `d` highest-scoring dimensions of `h_j ⊙ s` are kept (in their original
    order). The gradient reaches `W_sel` through the kept scores (the choice itself is discrete).

Implementation: every node's state is lifted (low nodes) or reduced (high nodes) once per layer,
giving an `r·d` view and a `d` view of the whole graph; the backbone layer at `r·d` aggregates the
first for the high receivers, the one at `d` the second for the low receivers (self-loops and
GIN's `(1 + ε) h_i` therefore use the receiver's own state). With `width_factor = 1` or no
expanded node PANDA is exactly its backbone with `params["low"]`.

NOTE: built from DESIGN §7 and the paper's summary, not its code. Our choices: separate input
embeddings and readouts per width (the readout uses the target's own width), the lift initialised
to `[I 0]`, selected dimensions kept in their original order. Both views are computed for every
node (cost ∝ d² + D² per node, simple and jit-friendly); a faster version would gather the
expanded nodes into a compact `[K, D]` array. The selection (a top-k per node and layer, slow on
CPU) is skipped with `no_high_to_low=True` where no edge goes high → low.

Axis letters: N nodes, E edges, G graphs, F input features, d width, D = r·d, C classes.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from moejax.data.graphs import GraphBatch
from moejax.train.steps import ModelFns
from moejax.validation import ArgumentTypeError, check_bool, check_choice
from moejax.validation import check_int as _check_int

Array = jax.Array

BACKBONES = ("gcn", "gin")
CENTRALITIES = ("degree", "betweenness")

__all__ = ["BACKBONES", "CENTRALITIES", "GNNConfig", "apply", "centrality", "has_high_to_low",
           "init", "loss_fn", "mark_central", "panda_states", "top_d_select"]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class GNNConfig:
    """A GCN/GIN model, optionally PANDA. Hashable (a static jit argument); validated.

    Attributes:
      in_features: F, width of `node_features`.
      num_classes: C, classes predicted at the target node.
      backbone: "gcn" or "gin".
      hidden: d, width of ordinary nodes.
      num_layers: message-passing layers (≥ 1).
      panda: expand the nodes marked in `GraphBatch.node_high` to width `width_factor · d`.
      width_factor: r ≥ 1 of PANDA (1 = no widening: the backbone).
      residual: `h + relu(layer(h))` instead of `relu(layer(h))`.
      layer_norm: layer norm after each layer.
      no_high_to_low: a promise that no edge goes from an expanded node to an ordinary one
        (e.g. NeighborsMatch trees, edges to the root, every internal node expanded): PANDA then
        skips the top-d selection (a top-k per node and layer, slow on CPU). Check it on the
        host with `has_high_to_low`; a false promise silently drops those messages.

    Raises (on construction):
      ValueError / ArgumentTypeError (also a `TypeError`): naming the field (ints must be ints,
        flags bools, `backbone` one of BACKBONES).
    """

    in_features: int
    num_classes: int
    backbone: str = "gcn"
    hidden: int = 32
    num_layers: int = 3
    panda: bool = False
    width_factor: int = 4
    residual: bool = True
    layer_norm: bool = True
    no_high_to_low: bool = False

    def __post_init__(self):
        _check_int("in_features", self.in_features, lo=1)
        _check_int("num_classes", self.num_classes, lo=1)
        _check_int("hidden", self.hidden, lo=1)
        _check_int("num_layers", self.num_layers, lo=1)
        _check_int("width_factor", self.width_factor, lo=1)
        check_choice("backbone", self.backbone, BACKBONES)
        for name in ("panda", "residual", "layer_norm", "no_high_to_low"):
            check_bool(name, getattr(self, name))

    @property
    def wide(self) -> int:
        """D = r·d, the width of expanded nodes."""
        return self.width_factor * self.hidden


# ----------------------------------------------------------------------------------- init


def _dense(key: Array, n_in: int, n_out: int) -> dict:
    return {"w": jax.random.normal(key, (n_in, n_out), jnp.float32) * n_in**-0.5,
            "b": jnp.zeros((n_out,), jnp.float32)}


def _init_layer(key: Array, backbone: str, width: int) -> dict:
    if backbone == "gcn":
        return _dense(key, width, width)
    k1, k2 = jax.random.split(key)
    return {"mlp1": _dense(k1, width, width), "mlp2": _dense(k2, width, width),
            "eps": jnp.zeros((), jnp.float32)}


def _init_stack(key: Array, cfg: GNNConfig, width: int) -> dict:
    ks = jax.random.split(key, cfg.num_layers + 2)
    return {
        "embed": _dense(ks[0], cfg.in_features, width),
        "layers": [_init_layer(k, cfg.backbone, width) for k in ks[1:-1]],
        "norms": [{"scale": jnp.ones((width,), jnp.float32), "bias": jnp.zeros((width,))}
                  for _ in range(cfg.num_layers)],
        "readout": _dense(ks[-1], width, cfg.num_classes),
    }


def init(key: Array, cfg: GNNConfig) -> dict:
    """Parameters of `cfg`'s model.

    Returns:
      The backbone: `{"embed", "layers", "norms", "readout"}` at width d. PANDA: `{"low": that,
      "high": the same at width D, "lift": [L × [d, D]], "sel": [L × [D, D]]}`.
    """
    if not cfg.panda:
        return _init_stack(key, cfg, cfg.hidden)
    k_lo, k_hi, k_sel = jax.random.split(key, 3)
    d, D = cfg.hidden, cfg.wide
    return {
        "low": _init_stack(k_lo, cfg, d),
        "high": _init_stack(k_hi, cfg, D),
        "lift": [jnp.eye(d, D, dtype=jnp.float32) for _ in range(cfg.num_layers)],
        "sel": [jax.random.normal(k, (D, D), jnp.float32) * D**-0.5
                for k in jax.random.split(k_sel, cfg.num_layers)],
    }


# ------------------------------------------------------------------------- message passing


def _check_call(graph: object, cfg: object) -> None:
    if not isinstance(cfg, GNNConfig):
        raise ArgumentTypeError(f"cfg must be a GNNConfig, got {type(cfg).__name__}")
    if not isinstance(graph, GraphBatch):
        raise ArgumentTypeError(f"graph must be a GraphBatch (moejax.data.graphs.pad_graphs), "
                                f"got {type(graph).__name__}")
    F = graph.node_features.shape[-1] if hasattr(graph.node_features, "shape") else None
    if F != cfg.in_features:
        raise ValueError(f"graph.node_features must be [N, in_features={cfg.in_features}], got "
                         f"shape {getattr(graph.node_features, 'shape', None)}")


def _gcn_coefficients(g: GraphBatch) -> tuple[Array, Array]:
    """Edge coefficients `[E]` and self-loop coefficients `[N]` of `D^{-1/2} (A + I) D^{-1/2}`."""
    n = g.node_mask.shape[0]
    deg = jax.ops.segment_sum(g.edge_mask, g.receivers, n) + g.node_mask
    inv_sqrt = jnp.where(deg > 0, jax.lax.rsqrt(jnp.maximum(deg, 1.0)), 0.0)
    return inv_sqrt[g.senders] * inv_sqrt[g.receivers] * g.edge_mask, inv_sqrt**2 * g.node_mask


def _neighbour_sum(h: Array, g: GraphBatch, coef: Array) -> Array:
    """`Σ_{j → i} coef_e h_j`: `[N, w]`."""
    return jax.ops.segment_sum(h[g.senders] * coef[:, None], g.receivers, h.shape[0])


def _layer(p: dict, backbone: str, h_self: Array, h_msg: Array, g: GraphBatch,
           gcn_coef: tuple[Array, Array]) -> Array:
    """One GCN/GIN layer; receivers use `h_self`, senders send `h_msg` (equal for plain GNNs)."""
    if backbone == "gcn":
        edge_c, self_c = gcn_coef
        agg = _neighbour_sum(h_msg, g, edge_c) + self_c[:, None] * h_self
        return agg @ p["w"] + p["b"]
    agg = (1.0 + p["eps"]) * h_self + _neighbour_sum(h_msg, g, g.edge_mask)
    hid = jax.nn.relu(agg @ p["mlp1"]["w"] + p["mlp1"]["b"])
    return hid @ p["mlp2"]["w"] + p["mlp2"]["b"]


def _post(p_norm: dict, cfg: GNNConfig, h: Array, z: Array) -> Array:
    h = h + jax.nn.relu(z) if cfg.residual else jax.nn.relu(z)
    if cfg.layer_norm:
        mu = h.mean(-1, keepdims=True)
        var = ((h - mu) ** 2).mean(-1, keepdims=True)
        h = (h - mu) * jax.lax.rsqrt(var + 1e-5) * p_norm["scale"] + p_norm["bias"]
    return h


def top_d_select(h: Array, w_sel: Array, d: int) -> Array:
    """High → low reduction: the `d` top-scoring dimensions of `h ⊙ softmax(ReLU(h W_sel))`.

    Args:
      h: `[N, D]` states of expanded nodes.
      w_sel: `[D, D]` selection weights.
      d: dimensions kept (≤ D).

    Returns:
      `[N, d]`, the kept dimensions in their original order, each times its score.
    """
    scores = jax.nn.softmax(jax.nn.relu(h @ w_sel), axis=-1)
    _, idx = jax.lax.top_k(jax.lax.stop_gradient(scores), d)
    idx = jnp.sort(idx, axis=-1)
    return jnp.take_along_axis(h * scores, idx, axis=-1)


def _masked(x: Array, keep: Array) -> Array:
    return jnp.where(keep[:, None], x, 0.0)


def panda_states(params: dict, graph: GraphBatch, cfg: GNNConfig) -> tuple[Array, Array]:
    """PANDA's final node states: `h_lo` `[N, d]` (zero on expanded nodes) and `h_hi` `[N, D]`
    (zero elsewhere), for `cfg.panda` with `width_factor > 1`."""
    _check_call(graph, cfg)
    if not cfg.panda or cfg.width_factor == 1:
        raise ValueError("panda_states needs cfg.panda=True and cfg.width_factor > 1")
    coef = _gcn_coefficients(graph) if cfg.backbone == "gcn" else None
    high = jnp.asarray(graph.node_high, bool)
    lo_p, hi_p = params["low"], params["high"]
    x = graph.node_features
    h_lo = _masked(x @ lo_p["embed"]["w"] + lo_p["embed"]["b"], ~high)
    h_hi = _masked(x @ hi_p["embed"]["w"] + hi_p["embed"]["b"], high)
    for i in range(cfg.num_layers):
        as_hi = jnp.where(high[:, None], h_hi, h_lo @ params["lift"][i])   # low → high lifted
        if cfg.no_high_to_low:
            sel = jnp.zeros((h_hi.shape[0], cfg.hidden), h_hi.dtype)
        else:
            sel = top_d_select(h_hi, params["sel"][i], cfg.hidden)
        as_lo = jnp.where(high[:, None], sel, h_lo)                        # high → low selected
        z_hi = _layer(hi_p["layers"][i], cfg.backbone, h_hi, as_hi, graph, coef)
        z_lo = _layer(lo_p["layers"][i], cfg.backbone, h_lo, as_lo, graph, coef)
        h_hi = _masked(_post(hi_p["norms"][i], cfg, h_hi, z_hi), high)
        h_lo = _masked(_post(lo_p["norms"][i], cfg, h_lo, z_lo), ~high)
    return h_lo, h_hi


def apply(params: dict, graph: GraphBatch, cfg: GNNConfig) -> Array:
    """Logits `[G, C]` at each graph's target node (`graph.target`).

    Args:
      params: from `init(key, cfg)`.
      graph: a padded `GraphBatch`; PANDA reads `graph.node_high` (set by `mark_central`).
      cfg: the model (static under jit).

    Example:
      >>> cfg = GNNConfig(in_features=F, num_classes=C, panda=True)
      >>> logits = jax.jit(apply, static_argnames="cfg")(init(key, cfg), batch, cfg=cfg)

    Raises:
      ArgumentTypeError / ValueError: `graph` not a `GraphBatch`, `cfg` not a `GNNConfig`, or
        node features of another width than `cfg.in_features`.
    """
    _check_call(graph, cfg)
    coef = _gcn_coefficients(graph) if cfg.backbone == "gcn" else None
    if not cfg.panda or cfg.width_factor == 1:
        p = params["low"] if cfg.panda else params
        h = graph.node_features @ p["embed"]["w"] + p["embed"]["b"]
        for lp, np_ in zip(p["layers"], p["norms"], strict=True):
            h = _post(np_, cfg, h, _layer(lp, cfg.backbone, h, h, graph, coef))
        return h[graph.target] @ p["readout"]["w"] + p["readout"]["b"]

    high = jnp.asarray(graph.node_high, bool)
    lo_p, hi_p = params["low"], params["high"]
    h_lo, h_hi = panda_states(params, graph, cfg)
    t = graph.target
    out_hi = h_hi[t] @ hi_p["readout"]["w"] + hi_p["readout"]["b"]
    out_lo = h_lo[t] @ lo_p["readout"]["w"] + lo_p["readout"]["b"]
    return jnp.where(high[t][:, None], out_hi, out_lo)


def loss_fn(params: dict, graph: GraphBatch, cfg: GNNConfig) -> tuple[Array, Array]:
    """(mean cross-entropy, accuracy) of the target-node predictions over the batch."""
    logits = apply(params, graph, cfg)
    logp = jax.nn.log_softmax(logits)
    ce = -jnp.take_along_axis(logp, graph.labels[:, None], axis=-1).mean()
    return ce, (logits.argmax(-1) == graph.labels).mean()


# --------------------------------------------------------------------- centrality (host)


def _undirected_neighbours(senders: np.ndarray, receivers: np.ndarray,
                           num_nodes: int) -> list[set[int]]:
    nbrs: list[set[int]] = [set() for _ in range(num_nodes)]
    for s, r in zip(senders.tolist(), receivers.tolist(), strict=True):
        if s != r:
            nbrs[s].add(r)
            nbrs[r].add(s)
    return nbrs


def centrality(senders: np.ndarray, receivers: np.ndarray, num_nodes: int, *,
               kind: str = "degree") -> np.ndarray:
    """`float64[n]` centrality of one graph, edges taken as undirected, self-loops ignored.

    "degree": number of distinct neighbours. "betweenness": Brandes (2001) on the unweighted
    graph, `Σ_{s≠v≠t} σ_st(v) / σ_st` over unordered pairs.
    """
    if kind not in CENTRALITIES:
        raise ValueError(f"centrality kind must be one of {CENTRALITIES}, got {kind!r}")
    senders, receivers = np.asarray(senders), np.asarray(receivers)
    if senders.size and (min(senders.min(), receivers.min()) < 0
                         or max(senders.max(), receivers.max()) >= num_nodes):
        raise ValueError(f"an edge points outside the graph's {num_nodes} nodes")
    nbrs = _undirected_neighbours(senders, receivers, num_nodes)
    if kind == "degree":
        return np.array([len(s) for s in nbrs], np.float64)
    bc = np.zeros(num_nodes)
    for s in range(num_nodes):
        stack, preds = [], [[] for _ in range(num_nodes)]
        sigma = np.zeros(num_nodes)
        sigma[s] = 1
        dist = np.full(num_nodes, -1)
        dist[s] = 0
        queue = deque([s])
        while queue:
            v = queue.popleft()
            stack.append(v)
            for w in nbrs[v]:
                if dist[w] < 0:
                    dist[w] = dist[v] + 1
                    queue.append(w)
                if dist[w] == dist[v] + 1:
                    sigma[w] += sigma[v]
                    preds[w].append(v)
        delta = np.zeros(num_nodes)
        while stack:
            w = stack.pop()
            for v in preds[w]:
                delta[v] += sigma[v] / sigma[w] * (1 + delta[w])
            if w != s:
                bc[w] += delta[w]
    return bc / 2


def has_high_to_low(batch: GraphBatch) -> bool:
    """Whether some real edge of the (host) batch goes from an expanded node to an ordinary one."""
    high = np.asarray(batch.node_high, bool)
    real = np.asarray(batch.edge_mask) > 0
    return bool(np.any(real & high[np.asarray(batch.senders)]
                       & ~high[np.asarray(batch.receivers)]))


def mark_central(batch: GraphBatch, *, k: int, kind: str = "degree") -> GraphBatch:
    """The batch with `node_high` set on the top-k nodes of each graph by centrality (host).

    Ties go to the lower node index. Computed once per graph with numpy; call it when building
    the data set, not inside a jitted step.

    Raises:
      ValueError: `k` negative or larger than some graph's node count.
    """
    _check_int("k", k, lo=0)
    node_graph = np.asarray(batch.node_graph)
    mask = np.asarray(batch.node_mask) > 0
    emask = np.asarray(batch.edge_mask) > 0
    senders, receivers = np.asarray(batch.senders)[emask], np.asarray(batch.receivers)[emask]
    high = np.zeros(node_graph.shape[0], bool)
    for gi in range(len(batch.target)):
        nodes = np.flatnonzero((node_graph == gi) & mask)
        if k > nodes.size:
            raise ValueError(f"k={k} is larger than graph {gi}'s node count {nodes.size}")
        if k == 0:
            continue
        local = -np.ones(node_graph.shape[0], np.int64)
        local[nodes] = np.arange(nodes.size)
        inside = (local[senders] >= 0) & (local[receivers] >= 0)
        c = centrality(local[senders[inside]], local[receivers[inside]], nodes.size, kind=kind)
        order = np.lexsort((np.arange(nodes.size), -c))   # by centrality desc, then index
        high[nodes[order[:k]]] = True
    return batch._replace(node_high=high)


# ---------------------------------------------------------------------------------------------
# The training loop's model contract (`moejax.train.steps`).


def _init_model(key: Array, cfg: GNNConfig) -> tuple[dict, dict]:
    return init(key, cfg), {}


def _model_loss(params: dict, state: dict, graph: GraphBatch, *, cfg: GNNConfig, train: bool,
                rng: Array | None = None) -> tuple[Array, tuple[dict, dict]]:
    del train, rng  # deterministic model
    ce, acc = loss_fn(params, graph, cfg)
    return ce, (state, {"ce": ce, "acc": acc, "weight": jnp.float32(graph.labels.shape[0])})


def _check_graph_batch(batch: Any, *, cfg: GNNConfig, train_cfg: Any) -> None:
    if not isinstance(batch, GraphBatch):
        raise ArgumentTypeError(f"GNN batches must be moejax.data.graphs.GraphBatch, got "
                        f"{type(batch).__name__}")
    if np.asarray(batch.node_features).shape[-1] != cfg.in_features:
        raise ValueError(f"batch.node_features has {np.asarray(batch.node_features).shape[-1]} "
                         f"features, the model's in_features is {cfg.in_features}")


# `init`/`loss_fn` with the loop's signatures (the model state is empty); a batch is one padded
# `GraphBatch`, replicated on every device (its node and edge counts need not divide the mesh).
MODEL = ModelFns(init=_init_model, loss_fn=_model_loss, check_batch=_check_graph_batch,
                 batch_spec=P())
