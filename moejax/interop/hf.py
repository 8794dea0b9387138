"""Load Hugging Face checkpoints (Mixtral, Qwen3-MoE, Qwen3-Next) into moejax, and export back.

    cfg, params, state, hf_cfg = load_hf("path/to/Qwen3-Next-80B-A3B-Instruct")
    logits, _, _ = lm.apply(params, state, tokens, cfg=cfg)
    export_hf(params, cfg, "out_dir", model_type="qwen3_next")

Tensors are read with the `safetensors` package's numpy API (no torch). Loading checks every
tensor the config needs (name and shape), refuses tensors it would silently ignore, and refuses
dtypes the checkpoint does not declare, so a conversion either succeeds whole or fails with the
tensor's name; nothing is written until it has succeeded. Exports go to a temporary directory
that is renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from moejax.interop import hf_config, hf_weights
from moejax.models import lm
from moejax.train.checkpoint import check_same_shapes

# Stored tensors moejax has no use for: Qwen3-Next's multi-token-prediction head (transformers
# ignores it too) and rotary caches some exporters write.
_IGNORED_PREFIXES = ("mtp.",)
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_FLOAT_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
PARAM_DTYPES = ("float32", "bfloat16")


class _Tensors:
    """Lazy reader of the safetensors shards of a directory, with shape and dtype checks."""

    def __init__(self, hf_dir: Path, model_type: str, declared_dtype: str | None):
        from safetensors import safe_open

        files = sorted(hf_dir.glob("*.safetensors"))
        if not files:
            raise ValueError(f"no *.safetensors files in {hf_dir}")
        self._handles = [safe_open(str(f), framework="np") for f in files]
        self.where = {name: h for h in self._handles for name in h.keys()}
        self.used: set[str] = set()
        self.hf_dir, self.model_type, self.declared = hf_dir, model_type, declared_dtype

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.where:
            raise ValueError(f"tensor {name!r} is missing from {self.hf_dir} (a "
                             f"{self.model_type} with this config.json needs it)")
        sl = self.where[name].get_slice(name)
        got, dtype = tuple(sl.get_shape()), sl.get_dtype()
        if got != tuple(shape):
            raise ValueError(f"tensor {name!r} has shape {got}, expected {tuple(shape)} from "
                             "config.json")
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {dtype}; only float checkpoints "
                             f"({', '.join(_FLOAT_DTYPES)}) can be converted")
        if self.declared is not None and _FLOAT_DTYPES[dtype] != self.declared:
            raise ValueError(f"tensor {name!r} is {_FLOAT_DTYPES[dtype]} but config.json "
                             f"declares dtype {self.declared!r}")
        self.used.add(name)
        return self.where[name].get_tensor(name).astype(np.float32)

    def check_all_used(self) -> None:
        left = sorted(n for n in self.where if n not in self.used
                      and not n.startswith(_IGNORED_PREFIXES) and not n.endswith(_IGNORED_SUFFIXES))
        if left:
            more = f" (and {len(left) - 5} more)" if len(left) > 5 else ""
            raise ValueError(f"{self.hf_dir} holds tensors a {self.model_type} with this "
                             f"config.json does not have: {', '.join(left[:5])}{more}")


def _declared_dtype(hf: dict) -> str | None:
    declared = hf.get("dtype", hf.get("torch_dtype"))
    return None if declared in (None, "auto") else str(declared).removeprefix("torch.")


def load_hf(hf_dir: str | os.PathLike, *, dtype: str = "float32",
            max_seq_len: int | None = None) -> tuple[lm.LMConfig, dict, dict, dict]:
    """Reads a HF model directory (config.json + safetensors shards) as a moejax LM.

    Args:
      hf_dir: the directory.
      dtype: dtype of the returned params and the model's compute dtype ("float32" or
        "bfloat16"); stored tensors are cast to it.
      max_seq_len: the model's longest sequence; default the config's
        `max_position_embeddings`.

    Returns:
      `(cfg, params, state, hf_config)`: the LM config, params and router state as for
      `moejax.models.lm`, and the parsed config.json.

    Raises:
      ValueError: no config.json, an unsupported `model_type` or option, or a missing,
        mis-shaped, non-float, unexpected or undeclared-dtype tensor (each named).
    """
    if dtype not in PARAM_DTYPES:
        raise ValueError(f"dtype must be one of {PARAM_DTYPES}, got {dtype!r}")
    hf_dir = Path(hf_dir)
    hf = hf_config.read_hf_config(hf_dir)
    cfg = hf_config.lm_config_from_hf(hf, dtype=dtype, max_seq_len=max_seq_len)
    tensors = _Tensors(hf_dir, hf["model_type"], _declared_dtype(hf))
    params = hf_weights.params_from_hf(tensors.get, cfg, hf["model_type"])
    tensors.check_all_used()
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype=dtype), params)
    # The converted tree must be exactly lm.init's (structure and shapes).
    want = jax.eval_shape(lambda: lm.init(jax.random.key(0), cfg)[0])
    check_same_shapes("converted params", want, params)
    state = jax.jit(lambda k: lm.init(k, cfg)[1])(jax.random.key(0))  # router state only
    return cfg, params, state, hf


def export_hf(params: dict, cfg: lm.LMConfig, out_dir: str | os.PathLike, *,
              model_type: str) -> Path:
    """Writes moejax params as a HF model directory (config.json + model.safetensors).

    Args:
      params: LM params of an architecture `model_type` can express.
      cfg: their config.
      out_dir: the new directory (must not exist, or be empty).
      model_type: "mixtral", "qwen3_moe" or "qwen3_next".

    Raises:
      ValueError: the architecture cannot express `cfg` (fields named), or `out_dir` is not
        empty.
    """
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"out_dir {out_dir} is not empty")
    hf = hf_config.hf_config_from_lm(cfg, model_type)
    host = jax.tree.map(np.asarray, jax.device_get(params))
    dtypes = {str(a.dtype) for a in jax.tree.leaves(host)}
    if len(dtypes) != 1:
        raise ValueError(f"params mix dtypes {sorted(dtypes)}; cast them to one first")
    hf["dtype"] = dtypes.pop()
    tensors = hf_weights.hf_from_params(host, cfg, model_type)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir

