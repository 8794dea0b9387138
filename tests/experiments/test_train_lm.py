"""Smoke test of `experiments/train_lm.py`: 2 steps, then a rerun on the same workdir resumes."""

from __future__ import annotations

import json

import pytest
from absl import app, flags
from absl.testing import flagsaver

from experiments import train_lm

# The `tiny` model on the default corpus; one val batch; sampling kept short.
SMALL = dict(preset="tiny", batch_size=8, seq_len=32, log_every=1, eval_batches=1,
             warmup_steps=1, lr=1e-2)


@pytest.fixture(autouse=True)
def _parsed_flags():
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def run_main(**overrides):
    with flagsaver.flagsaver(**{**SMALL, **overrides}):
        train_lm.main(["train_lm"])


def test_trains_then_resumes_on_the_same_workdir(tmp_path, capsys):
    run_main(workdir=str(tmp_path), steps=2, ckpt_every=1, sample_tokens=0)
    out = capsys.readouterr().out
    assert "Sample" not in out and "loss_curves.png" in out
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [
        "1", "2"
    ]

    run_main(workdir=str(tmp_path), steps=3, ckpt_every=1, sample_tokens=8)
    out = capsys.readouterr().out
    assert "Resuming from step 2" in out
    assert "Sample after step 3:\ndef " in out
    assert "expert_load.png" in out  # tiny is an MoE model
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert {"loss", "lr", "tokens_per_s", "load_cv"} <= set(records[0])
    assert "val_loss" in records[1] and "val_bpb" in records[2]  # the last step of each run
    assert (tmp_path / "loss_curves.png").exists()


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(seq_len=300), "seq_len=300 exceeds .* max_seq_len=256"),
        (dict(steps=0), "steps must be >= 1"),
        (dict(steps=-2), "steps must be >= 1"),
        (dict(preset="huge"), "Unknown preset 'huge'; known presets: tiny, demo"),
        (dict(mixer="lstm"), "mixer must be one of"),
        (dict(router="oracle"), "unknown router 'oracle'; known routers: topk"),
        (dict(top_k=9), "top_k=9"),
        (dict(batch_size=0), "batch_size must be >= 1"),
        (dict(mesh="data:3"), r"--mesh=data:3,fsdp:1,expert:1 has 3 devices .* there are 8"),
        (dict(mesh="data:4,tensor:2"), "--mesh: unknown mesh axis 'tensor'; the axes are data"),
        (dict(mesh="data:2,data:4"), "--mesh: axis 'data' is given twice"),
        (dict(mesh="expert"), "--mesh: 'expert' is not AXIS:SIZE"),
        (dict(mesh="expert:8"), "num_experts=4 is not divisible by the 'expert' mesh axis of "
                                "size 8"),
        (dict(mesh="fsdp:8", batch_size=4), r"batch_size=4 is not divisible by the batch axes "
                                            r"data×fsdp = 8"),
        (dict(num_processes=2), "--num_processes given without --coordinator_address, "
                                "--process_id"),
        (dict(coordinator_address="localhost", num_processes=2, process_id=0),
         "--coordinator_address must be HOST:PORT"),
        (dict(coordinator_address="localhost:1", num_processes=2, process_id=2),
         "--process_id must be <= 1"),
    ],
    ids=["seq_len", "steps0", "steps_neg", "preset", "mixer", "router", "top_k", "batch",
         "mesh_product", "mesh_axis", "mesh_twice", "mesh_syntax", "mesh_experts",
         "mesh_batch", "processes_alone", "coordinator_syntax", "process_id"],
)
def test_bad_flags_fail_before_training(tmp_path, overrides, match):
    with pytest.raises(app.UsageError, match=match):
        run_main(**{"workdir": str(tmp_path / "run"), "steps": 2, **overrides})
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", ["no_match", "empty"])
def test_bad_data_fails_before_training(tmp_path, case):
    if case == "empty":
        (tmp_path / "empty.txt").write_bytes(b"")
    pattern = str(tmp_path / ("empty.txt" if case == "empty" else "missing/*.txt"))
    with pytest.raises(app.UsageError, match="matches no files|is empty"):
        run_main(workdir=str(tmp_path / "run"), steps=2, data=pattern)
    assert not (tmp_path / "run").exists()


def test_extra_arguments_are_refused(tmp_path):
    with flagsaver.flagsaver(workdir=str(tmp_path)), pytest.raises(app.UsageError):
        train_lm.main(["train_lm", "extra"])


def test_init_from_fine_tunes_a_saved_model_and_refuses_model_flags(tmp_path):
    import jax

    from moejax.models import lm
    from moejax.train import checkpoint

    cfg = lm.get_preset("tiny", mixer="gated_deltanet")
    params, state = lm.init(jax.random.key(3), cfg)
    checkpoint.save_model(tmp_path / "model", cfg, params, state, info={"note": "test"})
    no_preset = {k: v for k, v in SMALL.items() if k != "preset"}
    with flagsaver.flagsaver(**no_preset, workdir=str(tmp_path / "run"), steps=1,
                             init_from=str(tmp_path / "model"), sample_tokens=4):
        train_lm.main(["train_lm"])
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["mixer"] == "gated_deltanet"
    assert saved["data"]["init_from"] == str(tmp_path / "model")
    with pytest.raises(app.UsageError, match="--init_from sets the model; drop --preset"):
        run_main(workdir=str(tmp_path / "run2"), steps=1, init_from=str(tmp_path / "model"))
    small_vocab = lm.get_preset("tiny", vocab_size=64)
    checkpoint.save_model(tmp_path / "m64", small_vocab, *lm.init(jax.random.key(0), small_vocab))
    with flagsaver.flagsaver(**no_preset, workdir=str(tmp_path / "run3"), steps=1,
                             init_from=str(tmp_path / "m64")), \
            pytest.raises(app.UsageError, match="vocab_size=64; byte-level data needs >= 256"):
        train_lm.main(["train_lm"])
    assert not (tmp_path / "run2").exists() and not (tmp_path / "run3").exists()


def test_paper_presets_bring_the_authors_optimiser():
    """--preset=340m / 1b: the run flags default to OPTIMIZER_PRESETS (AdamW ε 1e-15, warmup
    1024 / 2048, lr 1e-3 / 4e-4, 128 × 4096 tokens); a flag given wins; other presets keep the
    plain defaults."""
    with flagsaver.flagsaver():
        assert train_lm.run_settings("340m") == dict(
            steps=28600, lr=1e-3, warmup_steps=1024, eps=1e-15, batch_size=128, seq_len=4096,
            min_lr_ratio=0.1, clip_norm=1.0, weight_decay=0.1, b1=0.9, b2=0.95)
        assert train_lm.run_settings("1b")["lr"] == 4e-4
        assert train_lm.run_settings("1b")["warmup_steps"] == 2048
        assert train_lm.run_settings("demo") == dict(steps=1000, lr=3e-3, warmup_steps=100,
                                                     eps=1e-8, batch_size=16, seq_len=256)
    with flagsaver.flagsaver(lr=5e-4, eps=1e-12, steps=7):
        got = train_lm.run_settings("340m")
        assert (got["lr"], got["eps"], got["steps"], got["warmup_steps"]) == (5e-4, 1e-12, 7,
                                                                               1024)
