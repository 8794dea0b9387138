"""Bad-input cases of the data pipelines (corpus, MQAR, HMM, clusters, graphs, `iterator`) and of
DARS.

Every config and pipeline argument goes through `moejax.validation` (one set of rules): a str,
None or bool where a number belongs is an `ArgumentTypeError`, a number out of range a
`ValueError`; both name the argument.
"""

from __future__ import annotations

import numpy as np

from moejax.data import clusters, corpus, graphs, hmm, iterator, mqar
from moejax.finetune import dars
from moejax.validation import ArgumentTypeError
from tests.reliability.cases import Case


def _graph(**overrides):
    ex = {"features": np.zeros((3, 2), np.float32), "senders": np.array([1, 2]),
          "receivers": np.array([0, 0]), "target": 0, "label": 1}
    return {k: v for k, v in {**ex, **overrides}.items() if v is not None}


def _select(**kw):
    params = {"w": np.zeros((4, 3), np.float32)}
    args = {"targets": {("w",): "site"}, "acts": {"site": np.ones((5, 4))},
            "grads": {"w": np.ones((4, 3), np.float32)}, **kw}
    return dars.select("dars", params, args.pop("targets"), dars.DarsConfig(), **args)


_CORPUS = corpus.CorpusConfig(max_bytes=2**12)
_DS = dict(split="train", seed=0, batch_size=2, seq_len=8)

