r"""Training throughput of a converted Hugging Face model: moejax vs transformers, one run.

Builds a tiny random model of --arch (Qwen3-Next by default; also Qwen3.5-MoE, DeepSeek-V3 and
Kimi Linear) with transformers (seeded), saves it to `WORKDIR/hf_model`,
converts it with `moejax.interop.hf.load_hf`, and times one forward+backward step of the same
batch on both sides:

  * moejax: `jax.jit(jax.value_and_grad(lm.loss_fn, has_aux=True))` (gradients w.r.t. all
    params); the first call (compile + run) is reported separately as `compile_seconds`.
  * transformers: `model(input_ids, labels=input_ids).loss.backward()` in train mode, with the
    attention implementation of --attn_impl ("sdpa" by default) and torch's default intra-op
    thread count (reported). Without `flash-linear-attention` / `causal-conv1d` installed (the
    case on CPU) transformers runs its reference PyTorch gated delta rule and causal conv;
    that is what "transformers on this machine" means here, and the JSON records whether the
    fast kernels were importable. The first call is reported separately as `first_call_seconds`.

Both sides get one warm-up step, then take turns (moejax, torch, moejax, torch, ...) for --reps
steps each so that drifting load on a shared machine hits them alike; the median wall time
(and median process CPU time, all threads) per step is reported, with tokens/s =
batch_size · seq_len / median step time and the ratio moejax / transformers.

Same computation: the HF loss is the mean next-token cross-entropy over the first T-1
positions (transformers shifts the labels); moejax gets the same targets with the last position
masked out. `router_aux_loss_coef` is set to 0 (transformers adds no router loss unless
`output_router_logits`, and the two load-balancing formulas differ), so both losses are pure
cross-entropy. The run fails unless the losses agree to a relative difference of 1e-3 and the
gradients of the embedding and LM head agree to a relative RMSE of 1e-2.

Model: --num_layers layers, every 4th a full-attention layer and the others linear attention
(the 3:1 pattern of Qwen3-Next, Qwen3.5-MoE and Kimi Linear; with fewer than 4 layers the last
is attention so that both mixers are timed; DeepSeek-V3 is MLA everywhere, its first layer
dense), a MoE with --num_experts experts (top --top_k) plus a shared expert on every other
layer; head widths follow --d_model (4 heads of d_model/4, 2 KV heads / 2 key heads; MLA latent
rank d_model/4). Writes `WORKDIR/bench_hf.json`.

  python -m experiments.bench_hf --workdir=runs/bench_hf
  python -m experiments.bench_hf --workdir=runs/bench_hf_kimi --arch=kimi_linear
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import platform
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags

from moejax.interop.hf import load_hf
from moejax.models import lm

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/bench_hf", "Output folder (hf_model/ and the JSON).")
flags.DEFINE_integer("batch_size", 2, "Sequences per step.")
flags.DEFINE_integer("seq_len", 256, "Tokens per sequence.")
flags.DEFINE_integer("reps", 5, "Timed steps per side (median reported).")
flags.DEFINE_integer("d_model", 128, "hidden_size.")
flags.DEFINE_integer("num_layers", 4, "num_hidden_layers (every 4th is full attention).")
flags.DEFINE_integer("num_experts", 8, "Routed experts per MoE layer.")
flags.DEFINE_integer("top_k", 2, "Experts per token.")
flags.DEFINE_integer("vocab_size", 1024, "Vocabulary size.")
flags.DEFINE_integer("seed", 0, "Seed of the HF model's init (torch) and of the batch.")
flags.DEFINE_enum("device", "default", ["default", "cpu"],
                  "default: jax's default backend and cuda for torch if available; cpu: both "
                  "on the CPU.")
flags.DEFINE_enum("attn_impl", "sdpa", ["sdpa", "eager"],
                  "transformers attention implementation of the full-attention layers.")
ARCHS = ("qwen3_next", "qwen3_5_moe_text", "deepseek_v3", "kimi_linear")
flags.DEFINE_enum("arch", "qwen3_next", list(ARCHS), "The architecture benchmarked.")

LOSS_RTOL = 1e-3  # relative difference of the two losses
GRAD_RATIO = 1e-2  # relative RMSE of the embedding / LM-head gradients


def hf_config_kwargs() -> dict:
    """The transformers config arguments of the benchmarked model (module docstring)."""
    d, n = FLAGS.d_model, FLAGS.num_layers
    if d % 4:
        raise ValueError(f"--d_model must be a multiple of 4, got {d}")
    if n < 1:
        raise ValueError(f"--num_layers must be >= 1, got {n}")
    types = ["full_attention" if (i + 1) % 4 == 0 or (n < 4 and i == n - 1)
             else "linear_attention" for i in range(n)]
    common = dict(vocab_size=FLAGS.vocab_size, hidden_size=d, intermediate_size=2 * d,
                  moe_intermediate_size=d // 2, num_hidden_layers=n, num_attention_heads=4,
                  num_experts_per_tok=FLAGS.top_k, max_position_embeddings=max(FLAGS.seq_len, 64),
                  tie_word_embeddings=False)
    mla = dict(num_key_value_heads=4, kv_lora_rank=d // 4, q_lora_rank=None,
               qk_nope_head_dim=d // 4, qk_rope_head_dim=d // 8, v_head_dim=d // 4,
               routed_scaling_factor=2.5, n_group=1, topk_group=1)
    if FLAGS.arch == "deepseek_v3":
        return dict(common, **mla, n_routed_experts=FLAGS.num_experts, n_shared_experts=1,
                    first_k_dense_replace=1)
    if FLAGS.arch == "kimi_linear":  # no pad id: transformers would freeze that embedding row
        return dict(common, **mla, num_experts=FLAGS.num_experts, num_shared_experts=1,
                    pad_token_id=None, bos_token_id=1, eos_token_id=2, first_k_dense_replace=0,
                    linear_attn_config={
                        "head_dim": d // 4, "num_heads": 4, "short_conv_kernel_size": 4,
                        "kda_layers": [i + 1 for i, t in enumerate(types)
                                       if t == "linear_attention"],
                        "full_attn_layers": [i + 1 for i, t in enumerate(types)
                                             if t == "full_attention"]})
    return dict(
        common, shared_expert_intermediate_size=d // 2, layer_types=types,
        num_key_value_heads=2, head_dim=d // 4, linear_num_key_heads=2,
        linear_num_value_heads=4, linear_key_head_dim=d // 4, linear_value_head_dim=d // 4,
        num_experts=FLAGS.num_experts, router_aux_loss_coef=0.0, output_router_logits=False)


def _config_class():
    import transformers

    if FLAGS.arch == "qwen3_5_moe_text":
        from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import (
            Qwen3_5MoeTextConfig,
        )
        return Qwen3_5MoeTextConfig
    return {"qwen3_next": transformers.Qwen3NextConfig,
            "deepseek_v3": transformers.DeepseekV3Config,
            "kimi_linear": transformers.KimiLinearConfig}[FLAGS.arch]


def build_hf_model(hf_dir: Path, torch_device: str):
    """Seeded random --arch model, saved to `hf_dir` (float32), returned in train mode."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(FLAGS.seed)
    config = _config_class()(**hf_config_kwargs())
    config._attn_implementation = FLAGS.attn_impl
    model = AutoModelForCausalLM.from_config(config).float()
    if hf_dir.exists():  # a previous run's model: replace it (the seed makes it the same)
        for f in hf_dir.iterdir():
            f.unlink()
    model.save_pretrained(str(hf_dir))
    return model.to(torch_device).train()


