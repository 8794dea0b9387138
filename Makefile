# Every target creates .venv on its own: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,hf]'
	touch $(STAMP)

# The main job: the `demo` LM (Q-Delta mixer + STAR-routed MoE) on the stdlib corpus, ~5 min
# on a 2-core CPU. Rerunning resumes from runs/demo (and stops at once if it already finished).
demo: $(STAMP)
	$(PY) -m experiments.train_lm --workdir=runs/demo --preset=demo --steps=200 \
	    --warmup_steps=20 --batch_size=16 --seq_len=256 --log_every=10 --eval_every=100 \
	    --ckpt_every=50 --sample_tokens=200

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=15 --nbmake tests notebooks

test-slow: $(STAMP)
	$(PY) -m pytest -q -n 2 -m slow

lint: $(STAMP)
	$(PY) -m ruff check moejax experiments tests

bench: $(STAMP)
	$(PY) -m experiments.bench_delta_rule --workdir=runs/bench
	$(PY) -m experiments.bench_moe --workdir=runs/bench

clean:
	rm -rf $(VENV) runs
