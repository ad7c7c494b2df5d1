#!/usr/bin/env bash
# Backfill and compare benchmark; writes the "## Backfill and compare" section of BENCHMARKS.md.
# Extra arguments go to repair.py (e.g. --events 1000000 --runs 1).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/lockstep/target}"
venv="${LOCKSTEP_CACHE:-$HOME/.cache/lockstep}/bench-venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -c "import duckdb, deltalake, pyarrow, polars" 2>/dev/null \
  || "$venv/bin/pip" install -q polars duckdb deltalake pyarrow
cargo build --release -p lockstep
exec "$venv/bin/python" bench/repair.py --lockstep "$CARGO_TARGET_DIR/release/lockstep" "$@"