CASES = [
    # corpus
    Case("data-corpus-val-fraction-str", lambda: corpus.CorpusConfig(val_fraction="0.1"),
         ArgumentTypeError, ("val_fraction", "number")),
    Case("data-corpus-val-fraction-one", lambda: corpus.CorpusConfig(val_fraction=1.0),
         ValueError, ("val_fraction", "[0.0, 1.0)")),
    Case("data-corpus-eos-token-str", lambda: corpus.CorpusConfig(eos_token="False"),
         ArgumentTypeError, ("eos_token", "bool")),
    Case("data-corpus-data-glob-list", lambda: corpus.CorpusConfig(data_glob=["*.txt"]),
         ArgumentTypeError, ("data_glob", "str")),
    Case("data-corpus-seq-len-none",
         lambda: corpus.make_corpus_dataset(_CORPUS, **{**_DS, "seq_len": None}),
         ArgumentTypeError, ("seq_len", "int")),
    Case("data-corpus-shuffle-str",
         lambda: corpus.make_corpus_dataset(_CORPUS, **_DS, shuffle="no"), ArgumentTypeError,
         ("shuffle", "bool")),
    Case("data-corpus-num-epochs-float",
         lambda: corpus.make_corpus_dataset(_CORPUS, **_DS, num_epochs=1.5), ArgumentTypeError,
         ("num_epochs", "int")),
    Case("data-corpus-split", lambda: corpus.make_corpus_dataset(_CORPUS, **{**_DS, "split": 0}),
         ValueError, ("split", "train")),
    Case("data-encode-none", lambda: corpus.encode(None), ArgumentTypeError, ("text", "str")),
    # MQAR
    Case("data-mqar-power-a-str", lambda: mqar.MQARConfig(power_a="0.01"), ArgumentTypeError,
         ("power_a", "number")),
    Case("data-mqar-power-a-zero", lambda: mqar.MQARConfig(power_a=0), ValueError,
         ("power_a", "(0.0, 1.0]")),
    Case("data-mqar-seq-len-float", lambda: mqar.MQARConfig(seq_len=64.0), ArgumentTypeError,
         ("seq_len", "int")),
    Case("data-mqar-random-non-queries-int", lambda: mqar.MQARConfig(random_non_queries=1),
         ArgumentTypeError, ("random_non_queries", "bool")),
    Case("data-mqar-batch-size-none",
         lambda: mqar.make_mqar_dataset(mqar.MQARConfig(), split="train", seed=0,
                                        batch_size=None),
         ArgumentTypeError, ("batch_size", "int")),
    # HMM
    Case("data-hmm-concentration-none", lambda: hmm.HMMConfig(concentration=None),
         ArgumentTypeError, ("concentration", "number")),
    Case("data-hmm-concentration-zero", lambda: hmm.HMMConfig(concentration=0.0), ValueError,
         ("concentration", "(0.0, inf)")),
    Case("data-hmm-shift-bool", lambda: hmm.HMMConfig(shift=True), ArgumentTypeError,
         ("shift", "number")),
    Case("data-hmm-concept-str",
         lambda: hmm.make_hmm_dataset(hmm.HMMConfig(), split="train", seed=0, batch_size=2,
                                      concept="0"),
         ArgumentTypeError, ("concept", "int")),
    # iterator
    Case("data-iterator-list", lambda: iterator([{"inputs": np.zeros((2, 8))}]),
         ArgumentTypeError, ("dataset", "MapDataset", "list")),
    Case("data-iterator-iterator",
         lambda: iterator(iterator(mqar.make_mqar_dataset(mqar.MQARConfig(), split="train",
                                                          seed=0, batch_size=2))),
         ArgumentTypeError, ("dataset", "MapDataset")),
    Case("data-iterator-shard-int",
         lambda: iterator(hmm.make_hmm_dataset(hmm.HMMConfig(), split="train", seed=0,
                                               batch_size=2), shard=0),
         ArgumentTypeError, ("shard", "ShardOptions", "int")),
    # clusters
    Case("data-clusters-std-str",
         lambda: clusters.make_clusters(0, num_points=4, num_clusters=2, dim=2, std="1"),
         ArgumentTypeError, ("std", "number")),
    Case("data-clusters-separation-negative",
         lambda: clusters.make_clusters(0, num_points=4, num_clusters=2, dim=2, separation=-1),
         ValueError, ("separation", "(0.0, inf)")),
    Case("data-clusters-means-str", lambda: clusters.make_clusters(0, num_points=4, means="ab"),
         ArgumentTypeError, ("means", "array")),
    Case("data-clusters-weights-ragged",
         lambda: clusters.make_clusters(0, num_points=4, num_clusters=2, dim=2,
                                        weights=[1.0, [2.0]]),
         ArgumentTypeError, ("weights",)),
    Case("data-clusters-num-points-none",
         lambda: clusters.make_clusters(0, num_points=None, num_clusters=2, dim=2),
         ArgumentTypeError, ("num_points", "int")),
    # graphs
    Case("data-graphs-depth-str", lambda: graphs.NeighborsMatchConfig(depth="3"),
         ArgumentTypeError, ("depth", "int")),
    Case("data-graphs-bidirectional-str",
         lambda: graphs.NeighborsMatchConfig(bidirectional="yes"), ArgumentTypeError,
         ("bidirectional", "bool")),
    Case("data-graphs-pad-not-a-list", lambda: graphs.pad_graphs(_graph()), ArgumentTypeError,
         ("graphs", "sequence")),
    Case("data-graphs-pad-missing-key", lambda: graphs.pad_graphs([_graph(senders=None)]),
         ValueError, ("graph 0", "'senders'")),
    Case("data-graphs-pad-edge-outside",
         lambda: graphs.pad_graphs([_graph(), _graph(senders=np.array([1, 5]))]), ValueError,
         ("graph 1", "outside")),
    # DARS
    Case("data-dars-budget-str", lambda: dars.DarsConfig(budget="0.05"), ArgumentTypeError,
         ("budget", "number")),
    Case("data-dars-rho-above-one", lambda: dars.DarsConfig(rho=1.5), ValueError,
         ("rho", "[0.0, 1.0]")),
    Case("data-dars-rank-float", lambda: dars.DarsConfig(rank=8.0), ArgumentTypeError,
         ("rank", "int")),
    Case("data-dars-select-missing-site", lambda: _select(acts={"other": np.ones((5, 4))}),
         ValueError, ("acts", "'site'")),
    Case("data-dars-select-bad-path", lambda: _select(targets={("v",): "site"}), ValueError,
         ("path", "'v'")),
    Case("data-dars-select-method", lambda: dars.select("best", {}, {}, dars.DarsConfig()),
         ValueError, ("method", "dars")),
    Case("data-dars-subspace-acts-str", lambda: dars.principal_subspace("acts", 2),
         ArgumentTypeError, ("acts", "array")),
]
