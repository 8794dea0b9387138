"""Multi-Query Associative Recall (MQAR), as in Zoology (Arora et al., 2023, arXiv:2312.04927).

An example of length L holds `n_kv` key-value pairs, then the same keys again as queries at
power-law distributed gaps; the model must answer each query with its key's value.

Layout (Zoology's `multiquery_ar`, `random_non_queries=True`):

  * keys are drawn without replacement from `[1, V/2)`, values from `[V/2, V)`;
  * positions `0 .. 2*n_kv - 1` hold `k_0 v_0 k_1 v_1 ...`;
  * the remaining `L - 2*n_kv` positions form `(L - 2*n_kv) // 2` slots; `n_kv` distinct slots
    `g` are drawn with probability ∝ `a * g**(a - 1)` (g = 1, 2, …; `power_a = a = 0.01`,
    so short gaps dominate), and key `i` is placed at position `2*n_kv + 2*g_i` (0-based slot);
  * every other position holds a random token from the whole vocabulary;
  * the target at a query position is the queried key's value. That is the only place the loss
    counts: `loss_mask` is 1 there and 0 elsewhere, and `targets` is 0 elsewhere (a valid id, so a
    gather never goes out of bounds; Zoology writes -100 there instead).

`answer_positions` lists the `n_kv` query positions in ascending order and `answer_targets` the
values expected there, so a model can compute logits only at those positions.

Settings used in the paper's sweeps: `MQAR_SETTINGS = ((64, 4), (128, 8), (256, 16), (512, 64))`
as (L, n_kv).

Every example is a pure function of `(seed, split, index)` (`np.random.default_rng([seed,
split_code, index])`), so datasets are deterministic per seed, splits never share examples, and a
grain iterator's state is just the next index.

Axis letters: B batch, L sequence length, P = n_kv answer positions per example.
"""

from __future__ import annotations

import dataclasses
import functools

import grain
import numpy as np

from moejax.data.pipeline import example_rng, synthetic_dataset
from moejax.validation import check_bool, check_range
from moejax.validation import check_int as _check_int

MQAR_SETTINGS = ((64, 4), (128, 8), (256, 16), (512, 64))
MQAR_VOCAB_SIZE = 8192


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class MQARConfig:
    """One MQAR task. Hashable; validated on construction.

    Attributes:
      seq_len: L, even, ≥ 4 * num_kv_pairs (Zoology's constraint).
      num_kv_pairs: n_kv ≥ 1, at most V/2 - 1 (distinct keys) and V/2 (distinct values).
      vocab_size: V, even, > seq_len. Keys use `[1, V/2)`, values `[V/2, V)`.
      power_a: exponent `a` of the gap distribution `p(g) ∝ a * g**(a - 1)`, in (0, 1].
      random_non_queries: fill non-key/value/query positions with random tokens (Zoology's
        default) instead of 0.
    """

    seq_len: int = 64
    num_kv_pairs: int = 4
    vocab_size: int = MQAR_VOCAB_SIZE
    power_a: float = 0.01
    random_non_queries: bool = True

    def __post_init__(self):
        _check_int("seq_len", self.seq_len, lo=4)
        _check_int("num_kv_pairs", self.num_kv_pairs, lo=1)
        _check_int("vocab_size", self.vocab_size, lo=4)
        if self.seq_len % 2:
            raise ValueError(f"seq_len must be even, got {self.seq_len}")
        if 4 * self.num_kv_pairs > self.seq_len:
            raise ValueError(
                f"num_kv_pairs={self.num_kv_pairs} needs seq_len >= 4 * num_kv_pairs = "
                f"{4 * self.num_kv_pairs}, got seq_len={self.seq_len}"
            )
        if self.vocab_size % 2:
            raise ValueError(f"vocab_size must be even, got {self.vocab_size}")
        if self.vocab_size <= self.seq_len:
            raise ValueError(f"vocab_size={self.vocab_size} must be > seq_len={self.seq_len}")
        if self.num_kv_pairs > self.vocab_size // 2 - 1:
            raise ValueError(
                f"num_kv_pairs={self.num_kv_pairs} exceeds the {self.vocab_size // 2 - 1} "
                f"distinct keys of vocab_size={self.vocab_size}"
            )
        check_range("power_a", self.power_a, 0.0, 1.0)
        check_bool("random_non_queries", self.random_non_queries)

    @property
    def num_slots(self) -> int:
        """Query slots after the key-value context: `(L - 2 * n_kv) // 2`."""
        return (self.seq_len - 2 * self.num_kv_pairs) // 2


