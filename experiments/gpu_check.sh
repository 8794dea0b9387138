#!/usr/bin/env bash
# The first-GPU check: one script, about 8 minutes on an H100/H200, every result as a file in $OUT.
#
#   1. installs this checkout into the machine's own jax (`pip install --no-deps -e .`), plus the
#      wheels carried in .whl/ (the machine reaches no network: grain, fla-core, tensorboardX);
#   2. the real Pallas kernels against the jnp reference (delta rule: every mode, fp32 and bf16,
#      values and gradients, ragged T and head dims; gmm/tgmm: uneven and empty groups);
#   3. bench_delta_rule --accelerator: Pallas vs the jnp chunk path, vs cuDNN causal attention
#      (crossover T), vs flash-linear-attention's Triton chunk kernels, at B4 H8 T8192 Dk128 Dv256;
#   4. bench_gmm: Pallas gmm/tgmm (a block-size sweep) vs jax.lax.ragged_dot;
#   5. bench_lm: train-step tokens/s and MFU of the 340m preset.
#
# Carry the missing wheels once, from the checkout (Python 3.12 x86-64 wheels for the machine):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
#       -d .whl grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 fla-core==0.6.0 \
#       tensorboardX==2.6.5          # 5.4 MB; the rest grain and fla need is on the machine
# then run it with the device tool: `bash experiments/gpu_check.sh` with carry [".whl"].
# Outside that tool OUT defaults to runs/gpu_check. At most 8 files come back: keep it so.
set -uo pipefail
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_PREALLOCATE=false
LOG="$OUT/gpu_check.log"
step() { echo "=== $* ($(date +%T))" | tee -a "$LOG"; }

step "install"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl >> "$LOG" 2>&1 || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >> "$LOG" 2>&1 || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$LOG"
python3 -c "import jax; print(jax.__version__, jax.devices()); assert jax.default_backend() == 'gpu'" \
    2>&1 | tee -a "$LOG" || exit 1
PEAK=$(python3 -c "import jax; k = jax.devices()[0].device_kind; print(989.4 if 'H100' in k or 'H200' in k else 0)")

status=0
step "real kernels vs reference (pytest)"
timeout 200 python3 -m pytest -q -p no:xdist -x tests/kernels/delta_rule/test_pallas_gpu.py \
    tests/kernels/gmm/test_pallas.py tests/kernels/gmm/test_gmm.py 2>&1 | tail -n 25 | tee -a "$LOG"
status=$((status | ${PIPESTATUS[0]}))

step "bench_delta_rule --accelerator"
timeout 150 python3 -m experiments.bench_delta_rule --accelerator --workdir="$OUT" \
    --peak_tflops="$PEAK" --reps=5 2>&1 | tail -n 60 >> "$LOG"
status=$((status | ${PIPESTATUS[0]}))

step "bench_gmm"
timeout 60 python3 -m experiments.bench_gmm --workdir="$OUT" 2>&1 | tail -n 10 | tee -a "$LOG"
status=$((status | ${PIPESTATUS[0]}))

step "bench_lm 340m"
timeout 110 python3 -m experiments.bench_lm --workdir="$OUT" --presets=340m \
    --mixers=gated_deltanet,gated_qdelta --batch_size=8 --seq_len=2048 --reps=3 \
    --peak_tflops="$PEAK" 2>&1 | tail -n 6 | tee -a "$LOG"
status=$((status | ${PIPESTATUS[0]}))

step "done, status $status"
ls -l "$OUT" | tee -a "$LOG"
exit $status
