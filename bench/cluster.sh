#!/usr/bin/env bash
# Batch on a local Ballista cluster (a scheduler and two executors) vs in-process; writes the
# "## Cluster" section of BENCHMARKS.md. Extra arguments go to cluster.py (e.g. --runs 1).
source "$(dirname "$0")/env.sh"
exec "$PYTHON" bench/cluster.py --lockstep "$LOCKSTEP" "$@"
