"""The pure steps of training: the model contract, `TrainState`, step hooks, `train_step`,
`eval_step`, and their jitted forms shared between runs (`compiled_steps`).

Model contract (`moejax.models.lm`, `moejax.models.gnn.MODEL`, the MQAR answer-loss model, or
any object with these attributes):

  params, state = model.init(key, cfg)
  loss, (new_state, metrics) = model.loss_fn(params, state, batch, *, cfg, train, rng)
  model.check_batch(batch, *, cfg, train_cfg)   optional: refuse a bad first batch by name
                                                (default: `check_token_batch`)
  model.batch_spec                              optional: the PartitionSpec of every batch leaf
                                                (default None: the leading axis over the mesh's
                                                `('data', 'fsdp')` axes)
  model.place(cfg, mesh) -> cfg                 optional: the config to trace on `mesh` (the LM
                                                runs its MoE layers expert-parallel there)

Placement on the mesh (`state_shardings`): params and optimizer state by the rule of
`moejax.parallel.sharding` (expert banks over `'expert'`, large matrices over `'fsdp'`), the
model state, step and hooks' state replicated.

`metrics` holds scalars (at least `ce`, the cross-entropy the run reports) and, for MoE models,
`load` as `[L, E]`; a scalar `weight` in it (else the `loss_mask` sum, else the `targets` size)
weighs the batch in evaluation averages. The model state (router state: aux-free biases, STAR
statistics, ...) is updated inside the jitted step.

Step hooks (`StepHooks`) extend `train_step` without writing another one; each is a pure
function traced into the step, with `TrainState.extra` as their own state (MASS expansion
histories, a DARS channel mask, ...):

  init(state) -> state                         once, on the fresh state (not on resume)
  loss(params, state, batch) -> (term, metrics)   added to the model loss (differentiated)
  transform_grads(ctx) -> (grads, extra, metrics)   the gradient the optimizer gets
  after_update(state, ctx) -> (state, metrics)      after the update (may edit any field)

`ctx` is a `StepContext`: the state before the update, the batch, the step's key, the model
loss (without the hooks' terms), the gradient of the objective and the metrics so far.

Axis letters: B batch, T sequence length, L layers, E experts.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from moejax.parallel import mesh as mesh_lib
from moejax.parallel import sharding as sharding_lib
from moejax.train.config import TrainConfig
from moejax.train.optim import make_optimizer, optimizer_settings
from moejax.validation import ArgumentTypeError

Array = jax.Array
PyTree = Any
DATA_AXIS = mesh_lib.DATA


class Model(Protocol):
    """What the loop needs from a model (see the module docstring)."""

    def init(self, key: Array, cfg: Any) -> tuple[PyTree, PyTree]: ...

    def loss_fn(self, params: PyTree, state: PyTree, batch: Any, *, cfg: Any,
                train: bool, rng: Array) -> tuple[Array, tuple[PyTree, dict]]: ...


@dataclasses.dataclass(frozen=True)
class ModelFns:
    """A model given by its functions (for models whose module does not have the contract's
    names); hashable, so jitted steps are shared between runs of the same model."""

    init: Callable[[Array, Any], tuple[PyTree, PyTree]]
    loss_fn: Callable[..., tuple[Array, tuple[PyTree, dict]]]
    check_batch: Callable[..., None] | None = None
    batch_spec: P | None = None
    place: Callable[[Any, Mesh], Any] | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a step updates.

    Attributes:
      params: model parameters.
      model_state: the model's non-gradient state (router states); may be `{}`.
      opt_state: optimizer state.
      step: `<int32>[]` optimizer updates applied so far.
      extra: the step hooks' state (`{}` without hooks); checkpointed with the rest.
    """

    params: PyTree
    model_state: PyTree
    opt_state: PyTree
    step: Array
    extra: PyTree = dataclasses.field(default_factory=dict)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepContext:
    """What a hook sees of the step in progress (traced values)."""

    state: TrainState
    batch: Any
    rng: Array
    loss: Array
    grads: PyTree
    metrics: dict


@dataclasses.dataclass(frozen=True)
class StepHooks:
    """Extension points of `train_step` (see the module docstring); None = none. Hashable:
    build it once per configuration (e.g. under `functools.cache`) so that runs share the
    jitted step."""

    init: Callable[[TrainState], TrainState] | None = None
    loss: Callable[[PyTree, TrainState, Any], tuple[Array, dict]] | None = None
    transform_grads: Callable[[StepContext], tuple[PyTree, PyTree, dict]] | None = None
    after_update: Callable[[TrainState, StepContext], tuple[TrainState, dict]] | None = None


