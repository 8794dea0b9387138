"""Load Hugging Face checkpoints (Mixtral, Qwen3-MoE, Qwen3-Next) into moejax, and export back.

    cfg, params, state, hf_cfg = load_hf("path/to/Qwen3-Next-80B-A3B-Instruct")
    logits, _, _ = lm.apply(params, state, tokens, cfg=cfg)
    export_hf(params, cfg, "out_dir", model_type="qwen3_next")

Tensors are read with the `safetensors` package's numpy API (no torch), from the shards that
`model.safetensors.index.json` names or, without an index, from every `*.safetensors` file.
Loading checks every tensor the config needs (name and shape), refuses tensors it would silently
ignore, and refuses dtypes the checkpoint does not declare, so a conversion either succeeds whole
or fails with a `ValueError` naming the file and the key or tensor (a broken config.json, an
empty or truncated shard, an index pointing at a missing shard, ...); nothing is written until it
has succeeded. Exports go to a temporary directory
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
from moejax.validation import ArgumentTypeError, check_choice, check_int

# Stored tensors moejax has no use for: Qwen3-Next's multi-token-prediction head (transformers
# ignores it too) and rotary caches some exporters write.
_IGNORED_PREFIXES = ("mtp.", "model.visual.")  # multi-token prediction, Qwen3.5's vision tower
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_FLOAT_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
PARAM_DTYPES = ("float32", "bfloat16")


INDEX_FILE = "model.safetensors.index.json"


def _open_shard(path: Path):
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise ValueError(f"safetensors shard {path} is missing")
    if path.stat().st_size == 0:
        raise ValueError(f"safetensors shard {path} is empty (0 bytes)")
    try:
        return safe_open(str(path), framework="np")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"safetensors shard {path} cannot be read (truncated or corrupt?): "
                         f"{e}") from e


# Tensors transformers keeps in float32 whatever the declared dtype (`_keep_in_fp32_modules`).
_FP32_TENSORS = ("e_score_correction_bias",)


class _Tensors:
    """Lazy reader of the safetensors shards of a directory, with shape and dtype checks.

    With `model.safetensors.index.json` the shards are those its `weight_map` names (each must
    exist and hold the tensors mapped to it); without it, every `*.safetensors` file, no tensor
    in two of them. Every failure names the file and the tensor.
    """

    def __init__(self, hf_dir: Path, model_type: str, declared_dtype: str | None):
        self.hf_dir, self.model_type, self.declared = hf_dir, model_type, declared_dtype
        self.used: set[str] = set()
        self.unindexed: dict[str, str] = {}  # tensors in a shard that the index does not list
        index = hf_dir / INDEX_FILE
        if index.exists():
            self._from_index(index)
        else:
            self._from_files()

    def _from_files(self) -> None:
        files = sorted(self.hf_dir.glob("*.safetensors"))
        if not files:
            raise ValueError(f"no *.safetensors files in {self.hf_dir} (and no {INDEX_FILE})")
        self.where: dict[str, tuple[object, str]] = {}
        for f in files:
            h = _open_shard(f)
            for name in h.keys():
                if name in self.where:
                    raise ValueError(f"tensor {name!r} is stored twice in {self.hf_dir}: in "
                                     f"{self.where[name][1]} and {f.name}")
                self.where[name] = (h, f.name)
        self.shards = [f.name for f in files]

    def _from_index(self, index: Path) -> None:
        data = hf_config.read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} must be a JSON object with a non-empty 'weight_map' "
                             "(tensor name → shard file)")
        bad = [(k, v) for k, v in weight_map.items() if not isinstance(v, str)]
        if bad:
            raise ValueError(f"{index}: 'weight_map' maps tensor {bad[0][0]!r} to {bad[0][1]!r}, "
                             "not a shard file name")
        by_shard: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            by_shard.setdefault(shard, []).append(name)
        self.where = {}
        for shard, names in sorted(by_shard.items()):
            path = self.hf_dir / shard
            if not path.is_file():
                raise ValueError(f"{index} maps {len(names)} tensor(s) (e.g. {names[0]!r}) to "
                                 f"shard {shard!r}, which is missing from {self.hf_dir}")
            h = _open_shard(path)
            held = set(h.keys())
            absent = [n for n in names if n not in held]
            if absent:
                raise ValueError(f"{index} maps tensor {absent[0]!r} to shard {shard!r}, which "
                                 "does not hold it" + (f" ({len(absent) - 1} more)"
                                                       if len(absent) > 1 else ""))
            for name in names:
                self.where[name] = (h, shard)
            for name in held - set(names):
                self.unindexed[name] = shard
        self.shards = sorted(by_shard)

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.where:
            if name in self.unindexed:
                raise ValueError(f"tensor {name!r} is missing from {self.hf_dir / INDEX_FILE}'s "
                                 f"weight_map, though shard {self.unindexed[name]!r} holds it "
                                 "(the index is incomplete)")
            shards = ", ".join(self.shards[:3]) + (" ..." if len(self.shards) > 3 else "")
            raise ValueError(f"tensor {name!r} is missing from {self.hf_dir} (no shard holds "
                             f"it: {shards}; a {self.model_type} with this config.json needs "
                             "it)")
        handle, shard = self.where[name]
        sl = handle.get_slice(name)
        got, dtype = tuple(sl.get_shape()), sl.get_dtype()
        if got != tuple(shape):
            raise ValueError(f"tensor {name!r} has shape {got}, expected {tuple(shape)} from "
                             f"config.json (in shard {shard})")
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {dtype}; only float checkpoints "
                             f"({', '.join(_FLOAT_DTYPES)}) can be converted (in shard {shard})")
        if (self.declared is not None and _FLOAT_DTYPES[dtype] != self.declared
                and not name.endswith(_FP32_TENSORS)):
            raise ValueError(f"tensor {name!r} is {_FLOAT_DTYPES[dtype]} but config.json "
                             f"declares dtype {self.declared!r} (in shard {shard})")
        self.used.add(name)
        try:
            return handle.get_tensor(name).astype(np.float32)
        except Exception as e:  # SafetensorError or a numpy error on a corrupt buffer
            raise ValueError(f"tensor {name!r} in shard {self.hf_dir / shard} cannot be read: "
                             f"{e}") from e

    def _empty(self, name: str) -> bool:
        """A tensor with no elements (DeepSeek-V3 with `n_shared_experts=0` saves its shared
        expert at width 0): nothing to convert."""
        handle, _ = self.where[name]
        return 0 in handle.get_slice(name).get_shape()

    def check_all_used(self) -> None:
        left = sorted(n for n in self.where if n not in self.used
                      and not n.startswith(_IGNORED_PREFIXES) and not n.endswith(_IGNORED_SUFFIXES)
                      and not self._empty(n))
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
      ValueError: every way the directory can be broken, with the file and the key or tensor
        named: `hf_dir` not a directory; config.json missing, not valid JSON (line and column),
        not an object, missing a key, a key of the wrong type, an unsupported `model_type` or
        option; no shards, an empty or truncated shard, an index naming a missing shard or a
        tensor its shard lacks; a missing, mis-shaped, non-float, unexpected or
        undeclared-dtype tensor.
    """
    check_choice("dtype", dtype, PARAM_DTYPES)
    if max_seq_len is not None:
        check_int("max_seq_len", max_seq_len, lo=1)
    if not isinstance(hf_dir, str | os.PathLike):
        raise ArgumentTypeError(f"hf_dir must be a path (str or os.PathLike), got "
                                f"{type(hf_dir).__name__}")
    hf_dir = Path(hf_dir)
    hf = hf_config.read_hf_config(hf_dir)
    cfg = hf_config.lm_config_from_hf(hf, dtype=dtype, max_seq_len=max_seq_len,
                                      source=str(hf_dir / "config.json"))
    text = hf_config.text_config(hf)
    tensors = _Tensors(hf_dir, hf["model_type"], _declared_dtype(text))
    get = tensors.get
    if text is not hf:  # a vision-language checkpoint: its LM is under model.language_model
        get = lambda name, shape: tensors.get(  # noqa: E731
            name.replace("model.", "model.language_model.", 1), shape)
    params = hf_weights.params_from_hf(get, cfg, text["model_type"])
    state = jax.jit(lambda k: lm.init(k, cfg)[1])(jax.random.key(0))  # router state
    state = hf_weights.state_from_hf(get, cfg, text["model_type"], state)
    state = jax.tree.map(jnp.asarray, state)
    tensors.check_all_used()
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype=dtype), params)
    # The converted tree must be exactly lm.init's (structure and shapes).
    want = jax.eval_shape(lambda: lm.init(jax.random.key(0), cfg)[0])
    check_same_shapes("converted params", want, params)
    return cfg, params, state, hf


