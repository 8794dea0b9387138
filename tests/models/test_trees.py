"""`moejax.models.trees`: the accessors find layer i's FFN params and MoE state of a real LM and
replace them without touching the input or the other layers."""

import jax
import jax.numpy as jnp
import numpy as np

from moejax.models import lm, trees

CFG = lm.LMConfig(vocab_size=32, d_model=16, num_layers=2, num_heads=2, head_dim=8, d_ff=16,
                  mixer="softmax", moe=dict(num_experts=4, top_k=1), max_seq_len=8)


def _init():
    return jax.jit(lambda k: lm.init(k, CFG))(jax.random.key(0))


def test_ffn_params_and_path_agree():
    params, _ = _init()
    ffn = trees.ffn_params(params, 1)
    assert ffn["router"]["w_g"].shape == (4, 16)  # [E, d]
    node = params
    for key in trees.ffn_path(1):
        node = node[key]
    assert node is ffn


def test_replace_ffn_params_is_functional():
    params, _ = _init()
    zeros = jax.tree.map(jnp.zeros_like, trees.ffn_params(params, 0))
    new = trees.replace_ffn_params(params, 0, zeros)
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(trees.ffn_params(new, 0)))
    # The input is unchanged and the other layer is the same object.
    assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(trees.ffn_params(params, 0)))
    assert trees.ffn_params(new, 1) is trees.ffn_params(params, 1)
    assert jax.tree.structure(new) == jax.tree.structure(params)


def test_moe_state_round_trip():
    _, state = _init()
    layer = trees.moe_state(state, 1)
    assert "router" in layer
    marked = {**layer, "router": {**layer["router"], "active": np.ones(4, bool)}}
    new = trees.replace_moe_state(state, 1, marked)
    assert "active" in trees.moe_state(new, 1)["router"]
    assert "active" not in trees.moe_state(state, 1)["router"]
    assert trees.moe_state(new, 0) is trees.moe_state(state, 0)