@functools.lru_cache(maxsize=32)
def _gap_probs(num_slots: int, power_a: float) -> np.ndarray:
    g = np.arange(1, num_slots + 1, dtype=np.float64)
    p = power_a * g ** (power_a - 1.0)
    p = p / p.sum()
    p.flags.writeable = False
    return p


def generate_mqar_example(cfg: MQARConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Draws one MQAR example.

    Args:
      cfg: task config.
      rng: numpy generator (consumed).

    Returns:
      dict with
        `inputs`: `<int32>[L]` token ids;
        `targets`: `<int32>[L]` the value at query positions, 0 elsewhere;
        `loss_mask`: `<float32>[L]` 1 at query positions, 0 elsewhere;
        `answer_positions`: `<int32>[P]` query positions, ascending;
        `answer_targets`: `<int32>[P]` `targets[answer_positions]`.
    """
    L, P, V = cfg.seq_len, cfg.num_kv_pairs, cfg.vocab_size
    half = V // 2
    keys = 1 + rng.choice(half - 1, size=P, replace=False)
    values = half + rng.choice(V - half, size=P, replace=False)
    p_gap = _gap_probs(cfg.num_slots, float(cfg.power_a))
    gaps = rng.choice(cfg.num_slots, size=P, replace=False, p=p_gap)

    inputs = np.zeros(L, np.int64)
    inputs[0 : 2 * P : 2] = keys
    inputs[1 : 2 * P : 2] = values
    positions = 2 * P + 2 * gaps
    inputs[positions] = keys
    if cfg.random_non_queries:
        free = np.ones(L, bool)
        free[: 2 * P] = False
        free[positions] = False
        inputs[free] = rng.integers(0, V, size=int(free.sum()))

    order = np.argsort(positions)
    answer_positions = positions[order].astype(np.int32)
    answer_targets = values[order].astype(np.int32)
    targets = np.zeros(L, np.int32)
    targets[answer_positions] = answer_targets
    loss_mask = np.zeros(L, np.float32)
    loss_mask[answer_positions] = 1.0
    return {
        "inputs": inputs.astype(np.int32),
        "targets": targets,
        "loss_mask": loss_mask,
        "answer_positions": answer_positions,
        "answer_targets": answer_targets,
    }


def mqar_example(cfg: MQARConfig, *, seed: int, split: str, index: int) -> dict[str, np.ndarray]:
    """Example `index` of a split: a pure function of `(cfg, seed, split, index)`.

    Args:
      cfg: task config.
      seed: dataset seed, ≥ 0.
      split: `"train"`, `"val"` or `"test"` (independent streams).
      index: example index, ≥ 0.

    Returns:
      the dict of `generate_mqar_example`.
    """
    return generate_mqar_example(cfg, example_rng(seed, split, index))


def make_mqar_dataset(
    cfg: MQARConfig,
    *,
    split: str,
    seed: int,
    batch_size: int,
    num_examples: int = 100_000,
    num_epochs: int | None = -1,
    shuffle: bool | None = None,
) -> grain.MapDataset:
    """Batches of a fixed set of `num_examples` MQAR examples as a grain `MapDataset`.

    Args:
      cfg: task config.
      split: `"train"`, `"val"` or `"test"`.
      seed: dataset and shuffle seed, ≥ 0.
      batch_size: B, > 0; incomplete final batches are dropped.
      num_examples: distinct examples in the split (Zoology: 100 000 train, 3 000 test).
      num_epochs: passes; `None` forever. Default (-1): forever for train, 1 otherwise.
      shuffle: new example order each epoch; default True for train only.

    Returns:
      a `MapDataset` of dicts with `inputs`, `targets` `<int32>[B, L]`, `loss_mask`
      `<float32>[B, L]`, `answer_positions`, `answer_targets` `<int32>[B, P]`.

    Example:
      >>> ds = make_mqar_dataset(MQARConfig(seq_len=64, num_kv_pairs=4), split="train",
      ...                        seed=0, batch_size=8)
      >>> ds[0]["answer_positions"].shape
      (8, 4)
    """
    return synthetic_dataset(
        lambda rng: generate_mqar_example(cfg, rng), split=split, seed=seed,
        batch_size=batch_size, num_examples=num_examples, num_epochs=num_epochs, shuffle=shuffle,
    )

