#!/usr/bin/env bash
# `make test`: the whole test suite, with a real local Slurm cluster when this machine allows one.
#   - as root on Debian/Ubuntu: starts scripts/local-slurm.sh (tests marked `slurm` skip
#     themselves when no cluster is reachable, so a failed start is only a warning);
#   - runs `.venv/bin/python -m pytest -q "$@"` (all tests, the `slurm` ones included);
#   - stops Slurm again only if this script started it;
#   - exits with pytest's code; "no tests collected" (5) is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
SLURM=scripts/local-slurm.sh
started=0

cleanup() {
  if (( started )); then
    bash "$SLURM" stop >/dev/null || echo "run-tests: WARNING: '$SLURM stop' failed" >&2
  fi
}
trap cleanup EXIT
trap 'exit 130' INT; trap 'exit 143' TERM   # the EXIT trap still stops Slurm

if [[ $(id -u) == 0 && -f /etc/debian_version ]]; then
  if bash "$SLURM" status >/dev/null 2>&1; then
    echo "run-tests: Slurm already running; using it (and leaving it running)"
  elif bash "$SLURM" start; then
    started=1
  else
    started=1   # stop whatever half-started
    echo "run-tests: WARNING: local Slurm did not start; tests marked 'slurm' will be skipped" >&2
  fi
else
  echo "run-tests: not root on Debian; no local Slurm (tests marked 'slurm' will be skipped)"
fi

rc=0
"$PY" -m pytest -q "$@" || rc=$?
if (( rc == 5 )); then
  echo "run-tests: ERROR: pytest collected no tests (exit 5); treating as failure" >&2
fi
exit "$rc"
