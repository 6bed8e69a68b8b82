#!/usr/bin/env bash
# The whole test suite: set up (idempotent), then the tests against the colcon install space.
#   bash scripts/test.sh                 # everything, the way ROS users run a package's tests:
#                                        #   colcon test --packages-select spatialoc_ros --return-code-on-test-failure
#   bash scripts/test.sh -k map_server   # with arguments: pytest directly, the arguments go to it
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

RESULTS="$ROOT/build/spatialoc_ros/test_results/spatialoc_ros/pytest_suite.xunit.xml"
if (($#)); then
  # -P: the repository root is not put on sys.path, so `spatialoc_ros` is imported from the
  # install space (tests see what colcon installed, not the source tree).
  test_cmd=(python -P -m pytest test/ -q -p no:cacheprovider "$@")
else
  # CMakeLists.txt registers the whole test/ folder as one pytest suite (ament_add_pytest_test).
  rm -f "$RESULTS"
  test_cmd=(colcon test --base-paths "$ROOT" --packages-select spatialoc_ros --return-code-on-test-failure
            --event-handlers console_direct+)
fi

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
  unshare -n -- bash -c 'ip link set lo up && exec "$@"' netns "${test_cmd[@]}"
else
  "${test_cmd[@]}"
fi
rc=$?
set -e

if (($# == 0)); then
  # one closing line with the counts of the suite's JUnit file (colcon prefixes pytest's own)
  if ! python - "$RESULTS" <<'PY'
import sys
import xml.etree.ElementTree as ET

root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
n = lambda key: sum(int(s.get(key, 0)) for s in suites)
total, failed, skipped = n("tests"), n("failures") + n("errors"), n("skipped")
print(f"tests: {total - failed - skipped} passed, {failed} failed, {skipped} skipped")
sys.exit(0 if total > 0 else 5)
PY
  then
    echo "[test] FAILED: no test results in $RESULTS" >&2
    [[ $rc != 0 ]] || rc=5
  fi
fi
if [[ $rc == 5 ]]; then
  echo "[test] FAILED: no tests collected" >&2
elif [[ $rc != 0 ]]; then
  echo "[test] FAILED: exit code $rc" >&2
fi
echo "[test] finished in $((SECONDS - T0)) s (exit $rc)"
exit "$rc"
