"""`loop.fit` (the checkpoint-free loop of sweep cells), step hooks and `TrainState.extra`
(`moejax.train.steps`), the shared compile of a learning-rate sweep, and resuming checkpoints of
the previous layout (`moejax.train.legacy`)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.train import Checkpointer, StepHooks, loop, read_metrics
from moejax.train import checkpoint as ckpt_lib
from moejax.train import optim as optim_lib
from moejax.train.steps import NO_HOOKS, ModelFns, StepContext
from tests.train import stand_in
from tests.train.test_checkpoint import exact_fields
from tests.train.test_loop import batches, single_device_mesh, train_cfg

CFG = stand_in.StandInConfig()


def _fit(tcfg, *, hooks=NO_HOOKS, model=stand_in, seed=0, **kwargs):
    state = loop.init_state(model, CFG, tcfg, jax.random.key(seed), hooks=hooks)
    return loop.fit(state, batches(), model=model, model_cfg=CFG, train_cfg=tcfg,
                    rng=jax.random.key(seed + 1), hooks=hooks, **kwargs)


def test_fit_computes_what_run_computes(tmp_path):
    """Same init key, train key and batches: `fit` and `run` give the same trajectory."""
    tcfg = train_cfg(steps=6, log_every=1)
    loop.run(CFG, tcfg, tmp_path, model=stand_in, train_data=batches(),
             mesh=single_device_mesh(), progress=False, end_of_run=())
    init_key, train_key, _ = jax.random.split(jax.random.key(tcfg.seed), 3)
    state = loop.init_state(stand_in, CFG, tcfg, init_key)
    fit = loop.fit(state, batches(), model=stand_in, model_cfg=CFG, train_cfg=tcfg,
                   rng=train_key)
    assert exact_fields(fit.records) == exact_fields(read_metrics(tmp_path))
    assert int(fit.state.step) == 6


def test_learning_rate_sweep_compiles_once():
    traces = []

    def loss_fn(*args, **kwargs):
        traces.append(1)  # runs when traced, not when the compiled step runs
        return stand_in.loss_fn(*args, **kwargs)

    model = ModelFns(init=stand_in.init, loss_fn=loss_fn)
    finals, traced = {}, []
    for lr in (1e-3, 3e-3, 1e-2):
        fit = _fit(train_cfg(steps=3, lr=lr), model=model)
        finals[lr] = fit.records[-1]["loss"]
        assert fit.records[-1]["lr"] == pytest.approx(lr * float(
            optim_lib.unit_schedule(train_cfg(steps=3))(2)))
        traced.append(len(traces))
    assert traced[0] >= 1 and traced[1:] == [traced[0]] * 2  # later cells trace nothing
    assert len(set(finals.values())) == 3  # each cell used its own learning rate


def _frozen_embed_hooks():
    """Hooks that keep `embed` fixed and count the steps in `extra`."""

    def init(state):
        return dataclasses.replace(state, extra={"count": jnp.zeros((), jnp.int32)})

    def transform_grads(ctx: StepContext):
        grads = {**ctx.grads, "embed": jnp.zeros_like(ctx.grads["embed"])}
        return grads, {"count": ctx.state.extra["count"] + 1}, {"hook/seen": ctx.loss}

    def after_update(state, ctx: StepContext):
        params = {**state.params, "embed": ctx.state.params["embed"]}  # no weight decay either
        return dataclasses.replace(state, params=params), {}

    def loss(params, state, batch):
        term = 0.5 * jnp.sum(params["scale"] ** 2)
        return term, {"hook/term": term}

    return StepHooks(init=init, loss=loss, transform_grads=transform_grads,
                     after_update=after_update)


HOOKS = _frozen_embed_hooks()


def test_hooks_transform_the_step_and_keep_their_state():
    tcfg = train_cfg(steps=4)
    start = loop.init_state(stand_in, CFG, tcfg, jax.random.key(0), hooks=HOOKS)
    embed0 = np.asarray(start.params["embed"])
    fit = loop.fit(start, batches(), model=stand_in, model_cfg=CFG, train_cfg=tcfg,
                   rng=jax.random.key(1), hooks=HOOKS)
    np.testing.assert_array_equal(fit.state.params["embed"], embed0)
    assert int(fit.state.extra["count"]) == 4
    rec = fit.records[-1]
    # The objective is the model loss plus the hook's term; the context saw the model loss.
    assert rec["hook/term"] > 0
    assert rec["loss"] == pytest.approx(rec["hook/seen"] + rec["hook/term"], rel=1e-6)
    plain = _fit(tcfg)
    assert not np.array_equal(plain.state.params["embed"], embed0)


def test_hook_state_is_checkpointed_and_resumed(tmp_path):
    kw = dict(model=stand_in, mesh=single_device_mesh(), progress=False, hooks=HOOKS,
              end_of_run=())
    full = loop.run(CFG, train_cfg(steps=6, ckpt_every=3), tmp_path / "full",
                    train_data=batches(), **kw)
    loop.run(CFG, train_cfg(steps=3, ckpt_every=3), tmp_path / "part", train_data=batches(),
             **kw)
    resumed = loop.run(CFG, train_cfg(steps=6, ckpt_every=3), tmp_path / "part",
                       train_data=batches(), **kw)
    assert int(resumed.state.extra["count"]) == int(full.state.extra["count"]) == 6
    assert exact_fields(read_metrics(tmp_path / "part")) == exact_fields(
        read_metrics(tmp_path / "full"))
    state, _ = loop.load_checkpoint(tmp_path / "part", CFG, model=stand_in, hooks=HOOKS)
    assert int(state.extra["count"]) == 6


def _write_layout_1(workdir, state, root_key, data_state, config):
    """A checkpoint as moejax wrote them before `TrainState.extra` and the injected lr."""
    legacy_state = {"params": state.params, "model_state": state.model_state,
                    "opt_state": state.opt_state.inner_state, "step": state.step}
    ckpt = Checkpointer(workdir, keep=3)
    ckpt.save(int(state.step), {"state": legacy_state, "rng": jax.random.key_data(root_key)},
              data_state=data_state, config={k: v for k, v in config.items()
                                             if k != "layout"})
    ckpt.close()


def test_checkpoint_of_the_previous_layout_resumes_exactly(tmp_path):
    tcfg = train_cfg(steps=6, ckpt_every=3)
    kw = dict(model=stand_in, mesh=single_device_mesh(), progress=False, end_of_run=())
    loop.run(CFG, tcfg, tmp_path / "full", train_data=batches(), **kw)
    # Rewrite the full run's step-3 checkpoint in the old layout, in a fresh workdir.
    src = Checkpointer(tmp_path / "full", keep=3, read_only=True)
    tree, data_state = src.restore(3, _target(tcfg))
    config = src.saved_config(3)
    src.close()
    _write_layout_1(tmp_path / "old", tree["state"], jax.random.wrap_key_data(tree["rng"]),
                    data_state, config)
    it = batches()
    resumed = loop.run(CFG, tcfg, tmp_path / "old", train_data=it, **kw)
    assert resumed.step == 6
    full = [r for r in read_metrics(tmp_path / "full") if r["step"] > 3]
    again = [r for r in read_metrics(tmp_path / "old") if r["step"] > 3]
    assert exact_fields(again) == exact_fields(full)
    assert ckpt_lib.Checkpointer(tmp_path / "old", keep=3, read_only=True).all_steps() == [3, 6]


def _target(tcfg):
    steps = loop.compiled_steps(stand_in, CFG, tcfg, single_device_mesh())
    tree = {"state": jax.eval_shape(steps.init, jax.random.key(0)),
            "rng": jax.random.key_data(jax.random.key(0))}
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                       sharding=steps.replicated), tree)
