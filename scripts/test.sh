#!/usr/bin/env bash
# Set up (or reuse) .venv, install seqcls with its test extras, and run the test suite.
#   bash scripts/test.sh              # the whole suite
#   bash scripts/test.sh -m "not slow" tests/test_config.py   # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh

# --- local Slurm for the `slurm` tests (tests/test_slurm.py) -------------------------------------
# As root, with the shared scripts beside the repo (../shared/slurm): install and start a
# single-node cluster, and stop it on exit, unless one was already up (then it is left running).
# Without it the slurm tests skip, or fail under CI=true.
SLURM_SCRIPTS=../shared/slurm
if [ "$(id -u)" -eq 0 ] && [ -d "$SLURM_SCRIPTS" ]; then
  if command -v scontrol >/dev/null 2>&1 && timeout 10 scontrol ping 2>/dev/null | grep -q UP; then
    echo "test.sh: using the Slurm cluster already running"
  elif bash "$SLURM_SCRIPTS/install-slurm.sh" && bash "$SLURM_SCRIPTS/start-local-slurm.sh"; then
    trap 'rc=$?; bash "$SLURM_SCRIPTS/stop-local-slurm.sh" || true; exit $rc' EXIT
  else
    echo "test.sh: could not start the local Slurm; the slurm tests will skip (fail under CI=true)" >&2
  fi
  export PATH=/var/spool/local-slurm/bin:$PATH  # sacct stand-in, so submitit sees job states
fi
# ---------------------------------------------------------------------------------------------------

python -m pytest -q "$@"