def export_hf(params: dict, cfg: lm.LMConfig, out_dir: str | os.PathLike, *,
              model_type: str, state: dict | None = None) -> Path:
    """Writes moejax params as a HF model directory (config.json + model.safetensors).

    Args:
      params: LM params of an architecture `model_type` can express.
      cfg: their config.
      out_dir: the new directory (must not exist, or be empty).
      model_type: one of `hf_config.SUPPORTED` but "qwen3_5_moe" (the vision-language
        checkpoint; its language model exports as "qwen3_5_moe_text").
      state: the LM's router state; needed for "deepseek_v3" (its aux-free router biases are
        the checkpoint's `e_score_correction_bias`), ignored otherwise.

    Raises:
      ValueError: the architecture cannot express `cfg` (fields named), or `out_dir` is not
        empty.
    """
    from safetensors.numpy import save_file

    if not isinstance(cfg, lm.LMConfig):
        raise ArgumentTypeError(f"cfg must be an LMConfig, got {type(cfg).__name__}")
    if not isinstance(out_dir, str | os.PathLike):
        raise ArgumentTypeError(f"out_dir must be a path (str or os.PathLike), got "
                                f"{type(out_dir).__name__}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {out_dir} exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"out_dir {out_dir} is not empty")
    hf = hf_config.hf_config_from_lm(cfg, model_type)
    host = jax.tree.map(np.asarray, jax.device_get(params))
    dtypes = {str(a.dtype) for a in jax.tree.leaves(host)}
    if len(dtypes) != 1:
        raise ValueError(f"params mix dtypes {sorted(dtypes)}; cast them to one first")
    hf["dtype"] = dtypes.pop()
    if state is not None:
        state = jax.tree.map(np.asarray, jax.device_get(state))
    tensors = hf_weights.hf_from_params(host, cfg, model_type, state=state)
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

