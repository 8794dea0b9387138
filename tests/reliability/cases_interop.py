"""Bad-input cases of the Hugging Face interop: every way an HF directory can be broken.

Each case copies a tiny valid Mixtral directory (written once per process by moejax's own
`export_hf`, so no transformers import is needed), breaks one thing and loads it; the message
must name the file and the key or tensor. `test_hf_broken.py` checks that the intact directory
(and a sharded copy with an index) loads, so these cases fail for the reason they name.
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from moejax.interop import export_hf, hf_config_from_lm, lm_config_from_hf, load_hf
from moejax.interop.hf import INDEX_FILE
from moejax.models import lm
from moejax.validation import ArgumentTypeError
from tests.reliability.cases import Case

TINY = dict(vocab_size=64, d_model=16, num_layers=2, num_heads=2, head_dim=8, num_kv_heads=1,
            mixer="softmax", d_ff=16, max_seq_len=32,
            moe=dict(num_experts=2, top_k=1, router_kwargs=(("renormalize", True),)))
_ROOT = tempfile.TemporaryDirectory(prefix="moejax-hf-cases-")


@functools.lru_cache(maxsize=1)
def tiny_hf_dir() -> Path:
    """A valid tiny Mixtral HF directory (config.json + model.safetensors); do not modify."""
    cfg = lm.LMConfig(**TINY)
    params, _ = lm.init(jax.random.key(0), cfg)
    return export_hf(params, cfg, Path(_ROOT.name) / "tiny_mixtral", model_type="mixtral")


_copies = iter(range(10**9))


def broken_copy(edit: Callable[[Path], None]) -> Path:
    """A fresh copy of `tiny_hf_dir()` with `edit(dir)` applied."""
    d = Path(_ROOT.name) / f"case{next(_copies)}"
    shutil.copytree(tiny_hf_dir(), d)
    edit(d)
    return d


def config_of(d: Path) -> dict:
    return json.loads((d / "config.json").read_text())


def write_config(d: Path, hf) -> None:
    (d / "config.json").write_text(json.dumps(hf))


def edit_config(fn: Callable[[dict], dict]) -> Callable[[Path], None]:
    return lambda d: write_config(d, fn(config_of(d)))


def without(key: str) -> Callable[[dict], dict]:
    return lambda hf: {k: v for k, v in hf.items() if k != key}


def shard(d: Path, first: int | None = None) -> None:
    """Splits model.safetensors into two shards and writes the index (HF's sharded layout).
    `first` tensors go to shard 1 (default: half)."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    names = sorted(tensors)
    first = len(names) // 2 if first is None else first
    files = {"model-00001-of-00002.safetensors": names[:first],
             "model-00002-of-00002.safetensors": names[first:]}
    weight_map = {}
    for f, ns in files.items():
        save_file({n: tensors[n] for n in ns}, str(d / f), metadata={"format": "pt"})
        weight_map.update({n: f for n in ns})
    (d / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def edit_index(fn: Callable[[dict], dict]) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        shard(d)
        index = json.loads((d / INDEX_FILE).read_text())
        (d / INDEX_FILE).write_text(json.dumps(fn(index)))
    return edit


def _truncate(d: Path) -> None:
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])


def _rewrite_tensors(fn: Callable[[dict], dict]) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        from safetensors.numpy import load_file, save_file

        f = d / "model.safetensors"
        save_file(fn(load_file(str(f))), str(f), metadata={"format": "pt"})
    return edit


def _load(edit: Callable[[Path], None]):
    return lambda: load_hf(broken_copy(edit))


def _drop_mapped_tensor(index: dict) -> dict:
    weight_map = dict(index["weight_map"])
    del weight_map["model.norm.weight"]
    return {**index, "weight_map": weight_map}


def _misroute(index: dict) -> dict:
    weight_map = dict(index["weight_map"])
    other = {"model-00001-of-00002.safetensors": "model-00002-of-00002.safetensors",
             "model-00002-of-00002.safetensors": "model-00001-of-00002.safetensors"}
    weight_map["model.norm.weight"] = other[weight_map["model.norm.weight"]]
    return {**index, "weight_map": weight_map}


NORM = "model.norm.weight"

