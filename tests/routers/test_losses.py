"""Tests for moejax.routers.losses (the Switch load-balance loss and the router z-loss)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.routers import losses
from tests.routers.helpers import PROBS, SHIFT


@jax.jit
def _losses(probs, mask, logits, valid):
    return (losses.switch_load_balance_loss(probs, mask, weight=1e-2),
            losses.router_z_loss(logits, weight=1e-3),
            losses.switch_load_balance_loss(probs, mask, weight=1e-2, valid=valid),
            losses.router_z_loss(logits, weight=1e-3, valid=valid))


MASK = np.eye(3, dtype=bool)[[0, 1, 0, 2]]  # top-1 choices
LOGITS = np.log(PROBS) + SHIFT[:, None]
VALID = jnp.array([True, False, True, True])


def test_switch_and_z_loss_by_hand():
    # Top-1 choices: experts 0, 1, 0, 2 -> counts (2, 1, 1), f = (0.5, 0.25, 0.25).
    # Mean probs P = (1.6/4, 1.5/4, 0.9/4) = (0.4, 0.375, 0.225).
    # Σ f·P = 0.2 + 0.09375 + 0.05625 = 0.35; Switch = α·E·0.35 = 0.01·3·0.35 = 0.0105.
    # logsumexp of row i is SHIFT[i] = (0, 1, 2, -1); z = 1e-3·mean(0, 1, 4, 1) = 1e-3·1.5 = 0.0015.
    switch, z, _, _ = _losses(PROBS, MASK, LOGITS, VALID)
    assert float(switch) == pytest.approx(0.0105, abs=1e-7)
    assert float(z) == pytest.approx(0.0015, abs=1e-7)


def test_losses_over_valid_tokens_by_hand():
    # Token 1 invalid: the other top-1 choices 0, 0, 2 -> f = (2/3, 0, 1/3);
    # P = ((0.7 + 0.6 + 0.2)/3, (0.2 + 0.3 + 0.2)/3, (0.1 + 0.1 + 0.6)/3) = (1.5, 0.7, 0.8)/3;
    # Σ f·P = 1/3 + 0.8/9 = 3.8/9; Switch = 0.01·3·3.8/9 = 0.0114/0.9. z = 1e-3·mean(0, 4, 1).
    # The invalid row's choice is ignored.
    _, _, switch, z = _losses(PROBS, MASK, LOGITS, VALID)
    assert float(switch) == pytest.approx(0.0114 / 0.9, abs=1e-7)
    assert float(z) == pytest.approx(1e-3 * 5 / 3, abs=1e-7)


def test_zero_weight_is_zero():
    # A weight of 0 returns a float32 0 without computing anything (NaN inputs included).
    nan = jnp.full((2, 3), jnp.nan)
    for loss in (losses.switch_load_balance_loss(nan, jnp.ones((2, 3), bool), weight=0.0),
                 losses.router_z_loss(nan, weight=0.0)):
        assert loss.shape == () and loss.dtype == jnp.float32 and float(loss) == 0.0
