#!/usr/bin/env bash
# Everything a lent GPU must check, in one command (docs/gpu-validation.md says what each part confirms).
#
#   bash benchmarks/gpu_validate.sh            # on the GPU machine, from the repository root
#
# Results go to $OUT (the device tool's folder that comes back) or ./gpu-validation-out. Packages the GPU image
# lacks travel as wheels in .whl/ (make them here with `bash benchmarks/gpu_wheels.sh`); they are installed
# into /tmp/site first. Each part runs even when an earlier one failed, and the script ends with a summary.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-validation-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 BLIPMON_PREDICT=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
declare -A rc
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
python3 -c 'import torch, transformers; print(torch.__version__, torch.version.cuda, transformers.__version__, torch.cuda.get_device_name(0))' \
    | tee "$OUT/versions.txt"

# 1. The gpu-marked tests: NVML mapping, allocator sums, device maps, OOM sizes, bf16 check, estimator terms.
timeout 300 python3 -m pytest -m gpu tests/gpu -p no:cacheprovider -q -rA -o addopts="" --timeout=240 \
    --deselect tests/gpu/test_gpu_offload.py --junitxml="$OUT/gpu-tests.xml" 2>&1 | tail -n 300 >"$OUT/gpu-tests.log"
rc[gpu-tests]=${PIPESTATUS[0]}
# 1b. DeepSpeed offload on the GPU, on its own: its first run compiles DeepSpeed's CPU Adam (a minute or two).
#     Needs deepspeed on the machine (a source package: `pip wheel --no-deps deepspeed` here makes one to carry).
if python3 -c 'import deepspeed' 2>/dev/null; then
    timeout 400 python3 -m pytest -m gpu tests/gpu/test_gpu_offload.py -p no:cacheprovider -q -rA -o addopts="" \
        --timeout=380 2>&1 | tail -n 100 >"$OUT/gpu-offload.log"
    rc[gpu-offload]=${PIPESTATUS[0]}
else
    echo "deepspeed is not installed here: tests/gpu/test_gpu_offload.py not run" | tee "$OUT/gpu-offload.log"
    rc[gpu-offload]=not-run
fi
# 2. Probe overhead on the GPU (goal <= 1.02), a ratio measured side by side.
timeout 120 python3 benchmarks/overhead.py >"$OUT/overhead.txt" 2>&1
rc[overhead]=$?
# 3. The estimator's predicted peaks against the allocator (and its GPU terms against reserved - allocated).
timeout 200 python3 benchmarks/predicted_vs_measured.py h100/bf16-true h100/lora h100/qlora --out "$OUT/pvm-profiles" >"$OUT/predicted-vs-measured.txt" 2>&1
rc[predicted-vs-measured]=$?
echo "--- summary (exit codes; 0 = passed)"
for k in "${!rc[@]}"; do echo "$k ${rc[$k]}"; done | sort | tee "$OUT/summary.txt"
tail -n 5 "$OUT/gpu-tests.log"
