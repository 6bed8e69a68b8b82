#!/usr/bin/env bash
# The demo: set up (idempotent), then run `python -m spatialoc_ros.demo` with the given
# arguments (see `bash scripts/demo.sh --help`).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
# shellcheck source=scripts/env.sh
source "$ROOT/scripts/env.sh"
exec python -m spatialoc_ros.demo "$@"
