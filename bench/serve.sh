#!/usr/bin/env bash
# Serving benchmark (two concurrent clients); writes the "## Serving" section of BENCHMARKS.md.
# Starts Kafka and Redis with scripts/services.sh. Extra arguments go to serve.py.
source "$(dirname "$0")/env.sh"
services="$(scripts/services.sh start)"
set -a
eval "$services"
set +a
exec "$PYTHON" bench/serve.py --lockstep "$LOCKSTEP" "$@"
