# Every target creates .venv on its own: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The deviceless GPU compile check has its own venv: the CUDA plugin pinned to its jaxlib.
GPU_VENV := .venv-gpu-compile
GPU_PY := $(GPU_VENV)/bin/python
GPU_STAMP := $(GPU_VENV)/.installed
# The deviceless TPU compile check: jax with the libtpu its release pins.
TPU_VENV := .venv-tpu-compile
TPU_PY := $(TPU_VENV)/bin/python
TPU_STAMP := $(TPU_VENV)/.installed

.PHONY: demo test test-slow gpu-compile tpu-compile lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,hf]'
	touch $(STAMP)

$(GPU_STAMP): pyproject.toml
	$(PYTHON) -m venv $(GPU_VENV)
	$(GPU_PY) -m pip install --quiet --upgrade pip
	$(GPU_PY) -m pip install --quiet -e '.[gpu-compile]'
	touch $(GPU_STAMP)

$(TPU_STAMP): pyproject.toml
	$(PYTHON) -m venv $(TPU_VENV)
	$(TPU_PY) -m pip install --quiet --upgrade pip
	$(TPU_PY) -m pip install --quiet -e '.[tpu-compile]'
	touch $(TPU_STAMP)

# The main job: the `demo` LM (Q-Delta mixer + STAR-routed MoE) on the stdlib corpus, ~5 min
# on a 2-core CPU. Rerunning resumes from runs/demo (and stops at once if it already finished).
demo: $(STAMP)
	$(PY) -m experiments.train_lm --workdir=runs/demo --preset=demo --steps=200 \
	    --warmup_steps=20 --batch_size=16 --seq_len=256 --log_every=10 --eval_every=100 \
	    --ckpt_every=50 --sample_tokens=200

# The suite, then the CI subset of the deviceless sm_90a compile (forward kernels, one shape).
test: $(STAMP) $(GPU_STAMP)
	$(PY) -m pytest -q -n 2 --durations=15 --nbmake tests notebooks
	$(GPU_PY) -m pytest -q -p no:xdist -m gpu_compile tests/gpu_compile

# Every Pallas GPU kernel, forward and gradient, bf16 and fp32, every GPU preset's head dims and
# the gmm shapes, compiled for sm_90a without a GPU (the per-kernel table of BENCHMARKS.md:
# `$(GPU_PY) -m experiments.gpu_compile --full`).
gpu-compile: $(GPU_STAMP)
	MOEJAX_GPU_COMPILE_FULL=1 $(GPU_PY) -m pytest -q -p no:xdist -m gpu_compile tests/gpu_compile

# The Pallas TPU delta-rule kernels (every mode, gk, packed sequences; forward and gradient)
# compiled by libtpu for compile-only v5e and v6e chips, scoped VMEM checked (about 20 min on 2
# cores; MOEJAX_TPU_COMPILE_FULL=1 for fp32, the largest head dims and all five generations).
tpu-compile: $(TPU_STAMP)
	JAX_PLATFORMS=cpu $(TPU_PY) -m pytest -q -p no:xdist -m tpu_compile tests/tpu_compile

test-slow: $(STAMP)
	$(PY) -m pytest -q -n 2 -m slow

lint: $(STAMP)
	$(PY) -m ruff check moejax experiments tests

bench: $(STAMP)
	$(PY) -m experiments.bench_delta_rule --workdir=runs/bench
	$(PY) -m experiments.bench_moe --workdir=runs/bench

clean:
	rm -rf $(VENV) $(GPU_VENV) $(TPU_VENV) runs
