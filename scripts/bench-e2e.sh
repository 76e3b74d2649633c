#!/usr/bin/env bash
# Issue 20's CPU acceptance, measured side by side in one run on one machine (docs/PERFORMANCE.md):
#   1. the 17-student digits command (none + 16 KD settings, 40 epochs), --fuse on vs --fuse off,
#      end to end, alternating, ROUNDS times each, with the final accuracies of both;
#   2. the paper-scale dry run (figure5-cifar10.yaml) against `effdstl --help`, interleaved.
#   bash scripts/bench-e2e.sh [OUT_DIR] [ROUNDS]      (default /tmp/effdstl-bench-e2e, 2 rounds)
# Run it on a quiet machine: wall seconds are what a user feels, and other work inflates them.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/effdstl-bench-e2e}
rounds=${2:-2}
E=${EFFDSTL:-.venv/bin/effdstl}
rm -rf "$out" && mkdir -p "$out"
export EFFDSTL_OFFLINE=1

now() { date +%s.%N; }
# a teacher for the students (not timed)
"$E" train teacher -d digits -m mlp:64 --epochs 20 --results "$out" --name teacher -x debug --device cpu >/dev/null 2>>"$out/log"
T="$out/teacher"

D=(-D none)
for tau in 1 2 4 8; do for lam in 0.25 0.5 0.75 1.0; do D+=(-D "kd:tau=$tau,lam=$lam"); done; done

declare -A best
for r in $(seq 1 "$rounds"); do
  for fuse in on off; do
    rm -rf "$out/students-$fuse"
    t0=$(now)
    "$E" train student -d digits -m mlp:32 --teacher "$T" "${D[@]}" --epochs 40 -x debug --device cpu \
      --fuse "$fuse" --results "$out" --name "students-$fuse" >/dev/null 2>>"$out/log"
    t=$(echo "$(now) - $t0" | bc)
    echo "round $r  --fuse $fuse  ${t} s"
    prev=${best[$fuse]:-999999}
    if (( $(echo "$t < $prev" | bc) )); then best[$fuse]=$t; fi
  done
done
ratio=$(echo "scale=2; ${best[off]} / ${best[on]}" | bc)
echo "17-student digits command, faster of $rounds: off ${best[off]} s, on ${best[on]} s, off/on ${ratio}x"

# the final accuracies, member by member (same distiller, same seed -> same run hash in both folders)
"${PYTHON:-.venv/bin/python}" - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
acc = {f: {p.name: json.loads((p / "final.json").read_text())["last_top1"]
           for p in (out / f"students-{f}" / "runs").iterdir()} for f in ("on", "off")}
common = sorted(set(acc["on"]) & set(acc["off"]))
diff = max(abs(acc["on"][k] - acc["off"][k]) for k in common)
print(f"final top-1, {len(common)} runs in both: largest |on - off| = {diff:.2f} points")
PY

h=() ; d=()
for r in $(seq 1 5); do
  t0=$(now); "$E" --help >/dev/null; h+=("$(echo "$(now) - $t0" | bc)")
  t0=$(now); "$E" sweep replacement --study studies/figure5-cifar10.yaml --dry-run --results "$out" >/dev/null
  d+=("$(echo "$(now) - $t0" | bc)")
done
med() { printf '%s\n' "$@" | sort -g | sed -n 3p; }
echo "effdstl --help median $(med "${h[@]}") s; figure5-cifar10 --dry-run median $(med "${d[@]}") s;" \
     "ratio $(echo "scale=2; $(med "${d[@]}") / $(med "${h[@]}")" | bc)x"
