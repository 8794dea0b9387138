"""MQAR: layout, answers, loss mask, gap distribution, determinism, resume, bad input."""

import json

import numpy as np
import pytest

from moejax.data import iterator
from moejax.data.mqar import (
    MQAR_SETTINGS,
    MQARConfig,
    generate_mqar_example,
    make_mqar_dataset,
    mqar_example,
)


def _check_example(cfg: MQARConfig, ex: dict) -> None:
    L, P, V = cfg.seq_len, cfg.num_kv_pairs, cfg.vocab_size
    x, y, m = ex["inputs"], ex["targets"], ex["loss_mask"]
    pos, ans = ex["answer_positions"], ex["answer_targets"]
    assert x.shape == y.shape == m.shape == (L,)
    assert pos.shape == ans.shape == (P,)
    assert x.dtype == y.dtype == pos.dtype == ans.dtype == np.int32 and m.dtype == np.float32
    assert x.min() >= 0 and x.max() < V
    keys, values = x[0 : 2 * P : 2], x[1 : 2 * P : 2]
    assert len(set(keys.tolist())) == P and len(set(values.tolist())) == P
    assert keys.min() >= 1 and keys.max() < V // 2
    assert values.min() >= V // 2 and values.max() < V
    # Queries: each key exactly once, after the context, at even offsets, ascending.
    assert np.all(np.diff(pos) > 0) and pos[0] >= 2 * P and pos[-1] < L
    assert np.all((pos - 2 * P) % 2 == 0)
    assert sorted(x[pos].tolist()) == sorted(keys.tolist())
    # The answer at a query is its key's value from the context.
    kv = dict(zip(keys.tolist(), values.tolist(), strict=True))
    np.testing.assert_array_equal(ans, [kv[k] for k in x[pos].tolist()])
    np.testing.assert_array_equal(y[pos], ans)
    # Loss only at answer positions; targets 0 (a valid id) elsewhere.
    expected_mask = np.zeros(L, np.float32)
    expected_mask[pos] = 1.0
    np.testing.assert_array_equal(m, expected_mask)
    assert np.all(y[m == 0] == 0)


@pytest.mark.parametrize(("L", "P"), MQAR_SETTINGS, ids=[f"L{L}-kv{P}" for L, P in MQAR_SETTINGS])
def test_answers_and_mask(L, P):
    cfg = MQARConfig(seq_len=L, num_kv_pairs=P)
    for i in range(20):
        _check_example(cfg, mqar_example(cfg, seed=0, split="train", index=i))


def test_batches_have_the_example_layout():
    cfg = MQARConfig(seq_len=128, num_kv_pairs=8)
    batch = make_mqar_dataset(cfg, split="test", seed=0, batch_size=6, num_examples=12)[1]
    assert batch["inputs"].shape == (6, 128) and batch["answer_positions"].shape == (6, 8)
    for r in range(6):  # unshuffled test split: row r of batch 1 is example 6 + r
        ex = {k: v[r] for k, v in batch.items()}
        _check_example(cfg, ex)
        ref = mqar_example(cfg, seed=0, split="test", index=6 + r)
        for k in ref:
            np.testing.assert_array_equal(ex[k], ref[k], err_msg=k)


def test_non_queries_are_zero_without_random_fill():
    cfg = MQARConfig(seq_len=64, num_kv_pairs=4, random_non_queries=False)
    ex = generate_mqar_example(cfg, np.random.default_rng(0))
    _check_example(cfg, ex)
    filler = np.ones(64, bool)
    filler[:8] = False
    filler[ex["answer_positions"]] = False
    assert np.all(ex["inputs"][filler] == 0)


def test_gaps_follow_a_power_law():
    cfg = MQARConfig(seq_len=256, num_kv_pairs=16)
    slots = np.concatenate(
        [
            (mqar_example(cfg, seed=0, split="train", index=i)["answer_positions"] - 32) // 2
            for i in range(300)
        ]
    )
    counts = np.bincount(slots, minlength=cfg.num_slots)
    # p(g) ∝ g^-0.99: the first slots are far more frequent than the last ones.
    assert counts[:4].sum() > 5 * counts[-4:].sum()
    assert slots.mean() < 0.5 * (cfg.num_slots - 1)


def test_deterministic_per_seed_and_seeds_and_splits_differ():
    cfg = MQARConfig()
    a = mqar_example(cfg, seed=3, split="train", index=5)
    b = mqar_example(cfg, seed=3, split="train", index=5)
    c = mqar_example(cfg, seed=4, split="train", index=5)
    d = mqar_example(cfg, seed=3, split="test", index=5)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["inputs"], c["inputs"])
    assert not np.array_equal(a["inputs"], d["inputs"])


def test_iterator_deterministic_and_resumes_exactly():
    cfg = MQARConfig(seq_len=64, num_kv_pairs=4)
    kw = dict(split="train", seed=1, batch_size=4, num_examples=10)  # epochs wrap every 2 batches
    it = iterator(make_mqar_dataset(cfg, **kw))
    first = [next(it) for _ in range(3)]
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(6)]
    again = iterator(make_mqar_dataset(cfg, **kw))
    for x, y in zip(first, [next(again) for _ in range(3)], strict=True):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
    fresh = iterator(make_mqar_dataset(cfg, **kw))
    fresh.set_state(state)
    for x, y in zip(expected, [next(fresh) for _ in range(6)], strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    other = next(iterator(make_mqar_dataset(cfg, **(kw | dict(seed=2)))))
    assert not np.array_equal(other["inputs"], first[0]["inputs"])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(seq_len=63), "seq_len"),
        (dict(seq_len=64, num_kv_pairs=17), "num_kv_pairs"),
        (dict(num_kv_pairs=0), "num_kv_pairs"),
        (dict(vocab_size=64), "vocab_size"),
        (dict(vocab_size=8191), "vocab_size"),
        (dict(power_a=0.0), "power_a"),
        (dict(random_non_queries=None), "random_non_queries"),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}{w}" for k, w in v.items()),
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MQARConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(batch_size=0), "batch_size"),
        (dict(num_examples=0), "num_examples"),
        (dict(split="dev"), "split"),
        (dict(seed=-1), "seed"),
        (dict(split="test", num_examples=3), "batch_size"),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}{w}" for k, w in v.items()),
)
def test_argument_errors_name_the_field(kwargs, field):
    args = dict(split="train", seed=0, batch_size=4) | kwargs
    with pytest.raises(ValueError, match=field):
        make_mqar_dataset(MQARConfig(), **args)
