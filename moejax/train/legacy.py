"""Reading checkpoints written before the current `TrainState` layout.

Layout 1 (moejax before the one-loop change): the state item is `{"params", "model_state",
"opt_state", "step"}` with the plain optax chain's state, no `extra` and no injected learning
rate. Layout 2 (now): `TrainState` with `extra`, and `make_optimizer`'s
`inject_hyperparams` state around the same chain. A layout-1 checkpoint restores into the
chain's state and is wrapped: the update count is the step, the learning rate the run's `lr`,
`extra` empty; the trajectory continues exactly (the wrapped chain computes the same update).
The config saved with a checkpoint names its layout (`LAYOUT_KEY`; absent: layout 1).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

LAYOUT = 2
LAYOUT_KEY = "layout"


def layout_of(saved_config: dict[str, Any]) -> int:
    """The layout a checkpoint's saved config names (1 when it names none)."""
    return int(saved_config.get(LAYOUT_KEY, 1))


def legacy_target(target: dict[str, Any]) -> dict[str, Any]:
    """The layout-1 restore target of a layout-2 one (`{"state": TrainState, "rng"}` shapes)."""
    state = target["state"]
    if state.extra:
        raise ValueError("this checkpoint predates step hooks (layout 1) and holds no hook "
                         "state; resume it without hooks")
    return {**target, "state": {"params": state.params, "model_state": state.model_state,
                                "opt_state": state.opt_state.inner_state, "step": state.step}}


def from_legacy(tree: dict[str, Any], target: dict[str, Any], lr: float) -> dict[str, Any]:
    """A restored layout-1 tree in layout 2 (`target` gives the optimizer state's wrapper)."""
    old = tree["state"]
    wrapper = target["state"].opt_state
    step = jnp.asarray(old["step"], jnp.int32)
    opt_state = wrapper._replace(
        count=jnp.array(step, copy=True), inner_state=old["opt_state"],
        hyperparams={"learning_rate": jnp.asarray(lr, jnp.float32)})
    state = dataclasses.replace(target["state"], params=old["params"],
                                model_state=old["model_state"], opt_state=opt_state, step=step,
                                extra={})
    return {**tree, "state": state}
