#!/usr/bin/env bash
# The whole test suite: set up (idempotent), then pytest against the colcon install space.
#   bash scripts/test.sh                 # everything
#   bash scripts/test.sh -k map_server   # extra arguments go to pytest
# ROS traffic stays on this machine: localhost-only discovery, a per-run ROS_DOMAIN_ID and,
# where the kernel allows it, a private network namespace with only a loopback interface.
# The exit code is pytest's; "no tests collected" (5) counts as a failure too.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
T0=$SECONDS
bash "$ROOT/scripts/setup.sh"

cd "$ROOT"
# shellcheck source=scripts/env.sh
source "$ROOT/scripts/env.sh"
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-$(($$ % 100 + 1))}"  # 1..100, valid on Linux
export PYTHONDONTWRITEBYTECODE=1

# -P: the repository root is not put on sys.path, so `spatialoc_ros` is imported from the
# install space (tests see what colcon installed, not the source tree).
pytest_cmd=(python -P -m pytest test/ -q -p no:cacheprovider "$@")

isolated=0
if [[ "${SPATIALOC_NO_NETNS:-0}" != 1 ]] && command -v unshare >/dev/null 2>&1 \
   && command -v ip >/dev/null 2>&1 && unshare -n true 2>/dev/null; then
  isolated=1
fi

echo "[test] ROS_DOMAIN_ID=$ROS_DOMAIN_ID discovery=LOCALHOST netns=$([[ $isolated == 1 ]] && echo private || echo host)"
if [[ $isolated == 0 ]]; then
  echo "[test] notice: 'unshare -n' is not available here; ROS traffic is limited by ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST only"
fi

set +e
if [[ $isolated == 1 ]]; then
  unshare -n -- bash -c 'ip link set lo up && exec "$@"' netns "${pytest_cmd[@]}"
else
  "${pytest_cmd[@]}"
fi
rc=$?
set -e

if [[ $rc == 5 ]]; then
  echo "[test] FAILED: pytest collected no tests" >&2
elif [[ $rc != 0 ]]; then
  echo "[test] FAILED: pytest exit code $rc" >&2
fi
echo "[test] finished in $((SECONDS - T0)) s (exit $rc)"
exit "$rc"