NO_HOOKS = StepHooks()


def init_train_state(model: Model, model_cfg: Any, optimizer: optax.GradientTransformation,
                     key: Array, hooks: StepHooks = NO_HOOKS) -> TrainState:
    """A fresh `TrainState` (step 0) from `model.init(key, model_cfg)` and `hooks.init`."""
    params, model_state = model.init(key, model_cfg)
    state = TrainState(params=params, model_state=model_state, opt_state=optimizer.init(params),
                       step=jnp.zeros((), jnp.int32))
    return state if hooks.init is None else hooks.init(state)


def global_norm(tree: PyTree) -> Array:
    """sqrt of the sum of squares of every leaf (in float32)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(tree)))


def train_step(state: TrainState, batch: Any, step_rng: Array, *, model: Model,
               model_cfg: Any, optimizer: optax.GradientTransformation,
               hooks: StepHooks = NO_HOOKS) -> tuple[TrainState, dict[str, Array]]:
    """One optimizer update. Pure: jit it with `donate_argnums=0` (as `compiled_steps` does).

    Args:
      state: the current state.
      batch: the model's batch (`{"inputs": <int32>[B, T], "targets": <int32>[B, T],
        "loss_mask"?: [B, T]}` for the LM).
      step_rng: this step's key, `fold_in(train_key, state.step)`.
      model: the model (see the module docstring).
      model_cfg: its config (static).
      optimizer: from `make_optimizer`.
      hooks: step hooks.

    Returns:
      `(new_state, metrics)`: the model's and the hooks' metrics plus `loss` (the objective:
      model loss with its aux losses and the hooks' terms) and `grad_norm` (global norm of the
      gradient before hooks and clipping).
    """

    def objective(params):
        loss, (model_state, metrics) = model.loss_fn(params, state.model_state, batch,
                                                     cfg=model_cfg, train=True, rng=step_rng)
        total = loss
        if hooks.loss is not None:
            term, term_metrics = hooks.loss(params, state, batch)
            total, metrics = total + term, {**metrics, **term_metrics}
        return total, (loss, model_state, metrics)

    (total, (loss, model_state, metrics)), grads = jax.value_and_grad(
        objective, has_aux=True)(state.params)
    metrics = {**metrics, "loss": total, "grad_norm": global_norm(grads)}
    ctx = StepContext(state=state, batch=batch, rng=step_rng, loss=loss, grads=grads,
                      metrics=metrics)
    extra = state.extra
    if hooks.transform_grads is not None:
        grads, extra, hook_metrics = hooks.transform_grads(ctx)
        metrics = {**metrics, **hook_metrics}
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_state = TrainState(params=optax.apply_updates(state.params, updates),
                           model_state=model_state, opt_state=opt_state, step=state.step + 1,
                           extra=extra)
    if hooks.after_update is not None:
        new_state, hook_metrics = hooks.after_update(new_state, ctx)
        metrics = {**metrics, **hook_metrics}
    return new_state, metrics


def batch_weight(batch: Any, metrics: Mapping[str, Array]) -> Array:
    """How much a batch counts in an evaluation average: the model's `weight` metric, else the
    `loss_mask` sum, else the number of targets."""
    if "weight" in metrics:
        return jnp.asarray(metrics["weight"], jnp.float32)
    mask = batch.get("loss_mask") if isinstance(batch, Mapping) else None
    if mask is not None:
        return jnp.sum(mask).astype(jnp.float32)
    targets = batch["targets"] if isinstance(batch, Mapping) and "targets" in batch else None
    return jnp.asarray(1 if targets is None else targets.size, jnp.float32)


def eval_step(params: PyTree, model_state: PyTree, batch: Any, rng: Array, *, model: Model,
              model_cfg: Any) -> dict[str, Array]:
    """Validation metrics of one batch (`train=False`; the model state is not updated).

    Returns:
      every scalar metric of the model, `ce` (the model's, else the loss), `loss` (objective)
      and `weight` (`batch_weight`), to average over batches weighted by `weight`.
    """
    loss, (_, metrics) = model.loss_fn(params, model_state, batch, cfg=model_cfg, train=False,
                                       rng=rng)
    scalars = {k: v for k, v in metrics.items() if jnp.ndim(v) == 0}
    return {**scalars, "ce": metrics.get("ce", loss), "loss": loss,
            "weight": batch_weight(batch, metrics)}


def batch_spec(model: Model, mesh: Mesh) -> P:
    """The model's batch PartitionSpec (default: the leading axis over the mesh's
    `('data', 'fsdp')` axes)."""
    spec = getattr(model, "batch_spec", None)
    return sharding_lib.batch_spec(mesh) if spec is None else spec


def place(model: Model, model_cfg: Any, mesh: Mesh) -> Any:
    """The config to trace the model with on `mesh` (`model.place`, if it has one)."""
    fn = getattr(model, "place", None)
    return model_cfg if fn is None else fn(model_cfg, mesh)


def state_shardings(state: TrainState, mesh: Mesh) -> TrainState:
    """`NamedSharding`s of a `TrainState` (arrays or shapes): params and optimizer state by the
    parameter rule (`moejax.parallel.sharding.param_spec`: the moments follow their params),
    model state, step and hooks' state replicated.

    Raises:
      ValueError: an expert bank's expert count does not divide by the `'expert'` axis.
    """
    replicated = NamedSharding(mesh, P())
    rep = lambda tree: jax.tree.map(lambda _: replicated, tree)
    return TrainState(params=sharding_lib.param_shardings(state.params, mesh),
                      model_state=rep(state.model_state),
                      opt_state=sharding_lib.param_shardings(state.opt_state, mesh),
                      step=replicated, extra=rep(state.extra))


@dataclasses.dataclass(frozen=True)
class CompiledSteps:
    """`init(key) -> TrainState` (peak lr 1: see `moejax.train.loop.fresh_state`),
    `train(state, batch, rng) -> (state, metrics)` (donates `state`) and
    `eval(params, model_state, batch, rng) -> metrics`, jitted with explicit shardings."""

    init: Callable
    train: Callable
    eval: Callable
    replicated: NamedSharding
    batch: NamedSharding
    state: TrainState  # of NamedShardings (`state_shardings`)
    model_cfg: Any  # the config the steps trace (`place`d on the mesh)


def compiled_steps(model: Model, model_cfg: Any, train_cfg: TrainConfig, mesh: Mesh,
                   hooks: StepHooks = NO_HOOKS) -> CompiledSteps:
    """The jitted steps of a run, shared by every run whose model, config, optimizer settings
    (all but `lr`: see `moejax.train.optim`), hooks and mesh are the same."""
    if not isinstance(hooks, StepHooks):
        raise ArgumentTypeError(f"hooks must be a StepHooks, got {type(hooks).__name__}")
    return _compiled_steps(model, model_cfg, optimizer_settings(train_cfg), mesh, hooks)


@functools.lru_cache(maxsize=32)
def _compiled_steps(model, model_cfg, opt_cfg: TrainConfig, mesh, hooks) -> CompiledSteps:
    optimizer, _ = make_optimizer(opt_cfg)  # its update reads the peak lr from the state
    model_cfg = place(model, model_cfg, mesh)
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, batch_spec(model, mesh))
    init_fn = functools.partial(init_train_state, model, model_cfg, optimizer, hooks=hooks)
    shardings = state_shardings(jax.eval_shape(init_fn, jax.random.key(0)), mesh)
    train = jax.jit(
        functools.partial(train_step, model=model, model_cfg=model_cfg, optimizer=optimizer,
                          hooks=hooks),
        in_shardings=(shardings, batch_sharding, replicated),
        out_shardings=(shardings, replicated), donate_argnums=0)
    evaluate = jax.jit(
        functools.partial(eval_step, model=model, model_cfg=model_cfg),
        in_shardings=(shardings.params, shardings.model_state, batch_sharding, replicated),
        out_shardings=replicated)
    init = jax.jit(init_fn, out_shardings=shardings)
    return CompiledSteps(init=init, train=train, eval=evaluate, replicated=replicated,
                         batch=batch_sharding, state=shardings, model_cfg=model_cfg)


def device_batch(batch: Any, sharding: Any, *, process_local: bool = False) -> Any:
    """A host batch (a pytree of arrays) as global arrays with `sharding`.

    Args:
      batch: the batch's arrays.
      sharding: where the global arrays go: one `Sharding` for every leaf, or a pytree of them
        of the batch's structure (e.g. `CompiledSteps.state.params` to place host params).
      process_local: the batch holds only this process's rows (its share of the data, e.g.
        from a data pipeline sharded by `moejax.parallel.sharding.batch_shard`), not the
        global batch. With one process both are the same.
    """
    def put(v, where):
        v = np.asarray(v)
        if process_local:
            return jax.make_array_from_process_local_data(where, v)
        return jax.make_array_from_callback(v.shape, where, lambda index: v[index])

    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda v: put(v, sharding), batch)
    return jax.tree.map(put, batch, sharding)
