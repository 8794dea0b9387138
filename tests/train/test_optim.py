"""`make_optimizer` / `make_schedule`: warmup + cosine, decay only on matrices (the injected
learning rate and the shared compile of a sweep: tests/train/test_fit.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moejax.train import optim
from moejax.train.config import TrainConfig


def test_schedule_warms_up_then_decays_to_min_ratio():
    sched = optim.make_schedule(TrainConfig(steps=100, lr=2.0, warmup_steps=10,
                                                min_lr_ratio=0.1))
    assert float(sched(0)) == 0.0
    assert float(sched(5)) == pytest.approx(1.0)
    assert float(sched(10)) == pytest.approx(2.0)
    assert float(sched(100)) == pytest.approx(0.2)
    assert float(sched(55)) == pytest.approx(0.2 + 1.8 * 0.5, rel=1e-5)


def test_weight_decay_skips_vectors():
    opt, _ = optim.make_optimizer(TrainConfig(lr=1e-3, weight_decay=0.5, warmup_steps=0,
                                                  clip_norm=None))
    params = {"w": np.ones((2, 2), np.float32), "b": np.ones(2, np.float32)}
    zeros = jax.tree.map(np.zeros_like, params)
    updates, _ = opt.update(zeros, opt.init(params), params)
    assert np.all(np.asarray(updates["w"]) < 0)  # decayed towards 0
    assert np.all(np.asarray(updates["b"]) == 0)


def test_injected_learning_rate_equals_baked_in_schedule():
    """`make_optimizer`'s update with the peak lr in its state is AdamW with that schedule."""
    tcfg = TrainConfig(steps=10, lr=3e-3, warmup_steps=2)
    opt, _ = optim.make_optimizer(tcfg)
    baked = optax.chain(optax.clip_by_global_norm(tcfg.clip_norm), optax.adamw(
        optim.make_schedule(tcfg), b1=tcfg.b1, b2=tcfg.b2, weight_decay=tcfg.weight_decay,
        mask=lambda p: jax.tree.map(lambda x: jnp.ndim(x) >= 2, p)))
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    grads = {"w": jnp.full((3, 2), 0.5), "b": jnp.ones(2)}
    s1, s2 = opt.init(params), baked.init(params)
    update1, update2 = jax.jit(opt.update), jax.jit(baked.update)
    for _ in range(4):
        u1, s1 = update1(grads, s1, params)
        u2, s2 = update2(grads, s2, params)
        for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("eps", [1e-15, 1e-8, 1e-3])
def test_eps_reaches_adam(eps):
    """The update equals optax's AdamW with that ε; a tiny gradient shows ε's effect."""
    tcfg = TrainConfig(steps=10, lr=1e-2, warmup_steps=0, eps=eps, clip_norm=None,
                       weight_decay=0.0)
    opt, _ = optim.make_optimizer(tcfg)
    params = {"w": jnp.ones((2, 2))}
    grads = {"w": jnp.full((2, 2), 1e-6)}
    u, _ = opt.update(grads, opt.init(params), params)
    ref = optax.adamw(optim.make_schedule(tcfg), b1=tcfg.b1, b2=tcfg.b2, eps=eps,
                      weight_decay=0.0)
    want, _ = ref.update(grads, ref.init(params), params)
    np.testing.assert_allclose(np.asarray(u["w"]), np.asarray(want["w"]), rtol=1e-6)
    # By hand, step 1: m̂ = g, v̂ = g², update = −lr · g / (|g| + ε) (lr at count 0 is lr).
    np.testing.assert_allclose(np.asarray(u["w"]), -1e-2 * 1e-6 / (1e-6 + eps), rtol=1e-5)
    assert optim.optimizer_settings(tcfg).eps == eps  # other ε: another compiled step
