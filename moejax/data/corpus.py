"""Byte-level text corpus: packed fixed-length windows served by a checkpointable grain pipeline.

Tokens are raw bytes, ids 0..255. Documents (files) are joined with a separator token, so a model
can see where one file ends and the next begins:

  * `eos_token=False` (default): the separator is the NUL byte 0, which text and source files do
    not contain, so the vocabulary stays 256.
  * `eos_token=True`: the separator is a special token `EOS_ID = 256` and the vocabulary is 257.

Source files:

  * default (`data_glob=None`): the running Python's standard-library `.py` sources, found with
    `sysconfig.get_paths()["stdlib"]`; `site-packages`, `dist-packages`, `__pycache__` and test
    directories (`test`, `tests`, `idle_test`) are skipped. Always present, nothing to download
    (about 12 MB in 730 files on CPython 3.11).
  * `data_glob="~/text/**/*.txt"`: the user's files (`glob` with `recursive=True`; directories
    are ignored), read as bytes.

Split: a file goes to `"val"` when the SHA-256 of its path, relative to the glob's fixed prefix
(the stdlib directory for the default source), maps below `val_fraction`; so the split depends only
on file names, is the same on every machine and run, and does not move when files are added. When
a glob holds too few files for both splits to get one (a single text file, say), every file is cut
by bytes instead: its first `1 - val_fraction` goes to train, the rest to val.

Memory: a split is read once into one `uint8` (or `uint16` with `eos_token`) array, at most
`max_bytes` bytes (default 16 MiB, enough for the whole default source); files are taken in a fixed
pseudo-random order (a salted hash of their names), so a cap keeps a varied sample rather than the
alphabetically first files. Loaded splits are cached per (config, split).

Windows: a split of `n` tokens yields `(n - 1) // T` windows; window `i` is tokens
`[i*T, i*T + T + 1)`, so `inputs` are its first `T` tokens and `targets` its last `T` (the same
tokens shifted by one) and every token is a target exactly once. With `document_boundaries`
(default) a window also carries `segment_ids`, the file of each input, so the LM attends and
carries state only within a file.

Pipeline (`make_corpus_dataset`): `MapDataset.range(num_windows)` → `shuffle(seed)` (train) →
`repeat(num_epochs)` (a new order every epoch) → window lookup → `batch(B, drop_remainder=True)`.
`moejax.data.iterator(make_corpus_dataset(...))` gives the grain `DatasetIterator`;
`it.get_state()` is a small JSON-able dict (`{"next_index": k}`) and `set_state(state)` on a fresh
iterator built with the same arguments resumes with the identical next batches. It is also what
`grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)` store in an orbax checkpoint.

Axis letters: B batch, T sequence length (`seq_len`).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import os
import sysconfig
from pathlib import Path
from typing import Any

import grain
import numpy as np

from moejax.data.pipeline import check_num_epochs as _check_num_epochs
from moejax.data.pipeline import check_shuffle as _check_shuffle
from moejax.data.pipeline import check_split as _check_split
from moejax.data.pipeline import index_pipeline as _index_pipeline
from moejax.validation import ArgumentTypeError, check_bool, check_range
from moejax.validation import check_int as _check_int

BYTE_VOCAB_SIZE = 256
NUL_ID = 0  # document separator when `eos_token=False`
EOS_ID = 256  # document separator when `eos_token=True`
DEFAULT_MAX_BYTES = 16 * 2**20
CORPUS_SPLITS = ("train", "val")

# Directory names never descended into for the default (stdlib) source.
_STDLIB_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
)

# Prefetch settings shared by every moejax pipeline: items are cheap numpy work, so a couple of
# threads and a short buffer keep CPU free for the model while never starving it.


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class CorpusConfig:
    """Which text to read and how to split it. Hashable; validated on construction.

    Attributes:
      data_glob: glob of the user's text files (`~` expanded, `**` recursive); `None` reads the
        standard-library `.py` sources of the running Python.
      val_fraction: share of files (by name hash) held out for `"val"`, in [0, 1). With 0 the
        val split is empty.
      max_bytes: cap on the bytes read per split (`None`: no cap, the whole source is loaded).
      eos_token: separate documents with the special token `EOS_ID = 256` (vocabulary 257) instead
        of the NUL byte (vocabulary 256).
      document_boundaries: batches carry `segment_ids` `[B, T]`, each window's documents
        numbered from 0 (a new one begins after each separator), so the LM models every file
        as if alone (`moejax.models.lm.apply`); False: windows are plain token streams that
        run across files.
    """

    data_glob: str | None = None
    val_fraction: float = 0.02
    max_bytes: int | None = DEFAULT_MAX_BYTES
    eos_token: bool = False
    document_boundaries: bool = True

    def __post_init__(self):
        if self.data_glob is not None and not isinstance(self.data_glob, str):
            raise ArgumentTypeError(f"data_glob must be a str or None, got {self.data_glob!r}")
        if self.data_glob is not None and not self.data_glob.strip():
            raise ValueError(f"data_glob must be a non-empty str or None, got {self.data_glob!r}")
        check_range("val_fraction", self.val_fraction, 0.0, 1.0, lo_open=False, hi_open=True)
        if self.max_bytes is not None:
            _check_int("max_bytes", self.max_bytes, lo=1)
        check_bool("eos_token", self.eos_token)
        check_bool("document_boundaries", self.document_boundaries)

    @property
    def vocab_size(self) -> int:
        """256 byte ids, plus `EOS_ID` when `eos_token` is set."""
        return BYTE_VOCAB_SIZE + int(self.eos_token)

    @property
    def separator_id(self) -> int:
        """Token placed after every document: `EOS_ID` or `NUL_ID`."""
        return EOS_ID if self.eos_token else NUL_ID


# ---------------------------------------------------------------------------------------------
# Text <-> tokens.


def encode(text: str | bytes) -> np.ndarray:
    """UTF-8 bytes of `text` as token ids.

    Args:
      text: a string (encoded as UTF-8) or raw bytes.

    Returns:
      `<int32>[len(bytes)]` ids in [0, 256).
    """
    if not isinstance(text, str | bytes | bytearray | memoryview):
        raise ArgumentTypeError(f"text must be a str or bytes, got {type(text).__name__}")
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32)


def decode(ids: Any) -> str:
    """Text of byte ids; separators (`NUL_ID`, `EOS_ID`) and ids ≥ 256 are dropped.

    Args:
      ids: `[T]` integer ids (numpy or jax array, or a list).

    Returns:
      the UTF-8 decoding of the remaining bytes, invalid sequences replaced by U+FFFD.
    """
    arr = np.asarray(ids).reshape(-1).astype(np.int64)
    arr = arr[(arr > NUL_ID) & (arr < BYTE_VOCAB_SIZE)]
    return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------
# Files and split.


def corpus_files(cfg: CorpusConfig, split: str | None = None) -> list[Path]:
    """Files of the source, in the order they are read, optionally only one split's.

    Args:
      cfg: corpus config.
      split: `"train"`, `"val"`, or `None` for all files. When the byte fallback is in use (too
        few files for a per-file split, see the module docstring) every file is in both splits.

    Returns:
      absolute paths, ordered by a salted hash of their relative names (the read order).

    Raises:
      ValueError: `data_glob` matches no files, or `split` is unknown.
    """
    if split is not None:
        _check_split(split, CORPUS_SPLITS)
    root, names = _list_source(cfg.data_glob)
    if split is None or _byte_split_fallback(cfg, names):
        chosen = names
    else:
        chosen = [n for n in names if _in_val(n, cfg.val_fraction) == (split == "val")]
    return [Path(root, n) for n in chosen]


def _list_source(data_glob: str | None) -> tuple[str, list[str]]:
    """(root, relative posix names in read order) of the source files."""
    if data_glob is None:
        root = sysconfig.get_paths()["stdlib"]
        names = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS)
            for f in filenames:
                if f.endswith(".py"):
                    names.append(Path(os.path.relpath(os.path.join(dirpath, f), root)).as_posix())
        if not names:
            raise ValueError(f"no standard-library .py files found under {root!r}")
    else:
        pattern = os.path.expanduser(data_glob)
        paths = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
        if not paths:
            raise ValueError(f"data_glob={data_glob!r} matches no files")
        root = _glob_root(pattern)
        names = [Path(os.path.relpath(p, root)).as_posix() for p in paths]
    names = sorted(set(names), key=lambda n: (_hash_unit(n, salt=b"order:"), n))
    return root, names


def _glob_root(pattern: str) -> str:
    """The directory made of the pattern's leading wildcard-free components."""
    parts = Path(pattern).parts
    fixed: list[str] = []
    for part in parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    if len(fixed) == len(parts):  # no wildcard at all: a single file
        fixed = fixed[:-1]
    return os.path.abspath(os.path.join(*fixed)) if fixed else os.path.abspath(os.curdir)


