"""Broken Hugging Face directories, beyond the one-call cases of `cases_interop.py`: the intact
directory and its sharded copy load (so each case fails for the reason it names), stray files are
handled as transformers handles them, and the `convert_hf` script reports a broken input by file
and key, writing nothing."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from moejax.interop import load_hf
from moejax.interop.hf import INDEX_FILE
from tests.reliability.cases_interop import (
    TINY,
    broken_copy,
    edit_config,
    shard,
    tiny_hf_dir,
    without,
)


@pytest.fixture(scope="module")
def intact():
    cfg, params, _, hf = load_hf(tiny_hf_dir())
    return cfg, params, hf


def _same(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_intact_directory_loads(intact):
    cfg, _, hf = intact
    assert hf["model_type"] == "mixtral"
    assert (cfg.d_model, cfg.num_layers, cfg.vocab_size) == (TINY["d_model"], 2, 64)


def test_sharded_copy_with_index_loads_the_same_params(intact):
    cfg, params, _ = intact
    cfg2, params2, _, _ = load_hf(broken_copy(shard))
    assert cfg2 == cfg
    _same(params, params2)


def test_index_ignores_a_stray_shard_it_does_not_name(intact):
    """With an index, only the shards it names are read (as transformers does): a leftover
    file holding other copies of the tensors neither breaks nor changes the load."""
    from safetensors.numpy import save_file

    def edit(d):
        shard(d)
        save_file({"model.norm.weight": np.full(TINY["d_model"], 7.0, np.float32)},
                  str(d / "consolidated.safetensors"))

    _, params2, _, _ = load_hf(broken_copy(edit))
    _same(intact[1], params2)


def test_without_index_a_tensor_in_two_files_is_refused():
    def edit(d):
        shard(d)
        (d / INDEX_FILE).unlink()
        (d / "copy.safetensors").write_bytes((d / "model-00002-of-00002.safetensors").read_bytes())

    with pytest.raises(ValueError, match=r"is stored twice in .*: in copy.safetensors and "
                                         r"model-00002-of-00002.safetensors"):
        load_hf(broken_copy(edit))


def test_index_missing_shard_is_refused_even_when_its_tensors_sit_elsewhere():
    """An index naming a shard that is gone is refused, not silently served from other files."""
    def edit(d):
        shard(d)
        (d / "model-00002-of-00002.safetensors").rename(d / "renamed.safetensors")

    with pytest.raises(ValueError, match=r"index.json maps \d+ tensor\(s\) .* to shard "
                                         r"'model-00002-of-00002.safetensors', which is missing"):
        load_hf(broken_copy(edit))


def _run(*args):
    return subprocess.run([sys.executable, "-m", "experiments.convert_hf", *args],
                          capture_output=True, text=True, timeout=300)


def test_convert_hf_script_names_the_file_and_key_and_writes_nothing(tmp_path):
    d = broken_copy(edit_config(without("vocab_size")))
    res = _run(f"--hf_dir={d}", f"--workdir={tmp_path / 'out'}")
    assert res.returncode != 0
    assert f"{d / 'config.json'}: missing key 'vocab_size'" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text,match", [
    ('{"model": {\n"d_model": 16,\n}}', r"model_config.json is not valid JSON: .* line 3"),
    ('[1]', r"model_config.json must hold a JSON object with a 'model' object"),
    (json.dumps({"model": {"d_modle": 16}}), r"model_config.json \['model'\]: unknown "
                                               r"LMConfig field\(s\) d_modle"),
    (json.dumps({"model": {"d_model": "16"}}), r"model_config.json \['model'\]: d_model must "
                                                r"be an int, got '16'"),
])
def test_convert_hf_to_hf_names_a_broken_model_config(tmp_path, text, match):
    """`--to_hf` reads a model directory through `load_any`: a broken model_config.json is
    named (file, line, key) before orbax is asked for the tree."""
    from experiments import convert_hf

    (tmp_path / "model_config.json").write_text(text)
    with pytest.raises(ValueError, match=match):
        convert_hf.load_any(str(tmp_path))
