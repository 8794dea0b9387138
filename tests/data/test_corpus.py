"""Byte corpus: split, packing, determinism, exact resume, bad input."""

import dataclasses
import json

import numpy as np
import pytest

from moejax.data import iterator
from moejax.data.corpus import (
    EOS_ID,
    CorpusConfig,
    corpus_files,
    decode,
    encode,
    load_corpus_tokens,
    make_corpus_dataset,
)

# A small cap keeps the default (stdlib) source fast to load.
STDLIB = CorpusConfig(max_bytes=2**17)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.fixture
def text_dir(tmp_path):
    """40 small text files with known content under tmp_path/docs/{a,b}/."""
    rng = np.random.default_rng(0)
    for i in range(40):
        sub = tmp_path / "docs" / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        words = rng.choice(["alpha", "beta", "gamma", "delta", "é", "\n"], size=60)
        (sub / f"f{i:02d}.txt").write_text(f"file {i}: " + " ".join(words), encoding="utf-8")
    (tmp_path / "docs" / "a" / "skip.bin").write_bytes(b"\x01\x02")  # not matched by *.txt
    return tmp_path / "docs"


def test_encode_decode_roundtrip():
    text = "def f(x):\n    return 'π' * x\n"
    ids = encode(text)
    assert ids.dtype == np.int32 and ids.max() < 256
    assert decode(ids) == text
    assert decode(np.concatenate([ids, [0, EOS_ID], ids])) == text + text


def test_default_source_is_stdlib_without_tests():
    files = corpus_files(STDLIB)
    names = {f.name for f in files}
    assert "os.py" in names and "functools.py" in names
    for f in files:
        assert f.suffix == ".py"
        assert not {"site-packages", "test", "tests", "__pycache__"} & set(f.parts)


def test_split_disjoint_complete_and_stable():
    all_files = corpus_files(STDLIB)
    train, val = corpus_files(STDLIB, "train"), corpus_files(STDLIB, "val")
    assert set(train).isdisjoint(val)
    assert set(train) | set(val) == set(all_files)
    assert 0 < len(val) < 0.1 * len(all_files)
    assert corpus_files(STDLIB, "val") == val  # stable across calls
    tr, va = load_corpus_tokens(STDLIB, "train"), load_corpus_tokens(STDLIB, "val")
    assert tr.size == 2**17 and 0 < va.size <= 2**17  # max_bytes caps each split


def test_split_depends_only_on_file_name(text_dir):
    cfg = CorpusConfig(data_glob=str(text_dir / "**" / "*.txt"), val_fraction=0.25)
    val_before = set(corpus_files(cfg, "val"))
    assert 0 < len(val_before) < 40
    for i in range(40, 60):  # adding files never moves an existing one
        (text_dir / "b" / f"f{i:02d}.txt").write_text(f"new {i}")
    train_after, val_after = corpus_files(cfg, "train"), corpus_files(cfg, "val")
    assert val_before <= set(val_after)
    assert val_before.isdisjoint(train_after)
    assert len(train_after) + len(val_after) == 60


def test_glob_tokens_are_documents_joined_by_separator(text_dir):
    cfg = CorpusConfig(data_glob=str(text_dir / "**" / "*.txt"), val_fraction=0.2)
    for split in ("train", "val"):
        files = corpus_files(cfg, split)
        expected = b"".join(f.read_bytes() + b"\x00" for f in files)
        tokens = load_corpus_tokens(cfg, split)
        assert tokens.dtype == np.uint8
        assert tokens.tobytes() == expected


def test_single_file_falls_back_to_byte_split(tmp_path):
    data = bytes(range(1, 256)) * 40
    (tmp_path / "one.txt").write_bytes(data)
    cfg = CorpusConfig(data_glob=str(tmp_path / "one.txt"), val_fraction=0.1)
    train, val = load_corpus_tokens(cfg, "train"), load_corpus_tokens(cfg, "val")
    assert train[:-1].tobytes() + val[:-1].tobytes() == data
    assert abs(val.size - 0.1 * len(data)) <= 2
    assert train[-1] == 0 and val[-1] == 0


def test_eos_token_vocab(text_dir):
    cfg = CorpusConfig(data_glob=str(text_dir / "a" / "*.txt"), eos_token=True)
    assert cfg.vocab_size == 257 and cfg.separator_id == EOS_ID
    ds = make_corpus_dataset(cfg, split="train", seed=0, batch_size=4, seq_len=32)
    batch = next(iterator(ds))
    tokens = load_corpus_tokens(cfg, "train")
    assert tokens.dtype == np.uint16 and (tokens == EOS_ID).sum() == len(corpus_files(cfg, "train"))
    assert batch["inputs"].max() <= EOS_ID


