#!/usr/bin/env bash
# Run THERE, on the device machine, from the repository root, with .gpu_carry carried (made by
# benchmarks/gpu/prepare.sh): the gpu-marked tests, then the throughput benchmark. About 6
# minutes; logs and the benchmark's JSON lines go to $OUT (or /tmp/gpu-check).
set -uo pipefail
out="${OUT:-/tmp/gpu-check}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu_carry/whl/*.whl || exit 1
export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
# Only the modules with gpu-marked tests: some others import packages this image lacks.
python3 -m pytest -p no:cacheprovider -m gpu tests/test_module.py tests/test_features.py 2>&1 |
    tee "$out/pytest_gpu.log"
python3 benchmarks/throughput.py --data-root .gpu_carry/data 2>&1 | tee "$out/throughput.log"
grep '^{' "$out/throughput.log" > "$out/throughput.jsonl"
