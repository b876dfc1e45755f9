#!/usr/bin/env bash
# GPU efficiency on one lent GPU, in one call of about 6 minutes: the three measurements that
# BENCHMARKS.md's "GPU efficiency" section reports.
#
#   1. the fused LM-head JSD loss side by side with Liger-Kernel's LigerFusedLinearJSDLoss at
#      Liger's own shape (N=8192, V=128256, hidden 4096/2048, bf16): benchmarks/liger_jsd_loss.py
#   2. a distillation step, 1.24B teacher / 0.49B student, V=128256, seq 1024, bf16: tokens/s and
#      MFU of distill train, TRL's GKDTrainer with use_liger_kernel=True and the bare loop on
#      distill's loss (the floor): benchmarks/train_throughput.py --arch 1b
#   3. distill plan against torch.cuda.max_memory_allocated (the one-process cases):
#      benchmarks/plan_memory.py
#
# The GPU image has torch, transformers, accelerate, triton but not datasets, trl or liger-kernel;
# they travel as wheels. Here, once (PyPI is reachable from this machine, not from the GPU's):
#     bash benchmarks/gpu_efficiency.sh --fetch-wheels          # into .whl/ (git-ignored)
# There (the device tool's run, carry [".whl"], timeout_s 580):
#     bash benchmarks/gpu_efficiency.sh                 # all three, results under $OUT (up to ~9.5 min)
#     bash benchmarks/gpu_efficiency.sh loss,plan       # or in two calls: loss,plan (~5 min), then step
# (a first call that finds the image's packages wrong then costs half the time).
# A CPU rehearsal of the same script at small shapes (what can be checked without a GPU):
#     PYTHON=.venv/bin/python GPU_EFFICIENCY_DRY=1 OUT=/tmp/gpu-efficiency bash benchmarks/gpu_efficiency.sh
set -uo pipefail
cd "$(dirname "$0")/.."
# The versions the CPU tests run with (transformers 5.25 needs huggingface-hub 2, which needs httpx2): 25 MB,
# beside the 33 MB working tree, under the device tool's 64 MiB.
WHEELS=(trl==1.16.0 liger-kernel==0.8.5 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0
        transformers==5.25.0 accelerate==1.16.0 huggingface-hub==2.5.0 kernels==0.19.1 tomlkit==0.15.3
        httpx2==2.17.0 httpcore2==2.17.0 truststore==0.10.5 hf-xet==1.8.0 click==8.5.1 anyio==4.16.0 idna==3.21)
if [ "${1:-}" = "--fetch-wheels" ]; then
  mkdir -p .whl
  for w in "${WHEELS[@]}"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "$w" || exit 1
  done
  ls -la .whl
  exit 0
fi

PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_efficiency}
PARTS=${1:-all}  # all, or some of: loss step plan (comma-separated), e.g. a first call "loss,plan"
[ "$PARTS" = all ] && PARTS=loss,step,plan
mkdir -p "$OUT"
if [ -d .whl ] && [ -z "${GPU_EFFICIENCY_DRY:-}" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ -n "${GPU_EFFICIENCY_DRY:-}" ]; then  # small shapes on the CPU: every command runs, no number means anything
  DEV=cpu; LOSS=(--n 512 --vocab 4096 --hidden 256 --dtype fp32 --warmup 1 --repeats 1)
  STEP=(--arch small --seq-len 128 --batch-size 2 --examples 16 --precisions fp32 --steps 4 --warmup 2)
  PLAN=(--cases "params-heavy, b=2"); TIMEOUTS=(400 400 400)  # the CPU's plan run goes through the profiler
else  # each part ends well inside the device tool's 600 s per call; all three together take up to ~550 s
  DEV=cuda; LOSS=(--hidden 4096 --dtype bf16 --warmup 2 --repeats 5)
  STEP=(--arch 1b --seq-len 1024 --batch-size 8 --examples 128 --precisions bf16 --steps 10 --warmup 4)
  PLAN=(--cases "activations-heavy, b=16" "b=16, gradient checkpointing"); TIMEOUTS=(200 260 90)
fi
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1
  "$PY" -c "import torch, transformers, accelerate, datasets; print('torch', torch.__version__, 'cuda',
torch.version.cuda, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__,
'datasets', datasets.__version__)"
  "$PY" -c "import trl; print('trl', trl.__version__)"
  "$PY" -c "from importlib.metadata import version; import liger_kernel; print('liger-kernel', version('liger-kernel'))"
} 2>&1 | tee "$OUT/versions.txt"

status=0
if [[ ,$PARTS, == *,loss,* ]]; then
  echo "== 1. the loss beside Liger-Kernel's"
  timeout "${TIMEOUTS[0]}" "$PY" benchmarks/liger_jsd_loss.py --device "$DEV" "${LOSS[@]}" \
    --only dense distill-256 distill-256-compiled distill-1024-compiled liger liger-eager \
    --json "$OUT/loss.json" 2>&1 | tee "$OUT/loss.log" || status=1
fi
if [[ ,$PARTS, == *,step,* ]]; then
  echo "== 2. a distillation step"
  timeout "${TIMEOUTS[1]}" "$PY" benchmarks/train_throughput.py --device "$DEV" "${STEP[@]}" \
    --only distill-chunked distill-compiled trl-liger bare-chunked --repeats 1 --retries 0 --max-wait 0 \
    --workdir /tmp/gpu-efficiency-step --json "$OUT/step.json" 2>&1 | tee "$OUT/step.log" || status=1
fi
if [[ ,$PARTS, == *,plan,* ]]; then
  echo "== 3. the plan against the measured peak"
  timeout "${TIMEOUTS[2]}" "$PY" benchmarks/plan_memory.py --out /tmp/gpu-efficiency-plan --cases "${PLAN[@]}" 2>&1 \
    | tee "$OUT/plan.log" || status=1
  cp /tmp/gpu-efficiency-plan/plan_memory.json "$OUT/" 2>/dev/null
fi
exit $status
