"""The training loop: config checks, schedule, learning, NaN stop, data parallelism."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from moejax import data, parallel
from moejax.train import Checkpointer, loop, read_metrics
from tests.train import stand_in

B, T = 8, 32
CORPUS = data.CorpusConfig(max_bytes=2**17)


def single_device_mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()[:1]), ("data",))


def batches(split: str = "train", batch_size: int = B, seq_len: int = T):
    return data.iterator(data.make_corpus_dataset(CORPUS, split=split, seed=0,
                                                  batch_size=batch_size, seq_len=seq_len))


def train_cfg(**overrides) -> loop.TrainConfig:
    base = dict(steps=30, lr=1e-2, warmup_steps=3, batch_size=B, seq_len=T, log_every=1,
                eval_every=0, eval_batches=2, ckpt_every=0)
    return loop.TrainConfig(**{**base, **overrides})


class Poisoned:
    """Corpus batches where batch number `at` (1-based) carries `stand_in`'s poison token."""

    def __init__(self, it, *, at: int, token: int):
        self.it, self.at, self.token, self.n = it, at, token, 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = dict(next(self.it))
        self.n += 1
        if self.n == self.at:
            batch["inputs"] = batch["inputs"].copy()
            batch["inputs"][0, 0] = self.token
        return batch

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)


# ---------------------------------------------------------------------------------------------
# Learning.


def test_stand_in_loss_drops_and_outputs_are_written(tmp_path):
    result = loop.run(stand_in.StandInConfig(), train_cfg(eval_every=15), tmp_path,
                      train_data=batches(), val_data=lambda: batches("val"), model=stand_in,
                      mesh=single_device_mesh(), progress=False, bytes_per_token=1)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 31))
    assert records[-1]["ce"] < records[0]["ce"] - 1.0
    for key in ("loss", "lr", "tokens_per_s", "load_cv", "load_max_vio", "grad_norm"):
        assert key in records[0], key
    assert np.shape(records[0]["load"]) == (2, 4)
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [15, 30]
    assert val[-1]["val_bpb"] == pytest.approx(val[-1]["val_loss"] / np.log(2))
    assert result.step == 30 and int(result.state.step) == 30
    # The last step is always checkpointed.
    assert Checkpointer(tmp_path, keep=1, read_only=True).latest_step() == 30
    assert {p.name for p in result.plot_paths} == {"loss_curves.png", "expert_load.png"}
    assert all(p.stat().st_size > 0 for p in result.plot_paths)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "config.json").exists()


@pytest.mark.slow  # the real LM through `run`: tests/experiments/test_train_lm.py by default
def test_tiny_lm_loss_drops_over_30_steps(tmp_path):
    from moejax.models import lm

    loop.run(lm.get_preset("tiny"), train_cfg(log_every=10), tmp_path, train_data=batches(),
             model=lm, mesh=single_device_mesh(), progress=False)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 10, 20, 30]
    assert records[-1]["ce"] < records[0]["ce"] - 1.0
    assert np.shape(records[0]["load"]) == (2, 4)  # tiny: 2 MoE layers x 4 experts


# ---------------------------------------------------------------------------------------------
# Bad input and failures.


def test_non_finite_loss_stops_naming_the_step_and_keeps_last_checkpoint(tmp_path):
    model_cfg = stand_in.StandInConfig(poison_id=255)  # 0xFF never occurs in UTF-8 text
    it = Poisoned(batches(), at=5, token=255)
    with pytest.raises(FloatingPointError, match=r"at step 5\b.*step 4"):
        loop.run(model_cfg, train_cfg(steps=8, ckpt_every=2), tmp_path, train_data=it,
                 model=stand_in, mesh=single_device_mesh(), progress=False)
    assert Checkpointer(tmp_path, keep=3, read_only=True).latest_step() == 4
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    state, _ = loop.load_checkpoint(tmp_path, model_cfg, model=stand_in)
    assert int(state.step) == 4
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))


def test_seq_len_longer_than_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="max_seq_len"):
        loop.run(stand_in.StandInConfig(max_seq_len=16), train_cfg(), tmp_path,
                 train_data=batches(), model=stand_in, progress=False)


def test_batch_of_wrong_shape_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"\(batch_size, seq_len\)"):
        loop.run(stand_in.StandInConfig(), train_cfg(), tmp_path,
                 train_data=batches(seq_len=16), model=stand_in, mesh=single_device_mesh(),
                 progress=False)


