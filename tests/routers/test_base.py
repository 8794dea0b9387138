"""Tests for moejax.routers.base: the registry, `RouterConfig`, `RouterOutput`, `check_input`."""

import dataclasses
import importlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moejax.routers
from moejax.routers import base
from moejax.validation import ArgumentTypeError

REQUIRED = ("Config", "init", "route", "max_assignments")


def test_registry_names_modules_with_the_router_signature():
    assert len(base.ROUTER_NAMES) == len(set(base.ROUTER_NAMES)) == 10
    assert moejax.routers.ROUTER_NAMES is base.ROUTER_NAMES
    for name in base.ROUTER_NAMES:
        mod = base.get_router(name)
        assert isinstance(mod, types.ModuleType)
        assert mod is importlib.import_module(f"moejax.routers.{name}")
        assert all(callable(getattr(mod, attr)) for attr in REQUIRED), name
        assert issubclass(mod.Config, base.RouterConfig)
        assert dataclasses.is_dataclass(mod.Config) and mod.Config.__dataclass_params__.frozen


@pytest.mark.parametrize("bad", ["oracle", "TopK", "", None, 3])
def test_get_router_unknown_names_the_bad_name(bad):
    with pytest.raises(ValueError, match=(rf"router: unknown router {bad!r}; known routers: "
                                          + ", ".join(base.ROUTER_NAMES))):
        base.get_router(bad)
    with pytest.raises(ValueError, match=rf"unknown router {bad!r}"):
        base.make_config(bad, d_model=4, num_experts=4)


@pytest.mark.parametrize("name", base.ROUTER_NAMES)
def test_make_config_and_router_name_round_trip(name):
    cfg = base.make_config(name, d_model=4, num_experts=4, top_k=1)
    assert type(cfg) is base.get_router(name).Config
    assert (cfg.d_model, cfg.num_experts, cfg.top_k) == (4, 4, 1)
    assert base.router_name(cfg) == name
    assert cfg == base.make_config(name, d_model=4, num_experts=4, top_k=1)  # static jit arg
    assert hash(cfg) == hash(base.make_config(name, d_model=4, num_experts=4, top_k=1))


def test_make_config_rejects_unknown_fields():
    with pytest.raises(TypeError, match="bogus"):
        base.make_config("topk", d_model=4, num_experts=4, bogus=1)


def test_router_name_of_an_unregistered_config():
    with pytest.raises(ValueError, match="RouterConfig from moejax.routers.base is not a "
                                         "registered router config"):
        base.router_name(base.RouterConfig(d_model=2, num_experts=2))


def test_router_config_fields():
    cfg = base.RouterConfig(d_model=np.int64(8), num_experts=4)
    assert cfg.top_k == 2  # default
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.top_k = 1
    with pytest.raises(ValueError, match="top_k=5 must be <= num_experts=4"):
        base.RouterConfig(d_model=8, num_experts=4, top_k=5)
    for field, bad, err in [("d_model", 0, ValueError), ("num_experts", -1, ValueError),
                            ("top_k", 0, ValueError), ("d_model", 8.0, ArgumentTypeError),
                            ("num_experts", True, ArgumentTypeError),
                            ("top_k", "2", ArgumentTypeError)]:
        kwargs = {"d_model": 8, "num_experts": 4, "top_k": 1, field: bad}
        with pytest.raises(err, match=field):
            base.RouterConfig(**kwargs)


def test_router_output_is_a_pytree():
    out = base.RouterOutput(weights=jnp.ones((2, 3)), mask=jnp.ones((2, 3), bool),
                            probs=jnp.full((2, 3), 1 / 3), aux_loss=jnp.zeros(()),
                            metrics={"m": jnp.ones(())})
    assert len(jax.tree.leaves(out)) == 5
    doubled = jax.jit(lambda o: jax.tree.map(lambda a: a * 2, o))(out)
    assert isinstance(doubled, base.RouterOutput)
    np.testing.assert_array_equal(doubled.weights, 2.0)
    np.testing.assert_array_equal(doubled.metrics["m"], 2.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.aux_loss = jnp.ones(())


def test_check_input():
    cfg = base.RouterConfig(d_model=4, num_experts=2, top_k=1)
    for x in (jnp.ones((3, 4)), np.ones((0, 4), np.float32), jnp.ones((1, 4), jnp.bfloat16)):
        base.check_input(x, cfg)
    with pytest.raises(ValueError, match="router input x has d_model=5, config d_model=4"):
        base.check_input(jnp.ones((3, 5)), cfg)
    with pytest.raises(ValueError, match=r"must be \[N, d_model\], got shape \(4,\)"):
        base.check_input(jnp.ones((4,)), cfg)
    with pytest.raises(ArgumentTypeError, match="float array, got dtype int32"):
        base.check_input(jnp.ones((3, 4), jnp.int32), cfg)
    with pytest.raises(ArgumentTypeError, match="x must be an array.*jnp.asarray"):
        base.check_input([[1.0] * 4], cfg)
    with pytest.raises(ArgumentTypeError, match="x must be an array"):
        base.check_input(None, cfg)


def test_base_holds_no_gate_helpers():
    # The gate helpers live in moejax.routers.common, the argument checks in moejax.validation.
    for name in ("finite_tokens", "valid_mean", "mask_inactive", "topk_mask", "masked_weights",
                 "init_gate", "gate_logits", "check_int", "check_bool", "check_range",
                 "check_axis_name"):
        assert not hasattr(base, name), name
