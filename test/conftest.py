"""Shared pytest fixtures.

``ros_env`` gives subprocesses (nodes started as separate processes) the environment of the
built workspace: the venv, the colcon install space, localhost-only ROS discovery and a
ROS_DOMAIN_ID of their own, so parallel or back-to-back tests do not see each other's graph.
"""
import itertools
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "spatialoc_ros"
PY_SITE = f"lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages"

# ROS_DOMAIN_IDs 1..101 are valid on Linux with the default port mapping; 0 is left to users.
_DOMAIN_BASE = int(os.environ.get("ROS_DOMAIN_ID", os.getpid() % 50))
_domain_counter = itertools.count(1)


def find_install_prefix() -> Path:
    """Install prefix of this package: the one on AMENT_PREFIX_PATH, else ./install."""
    for entry in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep):
        marker = Path(entry, "share/ament_index/resource_index/packages", PACKAGE)
        if entry and marker.is_file():
            return Path(entry)
    return REPO_ROOT / "install" / PACKAGE


def _prepend(env: dict, name: str, value: Path) -> None:
    parts = [p for p in env.get(name, "").split(os.pathsep) if p]
    if str(value) not in parts:
        env[name] = os.pathsep.join([str(value), *parts])


@pytest.fixture(scope="session")
def install_prefix() -> Path:
    """Colcon install prefix of spatialoc_ros (e.g. install/spatialoc_ros); must exist."""
    prefix = find_install_prefix()
    assert prefix.is_dir(), f"{prefix} missing: build first with `bash scripts/setup.sh`"
    return prefix


@pytest.fixture
def ros_env() -> dict:
    """Environment dict for ROS subprocesses, with a ROS_DOMAIN_ID unique to this test."""
    env = dict(os.environ)
    prefix = find_install_prefix()
    venv = Path(sys.prefix)
    _prepend(env, "PATH", venv / "bin")
    _prepend(env, "AMENT_PREFIX_PATH", venv)
    _prepend(env, "AMENT_PREFIX_PATH", prefix)
    _prepend(env, "PYTHONPATH", prefix / PY_SITE)
    _prepend(env, "LD_LIBRARY_PATH", prefix / "lib")
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    env["ROS_DOMAIN_ID"] = str(1 + (_DOMAIN_BASE + next(_domain_counter)) % 101)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="session")
def small_city(tmp_path_factory) -> str:
    """A synthetic city at the `small` scale (all nine scenes, seed 0), generated once per session."""
    from spatialoc_ros.data.synthetic import generate_city

    out = tmp_path_factory.mktemp("small_city")
    generate_city(str(out), seed=0, scale="small")
    return str(out)


@pytest.fixture
def graph_factory(ros_env, tmp_path):
    """Builds ros_helpers.Graph objects (node processes + a probe) on this test's domain and always
    stops their processes afterwards: ``make(map_params, localizer_params)``, None = not started."""
    from ros_helpers import Graph

    made = []

    def make(map_params=None, loc_params=None):
        g = Graph(ros_env, tmp_path / "logs", map_params, loc_params)
        made.append(g)
        return g

    yield make
    for g in made:
        g.close()