CASES = [
    # The directory and config.json.
    Case("hf-dir-missing", lambda: load_hf(Path(_ROOT.name) / "nowhere"), ValueError,
         ("nowhere", "does not exist")),
    Case("hf-dir-is-a-file", lambda: load_hf(tiny_hf_dir() / "config.json"), ValueError,
         ("config.json", "not a directory")),
    Case("hf-dir-not-a-path", lambda: load_hf(None), ArgumentTypeError, ("hf_dir", "path")),
    Case("hf-config-missing", _load(lambda d: (d / "config.json").unlink()), ValueError,
         ("no config.json",)),
    Case("hf-config-invalid-json",
         _load(lambda d: (d / "config.json").write_text('{\n "model_type": "mixtral",\n oops\n}')),
         ValueError, ("config.json", "not valid json", "line 3")),
    Case("hf-config-not-an-object", _load(lambda d: write_config(d, [1, 2])), ValueError,
         ("config.json", "json object")),
    Case("hf-config-no-model-type", _load(edit_config(without("model_type"))), ValueError,
         ("config.json", "model_type", "mixtral, qwen3_moe, qwen3_next")),
    Case("hf-config-unsupported-model-type",
         _load(edit_config(lambda hf: {**hf, "model_type": "llama"})), ValueError,
         ("config.json", "'llama'", "mixtral, qwen3_moe, qwen3_next")),
    Case("hf-config-missing-key", _load(edit_config(without("hidden_size"))), ValueError,
         ("config.json", "missing key 'hidden_size'")),
    Case("hf-config-str-int",
         _load(edit_config(lambda hf: {**hf, "num_hidden_layers": "2"})), ValueError,
         ("config.json", "'num_hidden_layers'", "integer", "'2'")),
    Case("hf-config-str-number",
         _load(edit_config(lambda hf: {**hf, "rms_norm_eps": "1e-6"})), ValueError,
         ("config.json", "'rms_norm_eps'", "number")),
    Case("hf-config-str-bool",
         _load(edit_config(lambda hf: {**hf, "tie_word_embeddings": "false"})), ValueError,
         ("config.json", "'tie_word_embeddings'", "true or false")),
    Case("hf-config-bad-rope-parameters",
         _load(edit_config(lambda hf: {**hf, "rope_parameters": 10000.0})), ValueError,
         ("config.json", "rope_parameters")),
    Case("hf-config-kv-heads-do-not-divide",
         _load(edit_config(lambda hf: {**hf, "num_key_value_heads": 3})), ValueError,
         ("config.json", "num_key_value_heads=3", "num_attention_heads=2")),
    Case("hf-config-zero-layers",
         _load(edit_config(lambda hf: {**hf, "num_hidden_layers": 0})), ValueError,
         ("config.json", "num_hidden_layers", ">= 1")),
    # Shards and the index.
    Case("hf-no-safetensors", _load(lambda d: (d / "model.safetensors").unlink()), ValueError,
         ("no *.safetensors",)),
    Case("hf-empty-shard", _load(lambda d: (d / "model.safetensors").write_bytes(b"")),
         ValueError, ("model.safetensors", "empty")),
    Case("hf-truncated-shard", _load(_truncate), ValueError,
         ("model.safetensors", "truncated or corrupt")),
    Case("hf-index-invalid-json",
         _load(lambda d: (shard(d), (d / INDEX_FILE).write_text("{"))), ValueError,
         (INDEX_FILE, "not valid json", "line 1")),
    Case("hf-index-no-weight-map", _load(edit_index(lambda i: {"metadata": {}})), ValueError,
         (INDEX_FILE, "weight_map")),
    Case("hf-index-missing-shard",
         _load(lambda d: (shard(d), (d / "model-00002-of-00002.safetensors").unlink())),
         ValueError, (INDEX_FILE, "model-00002-of-00002.safetensors", "missing")),
    Case("hf-index-missing-entry", _load(edit_index(_drop_mapped_tensor)), ValueError,
         (NORM, INDEX_FILE, "weight_map", "index is incomplete")),
    Case("hf-index-wrong-shard", _load(edit_index(_misroute)), ValueError,
         (INDEX_FILE, NORM, "does not hold it")),
    # Tensors.
    Case("hf-tensor-missing",
         _load(_rewrite_tensors(lambda t: {k: v for k, v in t.items() if k != NORM})),
         ValueError, (NORM, "missing", "model.safetensors")),
    Case("hf-tensor-wrong-shape",
         _load(_rewrite_tensors(lambda t: {**t, NORM: t[NORM][:-1]})), ValueError,
         (NORM, "shape (15,)", "expected (16,)", "model.safetensors")),
    Case("hf-tensor-wrong-dtype",
         _load(_rewrite_tensors(lambda t: {**t, NORM: t[NORM].astype(np.float16)})),
         ValueError, (NORM, "float16", "declares dtype 'float32'")),
    Case("hf-tensor-int-dtype",
         _load(_rewrite_tensors(lambda t: {**t, NORM: t[NORM].astype(np.int32)})),
         ValueError, (NORM, "I32", "only float")),
    Case("hf-tensor-unexpected",
         _load(_rewrite_tensors(lambda t: {**t, "model.extra.weight": np.zeros(3, np.float32)})),
         ValueError, ("model.extra.weight", "does not have")),
    # Arguments.
    Case("hf-load-dtype", lambda: load_hf(tiny_hf_dir(), dtype="float16"), ValueError,
         ("dtype", "bfloat16")),
    Case("hf-load-max-seq-len-str", lambda: load_hf(tiny_hf_dir(), max_seq_len="64"),
         ArgumentTypeError, ("max_seq_len", "int")),
    Case("hf-lm-config-from-hf-not-dict", lambda: lm_config_from_hf("config.json"), ValueError,
         ("config.json", "json object")),
    Case("hf-export-model-type",
         lambda: hf_config_from_lm(lm.LMConfig(**TINY), "llama"), ValueError,
         ("model_type", "mixtral")),
    Case("hf-export-cfg-dict",
         lambda: export_hf({}, TINY, Path(_ROOT.name) / "never", model_type="mixtral"),
         ArgumentTypeError, ("cfg", "LMConfig")),
]
