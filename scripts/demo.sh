#!/usr/bin/env bash
# The demo: set up (idempotent), then run `python -m spatialoc_ros.demo` with the given
# arguments (see `bash scripts/demo.sh --help`). The demo's ROS 2 processes discover each other
# on localhost only and, where the kernel allows it, inside a private network namespace that has
# nothing but a loopback interface (set SPATIALOC_NO_NETNS=1 to run in the host namespace).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
# shellcheck source=scripts/env.sh
source "$ROOT/scripts/env.sh"
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-$(($$ % 100 + 1))}"

if [[ "${SPATIALOC_NO_NETNS:-0}" != 1 ]] && command -v unshare >/dev/null 2>&1 \
   && command -v ip >/dev/null 2>&1 && unshare -n true 2>/dev/null; then
  exec unshare -n -- bash -c 'ip link set lo up && exec "$@"' netns python -m spatialoc_ros.demo "$@"
fi
exec python -m spatialoc_ros.demo "$@"