@pytest.mark.parametrize("seq_len", [1, 7, 64])
def test_packing_shapes_and_shift(seq_len):
    B = 5
    ds = make_corpus_dataset(STDLIB, split="val", seed=0, batch_size=B, seq_len=seq_len)
    tokens = load_corpus_tokens(STDLIB, "val").astype(np.int32)
    assert len(ds) == ((tokens.size - 1) // seq_len) // B
    for b in (0, len(ds) - 1):
        batch = ds[b]
        assert batch["inputs"].shape == batch["targets"].shape == (B, seq_len)
        assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
        np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
        for r in range(B):  # unshuffled val: row r of batch b is window b*B + r
            start = (b * B + r) * seq_len
            np.testing.assert_array_equal(batch["inputs"][r], tokens[start : start + seq_len])
            np.testing.assert_array_equal(
                batch["targets"][r], tokens[start + 1 : start + seq_len + 1]
            )


def test_val_iterator_is_one_pass():
    it = iterator(make_corpus_dataset(STDLIB, split="val", seed=0, batch_size=8, seq_len=128))
    n = (load_corpus_tokens(STDLIB, "val").size - 1) // 128 // 8
    assert sum(1 for _ in it) == n


def test_deterministic_per_seed_and_seeds_differ():
    kw = dict(split="train", batch_size=4, seq_len=32)
    a = _take(iterator(make_corpus_dataset(STDLIB, seed=0, **kw)), 3)
    b = _take(iterator(make_corpus_dataset(STDLIB, seed=0, **kw)), 3)
    c = _take(iterator(make_corpus_dataset(STDLIB, seed=1, **kw)), 3)
    _assert_batches_equal(a, b)
    assert not all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, c, strict=True))


def test_train_covers_every_window_once_per_epoch(text_dir):
    cfg = CorpusConfig(data_glob=str(text_dir / "**" / "*.txt"), val_fraction=0.0)
    seq_len, B = 16, 1
    n = (load_corpus_tokens(cfg, "train").size - 1) // seq_len
    ds = make_corpus_dataset(cfg, split="train", seed=3, batch_size=B, seq_len=seq_len)
    first = [ds[i]["inputs"][0].tobytes() for i in range(n)]
    second = [ds[i]["inputs"][0].tobytes() for i in range(n, 2 * n)]
    assert len(set(first)) == len(set(second)) == len(set(first) | set(second))
    assert first != second  # reshuffled each epoch


def test_state_restore_gives_identical_continuation(text_dir):
    # A tiny corpus, so the continuation crosses several epoch boundaries.
    cfg = CorpusConfig(data_glob=str(text_dir / "**" / "*.txt"))
    kw = dict(split="train", seed=7, batch_size=8, seq_len=16)
    it = iterator(make_corpus_dataset(cfg, **kw))
    n_per_epoch = (load_corpus_tokens(cfg, "train").size - 1) // 16 // 8
    _take(it, n_per_epoch + 3)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    expected = _take(it, 2 * n_per_epoch + 5)
    fresh = iterator(make_corpus_dataset(cfg, **kw))
    fresh.set_state(state)
    _assert_batches_equal(_take(fresh, 2 * n_per_epoch + 5), expected)


def test_glob_matching_nothing_names_the_glob(tmp_path):
    pattern = str(tmp_path / "nothing" / "*.txt")
    with pytest.raises(ValueError, match="data_glob=.*nothing"):
        make_corpus_dataset(
            CorpusConfig(data_glob=pattern), split="train", seed=0, batch_size=1, seq_len=8
        )


def test_empty_files_give_clear_error(tmp_path):
    for i in range(3):
        (tmp_path / f"e{i}.txt").write_bytes(b"")
    cfg = CorpusConfig(data_glob=str(tmp_path / "*.txt"))
    with pytest.raises(ValueError, match="empty"):
        load_corpus_tokens(cfg, "train")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(val_fraction=1.0), "val_fraction"),
        (dict(val_fraction=-0.1), "val_fraction"),
        (dict(max_bytes=0), "max_bytes"),
        (dict(data_glob=""), "data_glob"),
        (dict(eos_token=1), "eos_token"),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(v),
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        CorpusConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(batch_size=0), "batch_size"),
        (dict(seq_len=0), "seq_len"),
        (dict(seq_len=10**7), "seq_len"),
        (dict(seed=-1), "seed"),
        (dict(split="test"), "split"),
        (dict(num_epochs=0), "num_epochs"),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(v),
)
def test_argument_errors_name_the_field(kwargs, field):
    args = dict(split="train", seed=0, batch_size=2, seq_len=8) | kwargs
    with pytest.raises(ValueError, match=field):
        iterator(make_corpus_dataset(STDLIB, **args))


def test_cache_returns_read_only_array():
    tokens = load_corpus_tokens(STDLIB, "train")
    assert tokens is load_corpus_tokens(STDLIB, "train")  # cached
    with pytest.raises(ValueError):
        tokens[0] = 1


def test_segment_ids_mark_the_files_of_each_window():
    """With `document_boundaries` (default) every window numbers its files from 0, a new one
    beginning right after each separator; without it the batches are plain token windows."""
    cfg = CorpusConfig(max_bytes=2**16)
    b = make_corpus_dataset(cfg, split="train", seed=0, batch_size=64, seq_len=512)[0]
    inputs, seg = b["inputs"], b["segment_ids"]
    assert seg.dtype == np.int32 and seg.shape == inputs.shape
    expected = np.concatenate([np.zeros((64, 1), np.int32),
                               np.cumsum(inputs[:, :-1] == cfg.separator_id, axis=1)], axis=1)
    np.testing.assert_array_equal(seg, expected)
    assert seg.max() >= 1  # the 64 windows of 512 bytes cross at least one file boundary
    plain = make_corpus_dataset(dataclasses.replace(cfg, document_boundaries=False),
                                split="train", seed=0, batch_size=64, seq_len=512)[0]
    assert set(plain) == {"inputs", "targets"}
    np.testing.assert_array_equal(plain["inputs"], inputs)


def test_document_boundaries_must_be_a_bool():
    with pytest.raises(ValueError, match="document_boundaries"):
        CorpusConfig(document_boundaries="yes")
