"""Checkpoints: exact resume after a crash, restore in a fresh process, config refusal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from moejax.train import Checkpointer, loop, read_metrics
from moejax.train import checkpoint as ckpt_lib
from tests.train import stand_in
from tests.train.test_loop import batches, single_device_mesh, train_cfg

REPO = Path(__file__).resolve().parents[2]
# Fields that are equal bit for bit between an uninterrupted and a resumed run.
EXACT = ("loss", "ce", "aux_loss", "grad_norm", "lr", "load", "val_loss")


class Crashing:
    """Batches until batch number `at` (1-based), which raises: a crash during that step."""

    def __init__(self, it, *, at: int):
        self.it, self.at, self.n = it, at, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.n += 1
        if self.n == self.at:
            raise RuntimeError("simulated crash")
        return next(self.it)

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)


def run_stand_in(workdir, cfg, train_data, **kwargs):
    return loop.run(stand_in.StandInConfig(), cfg, workdir, train_data=train_data,
                    val_data=lambda: batches("val"), model=stand_in, mesh=single_device_mesh(),
                    progress=False, **kwargs)


def exact_fields(records):
    return [{k: r[k] for k in ("step", *EXACT) if k in r} for r in records]


def test_resume_after_crash_equals_uninterrupted_run(tmp_path):
    cfg = train_cfg(steps=8, ckpt_every=3, eval_every=4)
    full = run_stand_in(tmp_path / "full", cfg, batches())

    # Crash during step 6: checkpoint 3 exists, metrics of steps 4-5 were written after it.
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_stand_in(tmp_path / "resumed", cfg, Crashing(batches(), at=6))
    assert Checkpointer(tmp_path / "resumed", keep=3, read_only=True).latest_step() == 3
    assert [r["step"] for r in read_metrics(tmp_path / "resumed")] == [1, 2, 3, 4, 5]

    resumed = run_stand_in(tmp_path / "resumed", cfg, batches())  # a fresh call, fresh iterator
    want, got = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in got] == list(range(1, 9))  # steps 4-5 not duplicated
    assert exact_fields(got) == exact_fields(want)
    for a, b in zip(jax.tree.leaves(full.state), jax.tree.leaves(resumed.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # keep_checkpoints=3 by default: 3, 6, 8 remain.
    assert sorted(int(p.name) for p in (tmp_path / "resumed/checkpoints").iterdir()
                  if p.name.isdigit()) == [3, 6, 8]


_CHILD = textwrap.dedent("""
    import json, sys
    import jax
    import numpy as np
    from jax.sharding import Mesh
    from tests.train import stand_in
    from moejax.train import loop
    from tests.train.test_loop import batches, train_cfg

    jax.config.update("jax_default_matmul_precision", "highest")
    workdir = sys.argv[1]
    state, config = loop.load_checkpoint(workdir, stand_in.StandInConfig(), model=stand_in)
    digest = [float(np.asarray(x, np.float64).sum()) for x in jax.tree.leaves(state)]
    mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    loop.run(stand_in.StandInConfig(), train_cfg(steps=6, ckpt_every=2), workdir,
             train_data=batches(), model=stand_in, mesh=mesh, progress=False)
    print(json.dumps({"step": int(state.step), "digest": digest, "train": config["train"]}))
""")


def test_restore_and_resume_in_a_fresh_process(tmp_path):
    cfg = train_cfg(steps=6, ckpt_every=2)
    loop.run(stand_in.StandInConfig(), cfg, tmp_path / "full", train_data=batches(),
             model=stand_in, mesh=single_device_mesh(), progress=False)
    with pytest.raises(RuntimeError):
        loop.run(stand_in.StandInConfig(), cfg, tmp_path / "child",
                 train_data=Crashing(batches(), at=5), model=stand_in,
                 mesh=single_device_mesh(), progress=False)
    state4, _ = loop.load_checkpoint(tmp_path / "child", stand_in.StandInConfig(), model=stand_in)

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "child")], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["step"] == 4
    assert out["train"] == ckpt_lib.config_to_json(cfg)
    assert out["digest"] == [float(np.asarray(x, np.float64).sum())
                             for x in jax.tree.leaves(state4)]
    want = read_metrics(tmp_path / "full")
    got = read_metrics(tmp_path / "child")
    assert exact_fields(got) == exact_fields(want)


def test_incompatible_config_is_refused_and_nothing_is_overwritten(tmp_path):
    run_stand_in(tmp_path, train_cfg(steps=2), batches())
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(ValueError) as info:
        loop.run(stand_in.StandInConfig(d_model=16), train_cfg(steps=4, lr=5e-3), tmp_path,
                 train_data=batches(), model=stand_in, mesh=single_device_mesh(),
                 progress=False)
    message = str(info.value)
    assert "model.d_model: 32 != 16" in message
    assert "train.lr: 0.01 != 0.005" in message
    assert "train.steps" not in message  # steps may change: extending a run is allowed
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before


def test_data_info_differences_are_refused(tmp_path):
    run_stand_in(tmp_path, train_cfg(steps=1), batches(), data_info={"glob": "a/*.txt"})
    with pytest.raises(ValueError, match=r"data.glob: 'a/\*.txt' != 'b/\*.txt'"):
        run_stand_in(tmp_path, train_cfg(steps=2), batches(), data_info={"glob": "b/*.txt"})


def test_config_differences_lists_nested_and_missing_fields():
    saved = {"model": {"a": 1, "b": [1, 2]}, "train": {"lr": 0.1}}
    new = {"model": {"a": 1, "b": [1, 3], "c": True}, "train": {"lr": 0.1}}
    assert ckpt_lib.config_differences(saved, new) == [
        "model.b: [1, 2] != [1, 3]", "model.c: (absent) != True"
    ]
    # A field added after the run was saved, left at its None default, is no difference; the
    # other way round (saved None, now absent) still is.
    assert ckpt_lib.config_differences({"m": {"a": 1}}, {"m": {"a": 1, "new": None}}) == []
    assert ckpt_lib.config_differences({"m": {"old": None}}, {"m": {}}) == [
        "m.old: None != (absent)"]
    # A run saved before TrainConfig.eps resumes at the eps it used, and only at that one.
    assert ckpt_lib.config_differences({"train": {"lr": 0.1}}, {"train": {"lr": 0.1,
                                                                         "eps": 1e-8}}) == []
    assert ckpt_lib.config_differences({"train": {}}, {"train": {"eps": 1e-15}}) == [
        "train.eps: (absent) != 1e-15"]
    assert ckpt_lib.check_config({"train": {"steps": 2}}, {"train": {"steps": 5}},
                                 where="x") == ["train.steps: 2 != 5"]


def test_config_to_json_round_trips_dataclasses_and_tuples():
    cfg = stand_in.StandInConfig()
    out = ckpt_lib.config_to_json({"m": cfg, "t": (1, ("a", 2.0)), "d": np.float32})
    assert out == json.loads(json.dumps(out))
    assert out["m"]["d_model"] == 32 and out["t"] == [1, ["a", 2.0]]
