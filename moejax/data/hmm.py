"""GINC-style mixture-of-HMMs data (Xie et al., 2021, "An Explanation of In-context Learning as
Implicit Bayesian Inference", arXiv:2111.02080), with latent labels on every token.

There are C concepts; concept `c` is an HMM with S hidden states over V tokens:

  * initial distribution `initial[c]`: `[S]`, Dirichlet(`concentration`);
  * transitions `transition[c, s]`: `[S]`, non-zero on `num_successors` states — the state
    `perm_c[s]` of a random permutation `perm_c` (so every concept's chain is irreducible) plus
    `num_successors - 1` other random states — with Dirichlet weights;
  * emissions `emission[c, s]`: `[V]`, non-zero on `emission_support` random tokens, Dirichlet
    weights. Supports are drawn independently per (concept, state), so concepts share the
    vocabulary but differ in which tokens each state can produce (GINC's setting, the default).
    With `disjoint_vocab=True` concept `c` emits only from its own slice of `V // C` tokens,
    `[c·(V // C), (c + 1)·(V // C))` (a control: the concept is then readable from any token).

All parameters are a pure function of `world_seed`, so the train and test streams (and every seed)
see the same concepts. A sequence draws its concept uniformly (or takes the one asked for), then a
state path from the chain and one token per state. Each token carries its latent labels: `concept`,
`state` and the flat `label = concept * S + state` (in `[0, C*S)`), e.g. as targets for
routing-specialisation studies.

Shift (test-time adaptation): with `shift = λ ∈ [0, 1]` the emissions become
`(1 - λ) * emission + λ * emission_alt`, where `emission_alt` is a second sparse table drawn from
`(world_seed, shift_seed)` in the same way (with `disjoint_vocab`, in the same slices). Initial
and transition probabilities are unchanged, so
the latent labels keep their meaning while the surface tokens move. `λ = 0` is the original data.

Axis letters: B batch, T sequence length, C concepts, S states, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import grain
import numpy as np

from moejax.data.pipeline import example_rng, synthetic_dataset
from moejax.validation import check_bool, check_range
from moejax.validation import check_int as _check_int


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class HMMConfig:
    """A family of C HMMs and the sequences drawn from it. Hashable; validated on construction.

    Attributes:
      num_concepts: C ≥ 1.
      num_states: S ≥ 1 hidden states per concept.
      vocab_size: V ≥ 2 tokens.
      seq_len: T ≥ 1; each example draws T + 1 tokens (inputs and shifted targets).
      num_successors: non-zero entries per transition row, 1 ≤ num_successors ≤ S.
      emission_support: tokens each state can emit, 1 ≤ emission_support ≤ V.
      concentration: Dirichlet parameter (> 0) of the initial, transition and emission weights.
      world_seed: seed of the HMM parameters (not of the sampled sequences), ≥ 0.
      shift: emission shift λ in [0, 1] (see the module docstring).
      shift_seed: seed of the alternative emission table used by `shift`, ≥ 0.
      disjoint_vocab: give each concept its own slice of `V // C` tokens (needs
        `emission_support ≤ V // C`); False (default): concepts share the vocabulary.
    """

    num_concepts: int = 4
    num_states: int = 8
    vocab_size: int = 64
    seq_len: int = 64
    num_successors: int = 2
    emission_support: int = 8
    concentration: float = 1.0
    world_seed: int = 0
    shift: float = 0.0
    shift_seed: int = 1
    disjoint_vocab: bool = False

    def __post_init__(self):
        _check_int("num_concepts", self.num_concepts, lo=1)
        _check_int("num_states", self.num_states, lo=1)
        _check_int("vocab_size", self.vocab_size, lo=2)
        _check_int("seq_len", self.seq_len, lo=1)
        _check_int("num_successors", self.num_successors, lo=1, hi=self.num_states)
        _check_int("emission_support", self.emission_support, lo=1, hi=self.vocab_size)
        _check_int("world_seed", self.world_seed, lo=0)
        _check_int("shift_seed", self.shift_seed, lo=0)
        check_range("concentration", self.concentration, 0.0, math.inf, hi_open=True)
        check_range("shift", self.shift, 0.0, 1.0, lo_open=False)
        check_bool("disjoint_vocab", self.disjoint_vocab)
        if self.disjoint_vocab:
            _check_int("emission_support", self.emission_support, lo=1,
                       hi=self.vocab_size // self.num_concepts)

    @property
    def num_labels(self) -> int:
        """Number of flat latent labels, C * S."""
        return self.num_concepts * self.num_states


class HMMParams(NamedTuple):
    """Parameters of the C HMMs (float64, read-only, rows sum to 1).

    Attributes:
      initial: `[C, S]` initial state distributions.
      transition: `[C, S, S]` `transition[c, s, s']` = P(next state s' | state s, concept c).
      emission: `[C, S, V]` emission distributions, shift already applied.
    """

    initial: np.ndarray
    transition: np.ndarray
    emission: np.ndarray


def _sparse_rows(rng, n_rows: int, width: int, k: int, alpha: float, forced=None) -> np.ndarray:
    """`[n_rows, width]` rows, `k` Dirichlet-weighted non-zeros each (incl. column `forced[r]`)."""
    out = np.zeros((n_rows, width))
    for r in range(n_rows):
        if forced is None:
            cols = rng.choice(width, size=k, replace=False)
        else:
            others = np.delete(np.arange(width), forced[r])
            cols = np.concatenate([[forced[r]], rng.choice(others, size=k - 1, replace=False)])
        w = rng.dirichlet(np.full(k, alpha))
        # Small alpha can underflow entries to 0; a floor keeps every chosen entry reachable.
        w = np.maximum(w, 1e-6)
        out[r, cols] = w / w.sum()
    return out


def _emission_table(cfg: HMMConfig, rng: np.random.Generator) -> np.ndarray:
    C, S, V = cfg.num_concepts, cfg.num_states, cfg.vocab_size
    if not cfg.disjoint_vocab:
        rows = _sparse_rows(rng, C * S, V, cfg.emission_support, cfg.concentration)
        return rows.reshape(C, S, V)
    width = V // C
    out = np.zeros((C, S, V))
    for c in range(C):
        out[c, :, c * width:(c + 1) * width] = _sparse_rows(rng, S, width, cfg.emission_support,
                                                           cfg.concentration)
    return out


@functools.lru_cache(maxsize=16)
def make_hmm_params(cfg: HMMConfig) -> HMMParams:
    """The HMM family of `cfg`: a pure function of its fields (cached).

    Args:
      cfg: HMM config.

    Returns:
      `HMMParams` with `initial [C, S]`, `transition [C, S, S]`, `emission [C, S, V]`.
    """
    C, S = cfg.num_concepts, cfg.num_states
    rng = np.random.default_rng([cfg.world_seed, 0])
    alpha = float(cfg.concentration)
    initial = rng.dirichlet(np.full(S, alpha), size=C)
    transition = np.stack(
        [
            _sparse_rows(rng, S, S, cfg.num_successors, alpha, forced=rng.permutation(S))
            for _ in range(C)
        ]
    )
    emission = _emission_table(cfg, rng)
    if cfg.shift > 0.0:
        alt = _emission_table(cfg, np.random.default_rng([cfg.world_seed, 1, cfg.shift_seed]))
        emission = (1.0 - cfg.shift) * emission + cfg.shift * alt
    params = HMMParams(initial, transition, emission)
    for a in params:
        a.flags.writeable = False
    return params


@functools.lru_cache(maxsize=16)
def _cumulative(cfg: HMMConfig) -> HMMParams:
    """Row-wise CDFs of the parameters, last column exactly 1 (for `searchsorted` sampling)."""

    def cdf(p: np.ndarray) -> np.ndarray:
        c = np.cumsum(p, axis=-1)
        c = c / c[..., -1:]
        c[..., -1] = 1.0
        return c

    return HMMParams(*(cdf(p) for p in make_hmm_params(cfg)))


def generate_hmm_example(
    cfg: HMMConfig, rng: np.random.Generator, *, concept: int | None = None
) -> dict[str, np.ndarray]:
    """Draws one sequence of T + 1 tokens from one concept.

    Args:
      cfg: HMM config.
      rng: numpy generator (consumed).
      concept: concept to sample from; `None` draws it uniformly.

    Returns:
      dict of `[T]` arrays, all `int32`, aligned with `inputs`:
        `inputs`: tokens 0..T-1; `targets`: tokens 1..T (next token);
        `concept`: the sequence's concept (constant); `state`: hidden state that emitted
        `inputs[t]`; `label`: `concept * S + state`.
    """
    T, S = cfg.seq_len, cfg.num_states
    if concept is not None:
        _check_int("concept", concept, lo=0, hi=cfg.num_concepts - 1)
    cum = _cumulative(cfg)
    c = int(rng.integers(cfg.num_concepts)) if concept is None else int(concept)
    u = rng.random((2, T + 1))
    states = np.empty(T + 1, np.int64)
    s = int(np.searchsorted(cum.initial[c], u[0, 0], side="right"))
    states[0] = s
    trans = cum.transition[c]
    for t in range(1, T + 1):
        s = int(np.searchsorted(trans[s], u[0, t], side="right"))
        states[t] = s
    emit = cum.emission[c, states]  # [T + 1, V]
    tokens = (emit <= u[1][:, None]).sum(axis=-1)  # == searchsorted(row, u, "right") per row
    state = states[:T].astype(np.int32)
    return {
        "inputs": tokens[:T].astype(np.int32),
        "targets": tokens[1:].astype(np.int32),
        "concept": np.full(T, c, np.int32),
        "state": state,
        "label": (c * S + state).astype(np.int32),
    }


def hmm_example(
    cfg: HMMConfig, *, seed: int, split: str, index: int, concept: int | None = None
) -> dict[str, np.ndarray]:
    """Example `index` of a split: a pure function of its arguments (see `generate_hmm_example`)."""
    return generate_hmm_example(cfg, example_rng(seed, split, index), concept=concept)


def make_hmm_dataset(
    cfg: HMMConfig,
    *,
    split: str,
    seed: int,
    batch_size: int,
    num_examples: int = 100_000,
    num_epochs: int | None = -1,
    shuffle: bool | None = None,
    concept: int | None = None,
) -> grain.MapDataset:
    """Batches of a fixed set of `num_examples` HMM sequences as a grain `MapDataset`.

    Args:
      cfg: HMM config (use `dataclasses.replace(cfg, shift=λ)` for a shifted test stream).
      split: `"train"`, `"val"` or `"test"` (independent example streams).
      seed: example and shuffle seed, ≥ 0.
      batch_size: B, > 0; incomplete final batches are dropped.
      num_examples: distinct sequences in the split.
      num_epochs: passes; `None` forever. Default (-1): forever for train, 1 otherwise.
      shuffle: new order each epoch; default True for train only.
      concept: draw every sequence from this concept in `[0, C)`; `None` mixes all.

    Returns:
      a `MapDataset` of dicts of `<int32>[B, T]` arrays: `inputs`, `targets`, `concept`,
      `state`, `label`.

    Example:
      >>> ds = make_hmm_dataset(HMMConfig(seq_len=16), split="train", seed=0, batch_size=4)
      >>> ds[0]["label"].shape
      (4, 16)
    """
    if concept is not None:
        _check_int("concept", concept, lo=0, hi=cfg.num_concepts - 1)
    _cumulative(cfg)  # build the tables once, before worker threads start
    return synthetic_dataset(
        lambda rng: generate_hmm_example(cfg, rng, concept=concept), split=split, seed=seed,
        batch_size=batch_size, num_examples=num_examples, num_epochs=num_epochs, shuffle=shuffle,
    )

