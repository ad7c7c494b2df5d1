#!/usr/bin/env bash
# Batch benchmark against Polars and DuckDB; writes BENCHMARKS.md. Extra arguments go to
# batch_vs_peers.py (e.g. --events 1000000 --runs 1).
source "$(dirname "$0")/env.sh"
exec "$PYTHON" bench/batch_vs_peers.py --lockstep "$LOCKSTEP" "$@"
