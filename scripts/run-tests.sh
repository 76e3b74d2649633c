#!/usr/bin/env bash
# `make test`: the whole test suite, with a real local Slurm cluster when this machine allows one.
#   - as root on Debian/Ubuntu: starts scripts/local-slurm.sh beside the tests (tests marked
#     `slurm` wait for that start, then skip themselves when no cluster is reachable, so a failed
#     start is only a warning);
#   - runs `.venv/bin/python -m pytest -q -n N --dist loadgroup "$@"` (all tests, the `slurm` ones
#     included) on N = $EFFDSTL_TEST_JOBS xdist workers, default one per CPU core (1: no xdist);
#     files that must stay on one worker are listed in tests/conftest.py (SERIAL_FILES);
#   - stops Slurm again only if this script started it;
#   - exits with pytest's code; "no tests collected" (5) is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
SLURM=scripts/local-slurm.sh
started=0

slurm_done=""   # set when this script starts Slurm: the file its exit status is written to

cleanup() {
  if (( started )); then
    # a start still under way is let finish first: stopping half-started daemons leaves some behind
    while [[ -n $slurm_done && ! -e $slurm_done ]]; do sleep 1; done
    bash "$SLURM" stop >/dev/null || echo "run-tests: WARNING: '$SLURM stop' failed" >&2
  fi
  if [[ -n $slurm_done ]]; then
    [[ $(cat "$slurm_done") != 0 ]] || rm -f "$slurm_log"   # a failed start's log is kept
    rm -f "$slurm_done"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT; trap 'exit 143' TERM   # the EXIT trap still stops Slurm

if [[ $(id -u) == 0 && -f /etc/debian_version ]]; then
  if bash "$SLURM" status >/dev/null 2>&1; then
    echo "run-tests: Slurm already running; using it (and leaving it running)"
  else
    # Started beside the tests, not before them (it can take a minute, more with apt-get): the
    # `slurm` tests wait for $EFFDSTL_SLURM_STARTING to appear (tests/test_slurm.py), then skip
    # with the reason if the cluster still does not answer.
    started=1   # stopped at the end, whether the start worked or half-did
    slurm_log=$(mktemp -t effdstl-slurm-start.XXXXXX)
    slurm_done=$slurm_log.done
    ( rc=0; bash "$SLURM" start >"$slurm_log" 2>&1 || rc=$?; echo "$rc" >"$slurm_done.tmp"
      mv "$slurm_done.tmp" "$slurm_done" ) &   # whole, or not there yet
    export EFFDSTL_SLURM_STARTING=$slurm_done
    echo "run-tests: starting the local Slurm cluster beside the tests (log: $slurm_log)"
  fi
else
  echo "run-tests: not root on Debian; no local Slurm (tests marked 'slurm' will be skipped)"
fi

jobs=${EFFDSTL_TEST_JOBS:-$(nproc 2>/dev/null || echo 1)}
par=()
if (( jobs > 1 )); then
  par=(-n "$jobs" --dist loadgroup)
fi

rc=0
"$PY" -m pytest -q "${par[@]}" "$@" || rc=$?
if [[ -n $slurm_done ]]; then
  while [[ ! -e $slurm_done ]]; do sleep 1; done
  if [[ $(cat "$slurm_done") != 0 ]]; then
    tail -n 5 "$slurm_log" >&2
    echo "run-tests: WARNING: local Slurm did not start; tests marked 'slurm' were skipped" >&2
  fi
fi
if (( rc == 5 )); then
  echo "run-tests: ERROR: pytest collected no tests (exit 5); treating as failure" >&2
fi
exit "$rc"
