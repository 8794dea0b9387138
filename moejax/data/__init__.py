"""Data (DESIGN §8): grain pipelines, deterministic per seed, with checkpointable iterator state.

  corpus    byte-level text (stdlib `.py` sources by default, or a user glob), packed windows
  mqar      Zoology multi-query associative recall, loss only at answer positions
  hmm       GINC-style mixture of HMMs, latent (concept, state) labels on every token
  clusters  Gaussian-mixture points with labels, for router tests

Every `make_*_dataset` returns a grain `MapDataset` of batches; one function reads any of them:

  iterator(dataset, shard=None)   a grain `DatasetIterator`: `get_state()` is a JSON-able dict and
                                  `set_state(state)` on a fresh iterator built with the same
                                  arguments resumes with the identical next batches (orbax:
                                  `grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)`);
                                  `shard=grain.sharding.ShardByJaxProcess(drop_remainder=True)`
                                  gives each process every n-th batch (`batch_size` per process)

  >>> it = data.iterator(data.make_corpus_dataset(data.CorpusConfig(), split="train", seed=0,
  ...                                             batch_size=8, seq_len=256))
"""

from moejax.data.clusters import Clusters as Clusters
from moejax.data.clusters import make_clusters as make_clusters
from moejax.data.corpus import BYTE_VOCAB_SIZE as BYTE_VOCAB_SIZE
from moejax.data.corpus import EOS_ID as EOS_ID
from moejax.data.corpus import NUL_ID as NUL_ID
from moejax.data.corpus import CorpusConfig as CorpusConfig
from moejax.data.corpus import corpus_files as corpus_files
from moejax.data.corpus import decode as decode
from moejax.data.corpus import encode as encode
from moejax.data.corpus import load_corpus_tokens as load_corpus_tokens
from moejax.data.corpus import make_corpus_dataset as make_corpus_dataset
from moejax.data.hmm import HMMConfig as HMMConfig
from moejax.data.hmm import HMMParams as HMMParams
from moejax.data.hmm import generate_hmm_example as generate_hmm_example
from moejax.data.hmm import hmm_example as hmm_example
from moejax.data.hmm import make_hmm_dataset as make_hmm_dataset
from moejax.data.hmm import make_hmm_params as make_hmm_params
from moejax.data.mqar import MQAR_SETTINGS as MQAR_SETTINGS
from moejax.data.mqar import MQARConfig as MQARConfig
from moejax.data.mqar import generate_mqar_example as generate_mqar_example
from moejax.data.mqar import make_mqar_dataset as make_mqar_dataset
from moejax.data.mqar import mqar_example as mqar_example
from moejax.data.pipeline import iterator as iterator

__all__ = [
    "BYTE_VOCAB_SIZE",
    "EOS_ID",
    "MQAR_SETTINGS",
    "NUL_ID",
    "Clusters",
    "CorpusConfig",
    "HMMConfig",
    "HMMParams",
    "MQARConfig",
    "corpus_files",
    "decode",
    "encode",
    "generate_hmm_example",
    "generate_mqar_example",
    "hmm_example",
    "iterator",
    "load_corpus_tokens",
    "make_clusters",
    "make_corpus_dataset",
    "make_hmm_dataset",
    "make_hmm_params",
    "make_mqar_dataset",
    "mqar_example",
]