def test_batch_not_divisible_by_data_axis_is_refused(tmp_path):
    mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))
    with pytest.raises(ValueError, match="divisible"):
        loop.run(stand_in.StandInConfig(), train_cfg(batch_size=4), tmp_path,
                 train_data=batches(batch_size=4), model=stand_in, mesh=mesh, progress=False)


# ---------------------------------------------------------------------------------------------
# Data parallelism.


def test_data_parallel_step_matches_single_device(tmp_path):
    assert jax.device_count() == 8, "tests/conftest.py sets 8 CPU devices"
    cfg = train_cfg(steps=3)
    losses = {}
    for name, devices in (("one", jax.devices()[:1]), ("dp", jax.devices())):
        result = loop.run(stand_in.StandInConfig(), cfg, tmp_path / name, train_data=batches(),
                          model=stand_in, mesh=Mesh(np.asarray(devices), ("data",)),
                          progress=False)
        losses[name] = [(r["loss"], r["grad_norm"]) for r in read_metrics(tmp_path / name)]
        leaf = jax.tree.leaves(result.state.params)[0]
        assert leaf.sharding.is_fully_replicated
        assert len(leaf.sharding.device_set) == len(devices)
    np.testing.assert_allclose(losses["dp"], losses["one"], rtol=1e-5)


def test_mesh_of_train_config_places_state_and_resumes_on_another_mesh(tmp_path):
    """FSDP × data from `TrainConfig.mesh`: the same trajectory as one device, params and
    optimizer state split over 'fsdp'; a run saved there resumes on one device, exactly on
    course (the saved data position too)."""
    import shutil

    one = loop.run(stand_in.StandInConfig(), train_cfg(steps=6), tmp_path / "one",
                   train_data=batches(), model=stand_in, mesh=single_device_mesh(),
                   progress=False, end_of_run=())
    cfg = train_cfg(steps=6, ckpt_every=2, mesh="data:2,fsdp:4")
    fsdp = loop.run(stand_in.StandInConfig(), cfg, tmp_path / "fsdp", train_data=batches(),
                    model=stand_in, progress=False, end_of_run=())
    embed = fsdp.state.params["embed"]
    assert embed.sharding.spec == jax.sharding.PartitionSpec("fsdp")
    assert embed.addressable_shards[0].data.shape == (256 // 4, 32)
    want = [r["loss"] for r in read_metrics(tmp_path / "one")]
    np.testing.assert_allclose([r["loss"] for r in read_metrics(tmp_path / "fsdp")], want,
                               rtol=1e-5)
    # As if stopped after step 2 on the (2, 4, 1) mesh, then resumed on one device.
    shutil.copytree(tmp_path / "fsdp", tmp_path / "moved")
    for step in ("4", "6"):
        shutil.rmtree(tmp_path / "moved" / "checkpoints" / step)
    moved = loop.run(stand_in.StandInConfig(), cfg.replace(mesh=None), tmp_path / "moved",
                     train_data=batches(), model=stand_in, mesh=single_device_mesh(),
                     progress=False, end_of_run=())
    assert len(moved.state.params["embed"].sharding.device_set) == 1
    np.testing.assert_allclose([r["loss"] for r in read_metrics(tmp_path / "moved")], want,
                               rtol=1e-5)
    np.testing.assert_allclose(np.asarray(moved.state.params["embed"]),
                               np.asarray(one.state.params["embed"]), rtol=1e-5, atol=1e-6)


def test_bad_meshes_are_refused_by_name(tmp_path):
    kw = dict(train_data=batches(), model=stand_in, progress=False)
    with pytest.raises(ValueError, match=r"mesh=data:3,fsdp:1,expert:1 has 3 devices .* there "
                                         r"are 8"):
        loop.run(stand_in.StandInConfig(), train_cfg(mesh="data:3"), tmp_path / "a", **kw)
    with pytest.raises(ValueError, match=r"disagrees with train_cfg.mesh='data:8,fsdp:1"):
        loop.run(stand_in.StandInConfig(), train_cfg(mesh="data:8"), tmp_path / "b",
                 mesh=single_device_mesh(), **kw)
    with pytest.raises(ValueError, match=r"batch_size=4 is not divisible by the mesh's "
                                         r"data×fsdp = 2×4 = 8"):
        loop.run(stand_in.StandInConfig(), train_cfg(batch_size=4), tmp_path / "c",
                 mesh=parallel.make_mesh(2, fsdp=4), **kw)
    with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
        train_cfg(mesh="model:8")
    assert not any((tmp_path / d).exists() for d in "abc")
