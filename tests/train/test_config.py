"""`TrainConfig`: field checks naming the field, NumPy scalars stored as Python numbers."""

import numpy as np
import pytest

from moejax.train import checkpoint
from moejax.train.config import OPTIMIZER_PRESETS, TrainConfig


@pytest.mark.parametrize(
    "field, value",
    [("steps", 0), ("steps", -3), ("lr", 0.0), ("batch_size", 0), ("seq_len", 0),
     ("min_lr_ratio", 1.5), ("clip_norm", -1.0), ("eval_every", -1), ("keep_checkpoints", 0),
     ("b2", 1.0), ("steps", 2.5), ("log_every", True), ("eps", -1e-8), ("eps", float("inf")),
     ("eps", "1e-15")],
)
def test_train_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_train_config_stores_numpy_scalars_as_python_numbers():
    cfg = TrainConfig(steps=np.int64(10), lr=np.float32(0.5), clip_norm=np.float64(2.0))
    assert type(cfg.steps) is int and type(cfg.lr) is float and type(cfg.clip_norm) is float
    saved = checkpoint.config_to_json(cfg)  # what a checkpoint stores: numbers, not strings
    assert saved["lr"] == 0.5 and saved["steps"] == 10
    assert TrainConfig(**saved) == cfg


def test_eps_default_and_the_authors_presets():
    assert TrainConfig().eps == 1e-8
    assert TrainConfig(eps=0).eps == 0.0 and type(TrainConfig(eps=0).eps) is float
    for name, lr, warmup in [("340m", 1e-3, 1024), ("1b", 4e-4, 2048)]:
        cfg = TrainConfig(**OPTIMIZER_PRESETS[name])
        assert (cfg.lr, cfg.warmup_steps, cfg.eps, cfg.clip_norm, cfg.min_lr_ratio) == (
            lr, warmup, 1e-15, 1.0, 0.1)
        assert cfg.batch_size * cfg.seq_len == 128 * 4096  # ≈0.5M tokens per step