def make_batch() -> tuple[np.ndarray, dict]:
    """HF `input_ids` (= labels) and the moejax batch of the same loss."""
    rng = np.random.default_rng(FLAGS.seed)
    ids = rng.integers(0, FLAGS.vocab_size, (FLAGS.batch_size, FLAGS.seq_len), np.int32)
    targets = np.concatenate([ids[:, 1:], ids[:, :1]], axis=1)  # last column masked out
    mask = np.ones(ids.shape, np.float32)
    mask[:, -1] = 0.0
    return ids, {"inputs": ids, "targets": targets, "loss_mask": mask}


def _rel_rmse(ref, got) -> float:
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    return float(np.sqrt(np.mean((ref - got) ** 2)) / np.sqrt(np.mean(ref**2)))


def main(argv):
    del argv
    import torch
    import transformers

    workdir = Path(FLAGS.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    jax_device = jax.devices("cpu")[0] if FLAGS.device == "cpu" else jax.devices()[0]
    torch_device = "cuda" if FLAGS.device == "default" and torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if torch_device == "cuda" else (lambda: None)
    load_before = os.getloadavg()

    with jax.default_device(jax_device):
        model = build_hf_model(workdir / "hf_model", torch_device)
        t0 = time.perf_counter()
        cfg, params, state, _ = load_hf(workdir / "hf_model")
        convert_s = time.perf_counter() - t0
        params = jax.device_put(params, jax_device)
        ids, batch = make_batch()
        batch = jax.device_put(batch, jax_device)
        step = jax.jit(jax.value_and_grad(functools.partial(lm.loss_fn, cfg=cfg, train=True),
                                          has_aux=True))
        ids_t = torch.from_numpy(ids.astype(np.int64)).to(torch_device)

        def run_jax():
            out = step(params, state, batch)
            jax.block_until_ready(out)
            return out

        def run_torch():
            model.zero_grad(set_to_none=True)
            loss = model(ids_t, labels=ids_t).loss
            loss.backward()
            sync()
            return loss

        # Warm-up: the first call of each (compile / first-call overheads), reported apart.
        t0 = time.perf_counter()
        (jax_loss, _), grads = run_jax()
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        torch_loss = run_torch()
        first_call_s = time.perf_counter() - t0

        # Same computation: losses and a pair of gradients.
        jl, tl = float(jax_loss), float(torch_loss.detach())
        loss_rel = abs(jl - tl) / abs(tl)
        grad_rel = {
            "embed": _rel_rmse(model.model.embed_tokens.weight.grad.cpu().numpy(),
                               np.asarray(grads["embed"])),
            "unembed": _rel_rmse(model.lm_head.weight.grad.cpu().numpy().T,
                                 np.asarray(grads["unembed"])),
        }
        print(f"loss: moejax {jl:.6f}  transformers {tl:.6f}  rel diff {loss_rel:.2e}  "
              f"(grad rel RMSE: embed {grad_rel['embed']:.2e}, lm_head "
              f"{grad_rel['unembed']:.2e})")
        if not loss_rel <= LOSS_RTOL:
            raise SystemExit(f"FAIL: losses disagree (rel diff {loss_rel:.2e} > {LOSS_RTOL:.0e})"
                             ": the two sides do not compute the same model")
        bad = {k: v for k, v in grad_rel.items() if not v <= GRAD_RATIO}
        if bad:
            raise SystemExit(f"FAIL: gradients disagree (relative RMSE {bad} > {GRAD_RATIO:.0e})")

        run_jax(), run_torch()  # one more untimed step each, then take turns
        wall = {"moejax": [], "transformers": []}
        cpu = {"moejax": [], "transformers": []}
        for _ in range(FLAGS.reps):
            for name, fn in (("moejax", run_jax), ("transformers", run_torch)):
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)

    tokens = FLAGS.batch_size * FLAGS.seq_len
    sides = {}
    for name in wall:
        sec = float(np.median(wall[name]))
        sides[name] = {"step_seconds": sec, "step_seconds_min": float(np.min(wall[name])),
                       "cpu_seconds": float(np.median(cpu[name])), "tokens_per_s": tokens / sec,
                       "all_step_seconds": wall[name]}
    sides["moejax"].update(compile_seconds=compile_s, convert_seconds=convert_s,
                           device=str(jax_device), backend=jax_device.platform)
    sides["transformers"].update(
        first_call_seconds=first_call_s, device=torch_device,
        torch_num_threads=torch.get_num_threads(),
        attn_implementation=model.config._attn_implementation,
        fla_installed=importlib.util.find_spec("fla") is not None,
        causal_conv1d_installed=importlib.util.find_spec("causal_conv1d") is not None)
    ratio = sides["moejax"]["tokens_per_s"] / sides["transformers"]["tokens_per_s"]
    cpu_ratio = sides["transformers"]["cpu_seconds"] / sides["moejax"]["cpu_seconds"]
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    report = {
        "settings": {"arch": FLAGS.arch, "batch_size": FLAGS.batch_size,
                     "seq_len": FLAGS.seq_len,
                     "reps": FLAGS.reps, "seed": FLAGS.seed, "device_flag": FLAGS.device},
        "hf_config": hf_config_kwargs(),
        "moejax_config": {"layer_mixers": list(cfg.mixers), "chunk_size": cfg.chunk_size,
                          "delta_impl": cfg.delta_impl, "dispatcher": cfg.moe.dispatcher,
                          "dtype": cfg.dtype},
        "params": n_params,
        "loss": {"moejax": jl, "transformers": tl, "rel_diff": loss_rel,
                 "grad_rel_rmse": grad_rel},
        "moejax": sides["moejax"],
        "transformers": sides["transformers"],
        "tokens_per_s_ratio_moejax_over_transformers": ratio,
        "cpu_time_ratio_transformers_over_moejax": cpu_ratio,
        "machine": {"cpu": platform.machine(), "processor": platform.processor(),
                    "cores": os.cpu_count(), "loadavg_before": load_before,
                    "loadavg_after": os.getloadavg()},
        "versions": {"python": platform.python_version(), "jax": jax.__version__,
                     "jaxlib": _version("jaxlib"),
                     "torch": torch.__version__, "transformers": transformers.__version__,
                     "numpy": np.__version__},
    }
    with open(workdir / "bench_hf.json", "w") as f:
        json.dump(report, f, indent=2)

    print(f"\nforward+backward, batch {FLAGS.batch_size} x {FLAGS.seq_len}, {FLAGS.arch} "
          f"d={FLAGS.d_model} L={FLAGS.num_layers} ({n_params / 1e6:.2f}M params), "
          f"median of {FLAGS.reps}:")
    m, t = sides["moejax"], sides["transformers"]
    for name, side in sides.items():
        print(f"  {name:12s} {side['tokens_per_s']:10,.0f} tok/s  "
              f"{side['step_seconds'] * 1e3:8.1f} ms/step wall  "
              f"{side['cpu_seconds'] * 1e3:8.1f} ms/step process CPU")
    print(f"  moejax on {m['device']} (compile + first step {compile_s:.1f} s, not timed)")
    print(f"  transformers on {torch_device}, {t['torch_num_threads']} torch threads, "
          f"attn={t['attn_implementation']}, first step {first_call_s:.1f} s (not timed); "
          f"flash-linear-attention {'yes' if t['fla_installed'] else 'no'}, causal-conv1d "
          f"{'yes' if t['causal_conv1d_installed'] else 'no'}"
          f"{'' if t['fla_installed'] else ' (reference PyTorch gated delta rule)'}")
    print(f"  ratio moejax / transformers: {ratio:.2f}x tokens/s (wall), "
          f"{cpu_ratio:.2f}x by process CPU time")
    print(f"wrote {workdir / 'bench_hf.json'}")


def _version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    app.run(main)
