#!/usr/bin/env bash
# Batch benchmark against Polars and DuckDB; writes BENCHMARKS.md. Extra arguments go to
# batch_vs_peers.py (e.g. --events 1000000 --runs 1).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/lockstep/target}"
venv="${LOCKSTEP_CACHE:-$HOME/.cache/lockstep}/bench-venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q polars duckdb deltalake pyarrow
fi
cargo build --release -p lockstep
exec "$venv/bin/python" bench/batch_vs_peers.py --lockstep "$CARGO_TARGET_DIR/release/lockstep" "$@"
