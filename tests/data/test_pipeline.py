"""`moejax.data.iterator`: the one reader of every `make_*_dataset`, exact resume, sharding."""

import json

import grain
import numpy as np
import pytest

from moejax import data
from moejax.data.pipeline import index_pipeline
from tests.data.test_corpus import _assert_batches_equal, _take

MQAR = data.MQARConfig(seq_len=64, num_kv_pairs=4)




def _range_batches(n, batch_size):
    """Batches `{"i": [B]}` of the indices 0..n-1 in order, one pass."""
    return index_pipeline(n, lambda i: {"i": np.int64(i)}, seed=0, batch_size=batch_size,
                          num_epochs=1, shuffle=False)


def test_iterator_yields_the_dataset_batches_in_order():
    ds = data.make_mqar_dataset(MQAR, split="train", seed=3, batch_size=4, num_examples=10)
    _assert_batches_equal(_take(data.iterator(ds), 7), [ds[i] for i in range(7)])


@pytest.mark.parametrize("make", ["corpus", "mqar", "hmm"])
def test_every_dataset_resumes_exactly_from_json_state(make):
    build = {
        "corpus": lambda: data.make_corpus_dataset(data.CorpusConfig(max_bytes=2**14),
                                                   split="train", seed=1, batch_size=2,
                                                   seq_len=16),
        "mqar": lambda: data.make_mqar_dataset(MQAR, split="train", seed=1, batch_size=4,
                                               num_examples=10),
        "hmm": lambda: data.make_hmm_dataset(data.HMMConfig(seq_len=16), split="train", seed=1,
                                             batch_size=4, num_examples=9),
    }[make]
    it = data.iterator(build())
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 4)
    fresh = data.iterator(build())
    fresh.set_state(state)
    _assert_batches_equal(_take(fresh, 4), expected)


def test_one_pass_dataset_ends():
    assert [b["i"].tolist() for b in data.iterator(_range_batches(7, 2))] == [[0, 1], [2, 3],
                                                                              [4, 5]]


@pytest.mark.parametrize("count", [2, 3])
def test_shards_concatenate_to_the_larger_batch_stream(count):
    # An endless shuffled train stream: step s of the n shards, concatenated in shard order, is
    # batch s of the same dataset with batch_size · n (the global stream ignores the shard count).
    kw = dict(split="train", seed=5, num_examples=11)  # epochs wrap inside the steps read
    shards = [data.iterator(data.make_mqar_dataset(MQAR, batch_size=2, **kw),
                            shard=grain.sharding.ShardOptions(i, count, drop_remainder=True))
              for i in range(count)]
    steps = [_take(it, 4) for it in shards]
    whole = data.make_mqar_dataset(MQAR, batch_size=2 * count, **kw)
    for s in range(4):
        for k in whole[s]:
            np.testing.assert_array_equal(
                np.concatenate([steps[i][s][k] for i in range(count)]), whole[s][k], err_msg=k)


def test_shards_of_a_finite_dataset_partition_its_batches():
    ds = _range_batches(10, 2)  # 5 batches
    got = [[b["i"].tolist() for b in data.iterator(ds, shard=grain.sharding.ShardOptions(i, 2))]
           for i in range(2)]
    assert got == [[[0, 1], [4, 5], [8, 9]], [[2, 3], [6, 7]]]
    even = [[b["i"].tolist() for b in data.iterator(
        ds, shard=grain.sharding.ShardOptions(i, 2, drop_remainder=True))] for i in range(2)]
    assert even == [[[0, 1], [4, 5]], [[2, 3], [6, 7]]]


@pytest.mark.parametrize("shard", [None, grain.sharding.NoSharding(),
                                   grain.sharding.ShardByJaxProcess(drop_remainder=True)],
                         ids=["none", "no_sharding", "by_jax_process"])
def test_single_process_shard_is_the_whole_stream(shard):
    ds = data.make_mqar_dataset(MQAR, split="train", seed=2, batch_size=4, num_examples=10)
    _assert_batches_equal(_take(data.iterator(ds, shard=shard), 5), [ds[i] for i in range(5)])


def test_sharded_iterator_resumes_exactly():
    ds = data.make_mqar_dataset(MQAR, split="train", seed=4, batch_size=2, num_examples=9)
    shard = grain.sharding.ShardOptions(1, 2)
    it = data.iterator(ds, shard=shard)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 3)
    _assert_batches_equal(expected, [ds[2 * s + 1] for s in range(3, 6)])
    fresh = data.iterator(ds, shard=shard)
    fresh.set_state(state)
    _assert_batches_equal(_take(fresh, 3), expected)