def _hash_unit(name: str, *, salt: bytes = b"") -> float:
    """A stable number in [0, 1) from a relative file name."""
    digest = hashlib.sha256(salt + name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _in_val(name: str, val_fraction: float) -> bool:
    return _hash_unit(name) < val_fraction


def _byte_split_fallback(cfg: CorpusConfig, names: list[str]) -> bool:
    """True when a per-file split would leave one split without files (while val is wanted)."""
    if cfg.val_fraction == 0.0:
        return False
    n_val = sum(_in_val(n, cfg.val_fraction) for n in names)
    return n_val == 0 or n_val == len(names)


# ---------------------------------------------------------------------------------------------
# Loading.


def load_corpus_tokens(cfg: CorpusConfig, split: str) -> np.ndarray:
    """All tokens of one split: its documents, each followed by `cfg.separator_id`.

    Args:
      cfg: corpus config.
      split: `"train"` or `"val"`.

    Returns:
      read-only `<uint8>[n]` (`<uint16>[n]` with `eos_token`) array, `n ≤ max_bytes`; cached.

    Raises:
      ValueError: unknown split, a glob matching nothing, an unreadable file, or an empty split.
    """
    _check_split(split, CORPUS_SPLITS)
    return _load_split(cfg, split)


@functools.lru_cache(maxsize=8)
def _load_split(cfg: CorpusConfig, split: str) -> np.ndarray:
    root, names = _list_source(cfg.data_glob)
    by_bytes = _byte_split_fallback(cfg, names)
    if not by_bytes:
        names = [n for n in names if _in_val(n, cfg.val_fraction) == (split == "val")]
    budget = cfg.max_bytes if cfg.max_bytes is not None else float("inf")
    dtype = np.uint16 if cfg.eos_token else np.uint8
    sep = np.array([cfg.separator_id], dtype)
    pieces: list[np.ndarray] = []
    total = 0
    for name in names:
        if total >= budget:
            break
        path = os.path.join(root, name)
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise ValueError(f"cannot read data file {path!r}: {e}") from e
        if by_bytes:
            cut = int(np.ceil(len(data) * (1.0 - cfg.val_fraction)))
            data = data[:cut] if split == "train" else data[cut:]
        if not data:
            continue
        doc = np.frombuffer(data, np.uint8)
        take = int(min(doc.size + 1, budget - total))
        piece = np.concatenate([doc.astype(dtype), sep])[:take]
        pieces.append(piece)
        total += piece.size
    if not pieces:
        source = "the standard library" if cfg.data_glob is None else f"data_glob={cfg.data_glob!r}"
        raise ValueError(
            f"the {split!r} split of {source} is empty (val_fraction={cfg.val_fraction}); "
            "use more files, other files, or another val_fraction"
        )
    tokens = np.concatenate(pieces)
    tokens.flags.writeable = False
    return tokens


# ---------------------------------------------------------------------------------------------
# grain pipeline.


def make_corpus_dataset(
    cfg: CorpusConfig,
    *,
    split: str,
    seed: int,
    batch_size: int,
    seq_len: int,
    num_epochs: int | None = -1,
    shuffle: bool | None = None,
) -> grain.MapDataset:
    """Batches of packed byte windows as a grain `MapDataset`.

    Args:
      cfg: corpus config.
      split: `"train"` or `"val"`.
      seed: shuffle seed (the corpus content does not depend on it).
      batch_size: B, > 0. Incomplete final batches are dropped.
      seq_len: T, > 0.
      num_epochs: passes over the split; `None` repeats forever. The default (-1) means forever
        for train and 1 for val.
      shuffle: shuffle windows (a new order every epoch); default True for train, False for val.

    Returns:
      a `MapDataset` of dicts `{"inputs": <int32>[B, T], "targets": <int32>[B, T]}` with
      `targets[:, t] == inputs[:, t + 1]` inside a row, plus `"segment_ids": <int32>[B, T]`
      with `cfg.document_boundaries` (the document of each input within its window: 0 from the
      window's start, +1 after each separator; the separator belongs to the file it ends and
      its target is the next file's first token).

    Raises:
      ValueError: a bad argument (the message names it) or a split too short for one batch.

    Example:
      >>> cfg = CorpusConfig(max_bytes=2**16)
      >>> ds = make_corpus_dataset(cfg, split="train", seed=0, batch_size=2, seq_len=8)
      >>> ds[0]["inputs"].shape
      (2, 8)
    """
    _check_split(split, CORPUS_SPLITS)
    _check_int("seed", seed, lo=0)
    _check_int("batch_size", batch_size, lo=1)
    _check_int("seq_len", seq_len, lo=1)
    _check_num_epochs(num_epochs)
    _check_shuffle(shuffle)
    if num_epochs == -1:
        num_epochs = None if split == "train" else 1
    if shuffle is None:
        shuffle = split == "train"
    tokens = load_corpus_tokens(cfg, split)
    num_windows = (tokens.size - 1) // seq_len
    if num_windows == 0:
        raise ValueError(
            f"the {split!r} split holds {tokens.size} tokens, fewer than seq_len + 1 = "
            f"{seq_len + 1}; lower seq_len or raise max_bytes"
        )
    if num_epochs is not None and num_windows * num_epochs < batch_size:
        raise ValueError(
            f"the {split!r} split gives {num_windows} windows of seq_len={seq_len} "
            f"x num_epochs={num_epochs}, fewer than batch_size={batch_size}"
        )

    sep = cfg.separator_id

    def window(i: int) -> dict[str, np.ndarray]:
        start = int(i) * seq_len
        w = tokens[start : start + seq_len + 1].astype(np.int32)
        out = {"inputs": w[:-1], "targets": w[1:]}
        if cfg.document_boundaries:
            ends = (w[:-2] == sep).astype(np.int32)
            out["segment_ids"] = np.concatenate([np.zeros(1, np.int32), np.cumsum(ends,
                                                                                 dtype=np.int32)])
        return out

    return _index_pipeline(
        num_windows, window, seed=seed, batch_size=batch_size, num_epochs=num_epochs,
        shuffle=shuffle,
    )

