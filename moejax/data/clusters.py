"""Gaussian-mixture tokens with cluster labels, for router unit tests.

`make_clusters` draws N points in d dimensions from K Gaussians and returns them with their
component labels, e.g. to check that a router sends each cluster to its own expert.

Axis letters: N points, d dimensions, K clusters.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from moejax.validation import as_float_array, check_range
from moejax.validation import check_int as _check_int


class Clusters(NamedTuple):
    """Points and the component each came from.

    Attributes:
      x: `<float32>[N, d]` points.
      labels: `<int32>[N]` component index in `[0, K)`.
      means: `<float32>[K, d]` component means.
    """

    x: np.ndarray
    labels: np.ndarray
    means: np.ndarray


def make_clusters(
    seed: int,
    *,
    num_points: int,
    num_clusters: int | None = None,
    dim: int | None = None,
    means: np.ndarray | None = None,
    std: float | None = None,
    cov: np.ndarray | None = None,
    weights: np.ndarray | None = None,
    separation: float = 8.0,
) -> Clusters:
    """Draws a Gaussian mixture, deterministically per `seed`.

    Args:
      seed: numpy seed, ≥ 0.
      num_points: N ≥ 1.
      num_clusters: K; required unless `means` is given (then it must match or be None).
      dim: d; required unless `means` is given (then it must match or be None).
      means: `[K, d]` component means. Default: `N(0, separation² / (2d))` per coordinate, so two
        means lie about `separation` apart.
      std: isotropic standard deviation (> 0, default 1). Not allowed together with `cov`.
      cov: covariance, shared `[d, d]` or per component `[K, d, d]`, symmetric positive
        semi-definite.
      weights: `[K]` mixing weights (non-negative, positive sum). Default: exactly balanced
        labels (counts differ by at most one, in random order); with weights, labels are drawn
        i.i.d.
      separation: typical distance between the default means, > 0.

    Returns:
      `Clusters(x <float32>[N, d], labels <int32>[N], means <float32>[K, d])`.

    Raises:
      ValueError: naming the inconsistent or invalid argument (`ArgumentTypeError`, also a
        `TypeError`, for a str, None or non-numeric data where a number or array belongs).

    Example:
      >>> c = make_clusters(0, num_points=100, num_clusters=4, dim=8)
      >>> c.x.shape, c.labels.shape, c.means.shape
      ((100, 8), (100,), (4, 8))
    """
    _check_int("seed", seed, lo=0)
    _check_int("num_points", num_points, lo=1)
    if means is not None:
        means = as_float_array("means", means)
        if means.ndim != 2 or means.shape[0] < 1 or means.shape[1] < 1:
            raise ValueError(f"means must be a non-empty [K, d] array, got shape {means.shape}")
        if not np.all(np.isfinite(means)):
            raise ValueError("means must be finite")
        for name, value, size in (("num_clusters", num_clusters, means.shape[0]),
                                  ("dim", dim, means.shape[1])):
            if value is not None and value != size:
                raise ValueError(f"{name}={value} does not match means of shape {means.shape}")
        num_clusters, dim = means.shape
    else:
        if num_clusters is None or dim is None:
            raise ValueError("num_clusters and dim are required when means is not given")
        _check_int("num_clusters", num_clusters, lo=1)
        _check_int("dim", dim, lo=1)
    check_range("separation", separation, 0.0, np.inf, hi_open=True)
    if std is not None and cov is not None:
        raise ValueError("give std (isotropic) or cov, not both")
    if std is not None:
        check_range("std", std, 0.0, np.inf, hi_open=True)
    K, d = num_clusters, dim

    chol = None
    if cov is not None:
        cov = as_float_array("cov", cov)
        if cov.shape == (d, d):
            cov = np.broadcast_to(cov, (K, d, d))
        if cov.shape != (K, d, d):
            raise ValueError(f"cov must have shape [{d}, {d}] or [{K}, {d}, {d}], got {cov.shape}")
        if not np.all(np.isfinite(cov)):
            raise ValueError("cov must be finite")
        if not np.allclose(cov, np.swapaxes(cov, -1, -2)):
            raise ValueError("cov must be symmetric")
        eigval, eigvec = np.linalg.eigh(cov)
        if np.any(eigval < -1e-8 * np.maximum(1.0, np.abs(eigval).max())):
            raise ValueError("cov must be positive semi-definite")
        chol = eigvec * np.sqrt(np.clip(eigval, 0.0, None))[:, None, :]  # [K, d, d], A Aᵀ = cov

    rng = np.random.default_rng(seed)
    if means is None:
        means = rng.normal(scale=separation / np.sqrt(2.0 * d), size=(K, d))

    if weights is None:
        labels = rng.permutation(np.arange(num_points) % K)
    else:
        w = as_float_array("weights", weights)
        if w.shape != (K,) or np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
            raise ValueError(
                f"weights must be [{K}] non-negative with a positive sum, got {np.asarray(weights)}"
            )
        labels = rng.choice(K, size=num_points, p=w / w.sum())

    noise = rng.standard_normal((num_points, d))
    if chol is None:
        noise = noise * (1.0 if std is None else float(std))
    else:
        noise = np.einsum("nij,nj->ni", chol[labels], noise)
    x = means[labels] + noise
    return Clusters(x.astype(np.float32), labels.astype(np.int32), means.astype(np.float32))
