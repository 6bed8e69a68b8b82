# Environment of the built workspace; source it (bash): `source scripts/env.sh`.
# Activates .venv, makes the ROS wheels and the colcon install space visible, and keeps
# ROS discovery on this machine. Run scripts/setup.sh first.
# (No `set -e` here: this file is sourced into the caller's shell.)

_spatialoc_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ ! -f "$_spatialoc_root/.venv/bin/activate" ]]; then
  echo "[env] $_spatialoc_root/.venv missing: run scripts/setup.sh first" >&2
  unset _spatialoc_root
  return 1 2>/dev/null || exit 1
fi

# shellcheck source=/dev/null
source "$_spatialoc_root/.venv/bin/activate"
export AMENT_PREFIX_PATH="$VIRTUAL_ENV${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"

_spatialoc_pkg="$_spatialoc_root/install/spatialoc_ros"
if [[ -f "$_spatialoc_root/install/setup.bash" ]]; then
  # colcon's setup scripts read unset variables; relax nounset while sourcing them.
  _spatialoc_nounset=0
  [[ $- == *u* ]] && _spatialoc_nounset=1 && set +u
  # shellcheck source=/dev/null
  source "$_spatialoc_root/install/setup.bash"
  ((_spatialoc_nounset)) && set -u
  unset _spatialoc_nounset
fi
# Make sure the install space is on the paths even if colcon's scripts changed nothing.
if [[ -d "$_spatialoc_pkg" ]]; then
  _spatialoc_site="$_spatialoc_pkg/lib/python3.11/site-packages"
  case ":${PYTHONPATH:-}:" in *":$_spatialoc_site:"*) ;; *)
    export PYTHONPATH="$_spatialoc_site${PYTHONPATH:+:$PYTHONPATH}" ;; esac
  case ":$AMENT_PREFIX_PATH:" in *":$_spatialoc_pkg:"*) ;; *)
    export AMENT_PREFIX_PATH="$_spatialoc_pkg:$AMENT_PREFIX_PATH" ;; esac
  case ":${LD_LIBRARY_PATH:-}:" in *":$_spatialoc_pkg/lib:"*) ;; *)
    export LD_LIBRARY_PATH="$_spatialoc_pkg/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;; esac
  unset _spatialoc_site
fi

export ROS_AUTOMATIC_DISCOVERY_RANGE="${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}"
export SPATIALOC_ROOT="$_spatialoc_root"
unset _spatialoc_root _spatialoc_pkg
