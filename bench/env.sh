# Shared by the bench scripts: the Python environment (Polars, DuckDB, deltalake) and a release
# build of lockstep. Sets $PYTHON and $LOCKSTEP.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/lockstep/target}"
venv="${LOCKSTEP_CACHE:-$HOME/.cache/lockstep}/bench-venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -c "import duckdb, deltalake, pyarrow, polars" 2>/dev/null \
  || "$venv/bin/pip" install -q polars duckdb deltalake pyarrow
cargo build --release -p lockstep
PYTHON="$venv/bin/python"
LOCKSTEP="$CARGO_TARGET_DIR/release/lockstep"
