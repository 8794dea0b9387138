"""GINC-style HMM data: parameters, labels consistent with the generating process, shift."""

import dataclasses
import json

import numpy as np
import pytest

from moejax.data import iterator
from moejax.data.hmm import (
    HMMConfig,
    generate_hmm_example,
    hmm_example,
    make_hmm_dataset,
    make_hmm_params,
)

CFG = HMMConfig(num_concepts=3, num_states=5, vocab_size=40, seq_len=48, emission_support=6)


def test_params_are_sparse_distributions():
    p = make_hmm_params(CFG)
    C, S, V = 3, 5, 40
    assert p.initial.shape == (C, S)
    assert p.transition.shape == (C, S, S) and p.emission.shape == (C, S, V)
    for a in p:
        np.testing.assert_allclose(a.sum(-1), 1.0, rtol=1e-12)
        assert a.min() >= 0
    assert np.all((p.transition > 0).sum(-1) == CFG.num_successors)
    assert np.all((p.emission > 0).sum(-1) == CFG.emission_support)
    assert make_hmm_params(CFG) is p  # cached
    other = make_hmm_params(dataclasses.replace(CFG, world_seed=1))
    assert not np.array_equal(other.emission, p.emission)


def test_labels_consistent_with_generating_process():
    p = make_hmm_params(CFG)
    S = CFG.num_states
    seen = set()
    for i in range(30):
        ex = hmm_example(CFG, seed=0, split="train", index=i)
        x, y, c, s, lab = ex["inputs"], ex["targets"], ex["concept"], ex["state"], ex["label"]
        for a in ex.values():
            assert a.shape == (48,) and a.dtype == np.int32
        assert np.all(c == c[0])
        concept = int(c[0])
        seen.add(concept)
        np.testing.assert_array_equal(lab, concept * S + s)
        np.testing.assert_array_equal(y[:-1], x[1:])
        # Each token lies in its state's emission support (hence in its concept's support) ...
        assert np.all(p.emission[concept, s, x] > 0)
        support = np.flatnonzero(p.emission[concept].sum(0) > 0)
        assert set(x.tolist()) <= set(support.tolist())
        # ... and the state path follows the concept's transition graph.
        assert p.initial[concept, s[0]] > 0
        assert np.all(p.transition[concept, s[:-1], s[1:]] > 0)
    assert seen == {0, 1, 2}


def test_sampler_matches_emission_and_transition_probabilities():
    cfg = HMMConfig(num_concepts=1, num_states=3, vocab_size=6, seq_len=20000,
                    num_successors=3, emission_support=4)
    p = make_hmm_params(cfg)
    ex = generate_hmm_example(cfg, np.random.default_rng(0))
    x, s = ex["inputs"], ex["state"]
    # Visit frequencies approach the chain's stationary distribution.
    w, v = np.linalg.eig(p.transition[0].T)
    pi = np.real(v[:, np.argmin(np.abs(w - 1))])
    np.testing.assert_allclose(np.bincount(s, minlength=3) / s.size, pi / pi.sum(), atol=0.03)
    for state in range(3):
        n = int((s == state).sum())
        atol = 3.0 / np.sqrt(n)  # ~6 standard errors of a frequency
        freq = np.bincount(x[s == state], minlength=6) / n
        np.testing.assert_allclose(freq, p.emission[0, state], atol=atol)
        nxt = s[1:][s[:-1] == state]
        np.testing.assert_allclose(np.bincount(nxt, minlength=3) / nxt.size,
                                   p.transition[0, state], atol=atol)


