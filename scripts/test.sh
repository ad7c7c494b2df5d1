#!/usr/bin/env bash
# Runs every check and test of lockstep, as CI does: starts Kafka and Redis on loopback, then
# formatting, clippy with warnings as errors, and the whole test suite. A persistent CARGO_TARGET_DIR outside the clone makes repeat runs fast.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/lockstep/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

step() { printf '\n== %s ==\n' "$*"; }

step "services (Kafka, Redis)"
# Real services on loopback, started by the project's own script; their addresses are exported
# for the integration tests, which fail (never skip) under CI=true when a service is missing.
services="$(scripts/services.sh start)"
set -a
eval "$services"
set +a
scripts/services.sh check
echo "KAFKA_BROKERS=$KAFKA_BROKERS REDIS_URL=$REDIS_URL"

step "rustfmt"
cargo fmt --all --check

step "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "tests"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --locked 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
passed=$(grep -Eo '^test result: .* ([0-9]+) passed' "$log" | grep -Eo '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '^test result: .* ([0-9]+) failed' "$log" | grep -Eo '[0-9]+ failed' | awk '{s+=$1} END {print s+0}')
echo
echo "lockstep: ${passed} passed, ${failed} failed"
exit "$status"
