#!/usr/bin/env bash
# Training-set benchmark against DuckDB; writes the "## Training sets" section of BENCHMARKS.md.
# Extra arguments go to training.py (e.g. --events 1000000 --labels 100000 --runs 1).
source "$(dirname "$0")/env.sh"
exec "$PYTHON" bench/training.py --lockstep "$LOCKSTEP" "$@"