def test_concept_argument_fixes_the_concept():
    batch = make_hmm_dataset(CFG, split="test", seed=0, batch_size=8, num_examples=8, concept=2)[0]
    assert np.all(batch["concept"] == 2)
    assert np.all(batch["label"] // CFG.num_states == 2)


def test_shift_changes_emissions_only():
    base = make_hmm_params(CFG)
    half = make_hmm_params(dataclasses.replace(CFG, shift=0.5))
    full = make_hmm_params(dataclasses.replace(CFG, shift=1.0))
    np.testing.assert_array_equal(half.initial, base.initial)
    np.testing.assert_array_equal(half.transition, base.transition)
    assert not np.allclose(half.emission, base.emission)
    np.testing.assert_allclose(half.emission.sum(-1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(half.emission, 0.5 * base.emission + 0.5 * full.emission)
    assert np.array_equal(make_hmm_params(dataclasses.replace(CFG, shift=0.0)).emission,
                          base.emission)
    # Shifted sequences use tokens the original emissions never produce.
    shifted = dataclasses.replace(CFG, shift=1.0)
    outside = 0
    for i in range(10):
        ex = hmm_example(shifted, seed=0, split="test", index=i)
        outside += int(np.sum(base.emission[ex["concept"], ex["state"], ex["inputs"]] == 0))
    assert outside > 0


def test_disjoint_vocab_gives_each_concept_its_own_slice():
    cfg = dataclasses.replace(CFG, disjoint_vocab=True)  # V // C = 13 tokens per concept
    for shift in (0.0, 1.0):
        p = make_hmm_params(dataclasses.replace(cfg, shift=shift))
        np.testing.assert_allclose(p.emission.sum(-1), 1.0, rtol=1e-12)
        support = p.emission.sum(1) > 0  # [C, V]
        for c in range(3):
            assert set(np.flatnonzero(support[c])) <= set(range(13 * c, 13 * (c + 1)))
        if shift == 0.0:
            assert np.all((p.emission > 0).sum(-1) == CFG.emission_support)
    for i in range(10):
        ex = hmm_example(cfg, seed=0, split="train", index=i)
        c = int(ex["concept"][0])
        assert np.all(ex["inputs"] // 13 == c)
    # The overlapping default shares tokens across concepts (and is unchanged by the option).
    shared = make_hmm_params(CFG).emission.sum(1) > 0
    assert np.any(shared.sum(0) > 1)
    with pytest.raises(ValueError, match="emission_support"):
        HMMConfig(num_concepts=4, vocab_size=64, emission_support=17, disjoint_vocab=True)
    with pytest.raises(ValueError, match="disjoint_vocab"):
        HMMConfig(disjoint_vocab=1)


def test_deterministic_per_seed_and_resumes_exactly():
    kw = dict(split="train", seed=5, batch_size=4, num_examples=9)
    a = [next(it) for it in [iterator(make_hmm_dataset(CFG, **kw))] for _ in range(3)]
    it = iterator(make_hmm_dataset(CFG, **kw))
    b = [next(it) for _ in range(3)]
    for x, y in zip(a, b, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(5)]
    fresh = iterator(make_hmm_dataset(CFG, **kw))
    fresh.set_state(state)
    for x, y in zip(expected, [next(fresh) for _ in range(5)], strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    other = next(iterator(make_hmm_dataset(CFG, **(kw | dict(seed=6)))))
    assert not np.array_equal(other["inputs"], a[0]["inputs"])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(num_concepts=0), "num_concepts"),
        (dict(num_states=4, num_successors=5), "num_successors"),
        (dict(vocab_size=8, emission_support=9), "emission_support"),
        (dict(concentration=0.0), "concentration"),
        (dict(shift=1.5), "shift"),
        (dict(shift=-0.1), "shift"),
        (dict(world_seed=-1), "world_seed"),
        (dict(seq_len=2.0), "seq_len"),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}{w}" for k, w in v.items()),
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        HMMConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(concept=3), "concept"),
        (dict(batch_size=0), "batch_size"),
        (dict(split="dev"), "split"),
        (dict(num_epochs=0), "num_epochs"),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}{w}" for k, w in v.items()),
)
def test_argument_errors_name_the_field(kwargs, field):
    args = dict(split="train", seed=0, batch_size=4) | kwargs
    with pytest.raises(ValueError, match=field):
        make_hmm_dataset(CFG, **args)
