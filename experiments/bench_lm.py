r"""Training throughput of the LM presets per mixer: tokens/s of the real jitted train step.

For each preset and mixer, times `moejax.train.steps.train_step` (forward, backward, AdamW update,
router-state update) on random byte batches, median of --reps after a compile run, and reports
tokens/s and model FLOPs utilisation where a peak is known (GPU: pass --peak_tflops). Model
FLOPs are estimated as 6 · (non-embedding params active per token) · tokens, plus the mixers'
sequence terms; the estimate is printed with the result. Writes `WORKDIR/bench_lm.json`.

  python -m experiments.bench_lm --workdir=runs/bench --presets=demo,small
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time

import jax
import numpy as np
from absl import app, flags
from tqdm import tqdm

from moejax.models import lm
from moejax.train import loop, steps

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/bench", "Output folder for the JSON.")
flags.DEFINE_list("presets", ["demo", "small"], "Presets to time.")
flags.DEFINE_list("mixers", list(lm.MIXERS), "Mixers to time.")
flags.DEFINE_integer("batch_size", 8, "Sequences per step.")
flags.DEFINE_integer("seq_len", 256, "Tokens per sequence.")
flags.DEFINE_integer("reps", 3, "Timed steps (median reported).")
flags.DEFINE_float("peak_tflops", 0.0, "Device peak TFLOP/s for MFU (0: not reported).")


def active_params(cfg: lm.LMConfig, params) -> int:
    """Parameters a token passes through: all but the embedding, routed experts counted k/E."""
    total = lm.num_params(params) - cfg.vocab_size * cfg.d_model
    if cfg.ffn == "moe":
        bank = sum(lm.num_params(b["ffn"]["experts"]) for b in params["blocks"])
        total -= bank * (1 - cfg.moe.top_k / cfg.moe.num_experts)
    return int(total)


def model_flops_per_token(cfg: lm.LMConfig, params, seq_len: int) -> float:
    """6·N_active for the matmuls plus the sequence mixing (train = 3× forward)."""
    flops = 6.0 * active_params(cfg, params)
    hd = cfg.num_heads * cfg.head_dim
    if cfg.mixer in lm.DELTA_MIXERS:  # chunk form: ~ (4 C + 6 Dv) per key channel per token
        dv = cfg.value_dim
        flops += 3.0 * 2 * cfg.num_layers * hd * (4 * cfg.chunk_size + 6 * dv)
    else:  # causal attention: QKᵀ and PV over half the sequence on average
        flops += 3.0 * 2 * cfg.num_layers * 2 * hd * seq_len / 2
    return flops


def measure(preset: str, mixer: str) -> dict:
    cfg = lm.get_preset(preset, mixer=mixer)
    tcfg = loop.TrainConfig(steps=1000, batch_size=FLAGS.batch_size, seq_len=FLAGS.seq_len)
    optimizer, _ = loop.make_optimizer(tcfg)
    params, model_state = lm.init(jax.random.key(0), cfg)
    state = loop.TrainState(params=params, model_state=model_state,
                            opt_state=optimizer.init(params), step=np.int32(0))
    rng = np.random.default_rng(0)
    toks = rng.integers(0, cfg.vocab_size, (FLAGS.batch_size, FLAGS.seq_len + 1), np.int32)
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:]}
    step = jax.jit(functools.partial(steps.train_step, model=lm, model_cfg=cfg,
                                     optimizer=optimizer))
    key = jax.random.key(1)
    t0 = time.perf_counter()
    state, m = step(state, batch, key)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(FLAGS.reps):
        t0 = time.perf_counter()
        state, m = step(state, batch, key)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    sec = float(np.median(times))
    tokens = FLAGS.batch_size * FLAGS.seq_len
    flops = model_flops_per_token(cfg, params, FLAGS.seq_len) * tokens
    row = {"preset": preset, "mixer": mixer, "params": lm.num_params(params),
           "active_params": active_params(cfg, params), "step_seconds": sec,
           "compile_seconds": compile_s, "tokens_per_s": tokens / sec,
           "model_tflops_per_s": flops / sec / 1e12}
    if FLAGS.peak_tflops > 0:
        row["mfu"] = row["model_tflops_per_s"] / FLAGS.peak_tflops
    return row


def main(argv):
    del argv
    os.makedirs(FLAGS.workdir, exist_ok=True)
    cases = [(p, m) for p in FLAGS.presets for m in FLAGS.mixers]
    rows = [measure(p, m) for p, m in tqdm(cases, desc="bench_lm", unit="case")]
    report = {
        "settings": {"batch_size": FLAGS.batch_size, "seq_len": FLAGS.seq_len,
                     "reps": FLAGS.reps},
        "machine": {"backend": jax.default_backend(), "device": str(jax.devices()[0]),
                    "cpu": platform.machine(), "cores": os.cpu_count(), "jax": jax.__version__,
                    "loadavg": os.getloadavg()},
        "cases": rows,
    }
    with open(os.path.join(FLAGS.workdir, "bench_lm.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(f"\ntrain step, batch {FLAGS.batch_size} x {FLAGS.seq_len} on {jax.devices()[0]}:")
    for r in rows:
        mfu = f"  MFU {r['mfu']:.1%}" if "mfu" in r else ""
        print(f"  {r['preset']:6s} {r['mixer']:15s} {r['tokens_per_s']:10,.0f} tok/s   "
              f"{r['model_tflops_per_s'] * 1e3:8.1f} GFLOP/s{mfu}   "
              f"({r['active_params'] / 1e6:.1f}M active params)")


if __name__ == "__main__":
    app.run(main)
