"""Gaussian-mixture tokens with labels."""

import numpy as np
import pytest

from moejax.data.clusters import make_clusters


def test_shapes_dtypes_balance_and_determinism():
    a = make_clusters(0, num_points=103, num_clusters=4, dim=6)
    b = make_clusters(0, num_points=103, num_clusters=4, dim=6)
    c = make_clusters(1, num_points=103, num_clusters=4, dim=6)
    assert a.x.shape == (103, 6) and a.x.dtype == np.float32
    assert a.labels.shape == (103,) and a.labels.dtype == np.int32
    assert a.means.shape == (4, 6) and a.means.dtype == np.float32
    counts = np.bincount(a.labels, minlength=4)
    assert counts.max() - counts.min() <= 1
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a.x, c.x)


def test_points_sit_near_their_mean():
    data = make_clusters(0, num_points=2000, num_clusters=5, dim=16, separation=12.0)
    d2 = ((data.x[:, None, :] - data.means[None]) ** 2).sum(-1)
    assert (d2.argmin(-1) == data.labels).mean() > 0.99
    for k in range(5):
        np.testing.assert_allclose(data.x[data.labels == k].mean(0), data.means[k], atol=0.35)
        np.testing.assert_allclose(data.x[data.labels == k].std(0), 1.0, atol=0.2)


def test_given_means_std_and_weights():
    means = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    data = make_clusters(3, num_points=3000, means=means, std=0.5, weights=[0.6, 0.3, 0.1])
    np.testing.assert_array_equal(data.means, means.astype(np.float32))
    np.testing.assert_allclose(np.bincount(data.labels) / 3000, [0.6, 0.3, 0.1], atol=0.03)
    np.testing.assert_allclose(data.x[data.labels == 1].std(0), 0.5, atol=0.05)


@pytest.mark.parametrize("per_cluster", [False, True], ids=["shared", "per_cluster"])
def test_covariance(per_cluster):
    cov = np.array([[2.0, 0.9], [0.9, 1.0]])
    arg = np.stack([cov, cov]) if per_cluster else cov
    data = make_clusters(0, num_points=20000, num_clusters=2, dim=2, cov=arg)
    for k in range(2):
        np.testing.assert_allclose(np.cov(data.x[data.labels == k].T), cov, atol=0.1)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(num_points=0, num_clusters=2, dim=2), "num_points"),
        (dict(num_points=4, dim=2), "num_clusters"),
        (dict(num_points=4, means=np.zeros((3, 2)), num_clusters=2), "num_clusters"),
        (dict(num_points=4, means=np.zeros((3, 2)), dim=3), "dim"),
        (dict(num_points=4, means=np.zeros(3)), "means"),
        (dict(num_points=4, num_clusters=2, dim=2, cov=np.eye(3)), "cov"),
        (dict(num_points=4, num_clusters=2, dim=2, cov=-np.eye(2)), "cov"),
        (dict(num_points=4, num_clusters=2, dim=2, cov=[[1.0, 2.0], [0.0, 1.0]]), "cov"),
        (dict(num_points=4, num_clusters=2, dim=2, std=1.0, cov=np.eye(2)), "std"),
        (dict(num_points=4, num_clusters=2, dim=2, std=0.0), "std"),
        (dict(num_points=4, num_clusters=2, dim=2, weights=[1.0]), "weights"),
        (dict(num_points=4, num_clusters=2, dim=2, separation=0), "separation"),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(sorted(v)),
)
def test_errors_name_the_argument(kwargs, field):
    with pytest.raises(ValueError, match=field):
        make_clusters(0, **kwargs)
