#!/usr/bin/env bash
# The GPU check, one command (under 8 minutes on one H100/H200): the CUDA tests, then the bench's
# fused-group rows (f: 17 x digits MLP, cnn:small, CIFAR ResNet-20/56 at 32 px, and 4 x tv:resnet18
# at 224 px) and the 224 px rows of docs/PERFORMANCE.md (a-d), JSON + profiler tables in one folder.
#   bash scripts/gpu-check.sh [OUT_DIR]        (default: gpu-check/; needs `pip install -e .` or
#                                               PYTHONPATH=. and a CUDA build of torch)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-check}
mkdir -p "$out"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 EFFDSTL_OFFLINE=1
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "gpu-check: no CUDA GPU visible")' || exit 2
"$PY" - <<'PY' | tee "$out/device.txt"
import torch, platform
print(torch.cuda.get_device_name(0), "| torch", torch.__version__, "| python", platform.python_version())
PY
rc=0
"$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_fused.py 2>&1 | tee "$out/pytest.log" || rc=1
"$PY" -m effdstl_cli.cli bench --device cuda --only f \
    --fuse-models mlp:32@8x1,cnn:small@32,resnet20@32,resnet56@32 --json "$out/bench-fused.json" 2>&1 | tee "$out/bench-fused.log" || rc=1
"$PY" -m effdstl_cli.cli bench --device cuda --only f --fuse-k 4 --fuse-models tv:resnet18@224 \
    --json "$out/bench-fused-224.json" 2>&1 | tee "$out/bench-fused-224.log" || rc=1
"$PY" -m effdstl_cli.cli bench --device cuda --only a,b,c,d --profile "$out/profile" \
    --json "$out/bench-cuda.json" 2>&1 | tee "$out/bench-cuda.log" || rc=1
echo "gpu-check: results in $out/ (exit $rc)"
exit $rc
