"""Where a layer's pieces sit in `moejax.models.lm`'s trees (params, model state, optimizer
state), for code that edits one layer: MASS expansion, DARS masks, upcycling.

  params["blocks"][i]["ffn"]        layer i's FFN params (MoE: `{"router", "experts", ...}`)
  model_state["blocks"][i]          layer i's MoE state (`{"router": router state}`)
  ("blocks", i, "ffn")              the same params' path in a tree of their shape (optimizer
                                    moments), as dict keys and list indices
"""

from __future__ import annotations

from typing import Any

PyTree = Any


def ffn_params(params: PyTree, layer: int) -> PyTree:
    """Layer `layer`'s FFN params (or anything of the params' structure: grads, updates)."""
    return params["blocks"][layer]["ffn"]


def replace_ffn_params(params: PyTree, layer: int, ffn: PyTree) -> PyTree:
    """`params` with layer `layer`'s FFN params replaced (a new tree; the input is unchanged)."""
    blocks = list(params["blocks"])
    blocks[layer] = {**blocks[layer], "ffn": ffn}
    return {**params, "blocks": blocks}


def ffn_path(layer: int) -> tuple:
    """The path of layer `layer`'s FFN params (for `moejax.moe.expansion`'s `opt_prefix`)."""
    return ("blocks", layer, "ffn")


def moe_state(model_state: PyTree, layer: int) -> PyTree:
    """Layer `layer`'s MoE state."""
    return model_state["blocks"][layer]


def replace_moe_state(model_state: PyTree, layer: int, state: PyTree) -> PyTree:
    """`model_state` with layer `layer`'s MoE state replaced (a new tree)."""
    blocks = list(model_state["blocks"])
    blocks[layer] = state
    return {**model_state, "blocks": blocks}
