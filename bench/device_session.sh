#!/usr/bin/env bash
# One GPU session's measurements in one command (a lent device gives about 10 minutes a command, 15 in all).
# Each part has its own time limit, and the limits add up to 565 s, under the 600 s of one command, so that every
# part comes back; results land in $OUT (or bench/results when OUT is unset), then go to bench/results and the
# README by hand.
#
# Before the call, here (the fused-loss wheels: the device reaches no index; Triton and torch are there):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl liger-kernel cut-cross-entropy
# Then: run(command="bash bench/device_session.sh", carry=[".whl"], timeout_s=600)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device_session.log"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$OUT/device_session.log"
part() {  # part SECONDS COMMAND...: run it with a limit, its output appended to the log
    local limit=$1; shift
    echo "== $* (limit ${limit}s)" | tee -a "$OUT/device_session.log"
    timeout "$limit" "$@" 2>&1 | tail -n 40 | tee -a "$OUT/device_session.log"
}
# 0. the CUDA-only tests: the head kernels (chunked's 16-bit weight-gradient GEMM, Liger, CCE) against HF's precision
part 60 python3 -m pytest -q -p no:cacheprovider tests/test_head.py -k cuda
# 1. the LM head alone by kernel (chooses head=...'s default on CUDA): HF, chunked, Liger, CCE at vocab 50k and 152k
part 80 python3 bench/heads.py --device cuda --out "$OUT"
# 2. the whole step at OLMoE-1B-7B size: the largest batch, revcompile and HF checkpointing + the same loss
#    (Liger's kernel where its wheel came along, else the chunked PyTorch one), also with the layer inputs it keeps
#    offloaded to host memory (transformers' offload=True: the baseline a user short of GPU memory would pick)
HEAD=$(python3 -c "import liger_kernel" 2>/dev/null && echo liger || echo chunked)
part 235 python3 bench/gpu.py --out "$OUT" --budget-s 210 --methods checkpointing-chunked \
    checkpointing-offload-chunked revcompile --batches 80 120 160 200 --head "$HEAD" --suffix "_$HEAD"
# 3. step time, eager and compiled, against HF checkpointing (issue 15), with the step split by phase
part 165 python3 bench/speed.py --device cuda --dtype bfloat16 --profile --breakdown --rounds 5 --out "$OUT" \
    --methods plain compiled checkpointing checkpointing-compiled revcompile revcompile-compiled revcompile-backend \
    revcompile-record-all
# 4. the exact-stream step and undo, eager against compile=True's fused functions: kernels and time
part 25 python3 bench/exact.py --kernels --device cuda --out "$OUT"
