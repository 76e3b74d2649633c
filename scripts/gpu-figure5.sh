#!/usr/bin/env bash
# Fig. 5 on the paper's CIFAR-10 setting in one GPU call (target: under 9 minutes on one H200,
# the teachers included): studies/figure5-cifar10-gpu.yaml — all 50,000 training images, a weak and
# a strong CIFAR ResNet teacher trained here, 17 CIFAR ResNet-20 students per seed as one fused
# model, 2 seeds, crop + flip — then the results table with seed-paired 95 % intervals, the figure,
# the teacher-cache counters and the bench's projection for the paper's 240-epoch triplet.
#
#   bash scripts/gpu-figure5.sh [DATASET] [OUT_DIR]
#     DATASET  cifar10 (default: torchvision's CIFAR-10 under data/cifar10, downloaded when online)
#              or npz:PATH (uint8 x_train (N,32,32,3), y_train, x_test, y_test: the full 50k/10k)
#     OUT_DIR  default gpu-figure5/ (results/, figures, tables, logs, timings.txt)
#   Environment: PYTHON (default python3; needs `pip install -e .` or PYTHONPATH=. and a CUDA torch),
#   DEVICE (default cuda; `DEVICE=cpu SET="train_per_class=20 ..."` is a smoke run of the same path),
#   SET (extra space-separated study overrides, e.g. "schedule.epochs=3 seeds=[0,1,2]"),
#   BENCH=0 skips the projection.
#
# Only what this names is needed: the checkout, torch with CUDA, and the dataset.
set -uo pipefail
cd "$(dirname "$0")/.."
data=${1:-cifar10}
out=${2:-gpu-figure5}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 EFFDSTL_OFFLINE=${EFFDSTL_OFFLINE:-1}
# The teachers are frozen once trained: their logits per (image, crop/flip variant) are kept in one
# folder so that every student group of every seed reuses what an earlier one computed.
export EFFDSTL_TEACHER_CACHE="$out/teacher-cache"
study=studies/figure5-cifar10-gpu.yaml
sets=(--set "dataset=$data")
[[ $data == npz:* || $data == folder:* ]] && sets+=(--set data_root=null)
for s in ${SET:-}; do sets+=(--set "$s"); done
cli() { "$PY" -m effdstl_cli.cli "$@"; }

if [[ $DEVICE == cuda* ]]; then
  "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "gpu-figure5: no CUDA GPU visible")' || exit 2
fi
"$PY" - "$DEVICE" <<'PY' | tee "$out/device.txt"
import platform, sys, torch
d = sys.argv[1]
name = torch.cuda.get_device_name(0) if d.startswith("cuda") else platform.processor() or "cpu"
print(name, "| torch", torch.__version__, "| python", platform.python_version())
PY

rc=0
t0=$(date +%s)
cli sweep replacement --study "$study" --results "$out/results" "${sets[@]}" \
    --device "$DEVICE" --fuse on 2>&1 | tee "$out/sweep.log" || rc=1
t1=$(date +%s)
echo "sweep (2 teachers, 17 students x seeds): $((t1 - t0)) s" | tee "$out/timings.txt"
if (( rc == 0 )); then
  cli results figure5-cifar10-gpu --results "$out/results" 2>&1 | tee "$out/results.txt" || rc=1
  cli plot figure5 figure5-cifar10-gpu --results "$out/results" 2>&1 | tee -a "$out/results.txt" || rc=1
  cp "$out/results/figure5-cifar10-gpu/figures/figure5.png" "$out/" 2>/dev/null || true
  cp "$out/results/figure5-cifar10-gpu/tables/results.csv" "$out/" 2>/dev/null || true
  cp "$out/results/figure5-cifar10-gpu/tables/effects.csv" "$out/" 2>/dev/null || true
  # per run: wall time, final accuracy and the teacher-cache counters the engine recorded
  "$PY" - "$out/results/figure5-cifar10-gpu" <<'PY' | tee -a "$out/timings.txt"
import json, sys
from pathlib import Path
runs = sorted(Path(sys.argv[1], "runs").glob("*/final.json"))
tot = 0.0
for f in runs:
    r = json.loads(f.read_text())
    tot += float(r.get("wall_s") or 0)
    extra = {k: r[k] for k in ("teacher_cache",) if k in r}
    print(f"{f.parent.name}  {r.get('label', ''):<28} last_top1 {r.get('last_top1')}  wall_s {r.get('wall_s')}  {extra or ''}")
print(f"{len(runs)} runs, summed wall_s {tot:.0f} s (fused members share one wall clock each)")
PY
fi
if [[ ${BENCH:-1} != 0 && $DEVICE == cuda* ]]; then
  cli bench --device cuda --only f --fuse-models resnet20@32 --json "$out/bench-projection.json" 2>&1 \
      | tee "$out/bench-projection.log" || rc=1
fi
echo "gpu-figure5: total $(( $(date +%s) - t0 )) s; results in $out/ (exit $rc)" | tee -a "$out/timings.txt"
exit $rc
