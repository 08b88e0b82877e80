#!/usr/bin/env bash
# Set up (or reuse) .venv, install seqcls with its test extras, and run the test suite.
#   bash scripts/test.sh              # the whole suite
#   bash scripts/test.sh -m "not slow" tests/test_config.py   # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
python -m pytest -q "$@"
