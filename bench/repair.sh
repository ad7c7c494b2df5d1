#!/usr/bin/env bash
# Backfill and compare benchmark; writes the "## Backfill and compare" section of BENCHMARKS.md.
# Extra arguments go to repair.py (e.g. --events 1000000 --runs 1).
source "$(dirname "$0")/env.sh"
exec "$PYTHON" bench/repair.py --lockstep "$LOCKSTEP" "$@"
