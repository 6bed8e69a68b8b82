"""The package builds and installs as designed: interfaces, manifest, executables, metadata."""
import configparser
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "spatialoc_ros"
NODE_EXECUTABLES = ("map_server", "localizer", "demo_client")
PRESENT_NODES = [n for n in NODE_EXECUTABLES if (REPO_ROOT / "scripts" / n).is_file()]
PY_SITE = f"lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages"
BUILTIN_TYPES = {
    "bool", "byte", "char", "float32", "float64", "int8", "uint8", "int16", "uint16",
    "int32", "uint32", "int64", "uint64", "string", "wstring",
}


def interface_files():
    return sorted((REPO_ROOT / "msg").glob("*.msg")) + sorted((REPO_ROOT / "srv").glob("*.srv"))


def referenced_packages(path: Path) -> set:
    """Packages named by `pkg/Type` field types in one .msg/.srv file."""
    pkgs = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line == "---":
            continue
        field_type = re.sub(r"\[.*\]$", "", line.split()[0])  # drop array suffix
        field_type = re.sub(r"<=\d+$", "", field_type)  # bounded string
        if "/" in field_type:
            pkgs.add(field_type.split("/")[0])
        elif field_type not in BUILTIN_TYPES and field_type != "time" and field_type != "duration":
            pkgs.add(PACKAGE)  # a type of this package, e.g. MapObject
    return pkgs


# --- (a) generated interfaces ---------------------------------------------------------------

def test_interfaces_import_from_install_space(install_prefix):
    from spatialoc_ros.msg import MapCell, MapObject
    from spatialoc_ros.srv import GetMapCells

    site = (install_prefix / PY_SITE).resolve()
    for cls in (MapObject, MapCell, GetMapCells):
        module_file = Path(sys.modules[cls.__module__].__file__).resolve()
        assert site in module_file.parents, f"{cls.__name__} imported from {module_file}"


def test_map_object_fields():
    from spatialoc_ros.msg import MapObject

    assert MapObject.get_fields_and_field_types() == {
        "id": "int32",
        "instance_id": "int32",
        "label": "string",
        "points": "sensor_msgs/PointCloud2",
    }


def test_map_cell_fields():
    from spatialoc_ros.msg import MapCell

    assert MapCell.get_fields_and_field_types() == {
        "id": "string",
        "scene": "string",
        "bbox_w": "double[6]",
        "cell_size": "double",
        "objects": "sequence<spatialoc_ros/MapObject>",
    }
    bbox_type = MapCell.SLOT_TYPES[list(MapCell.get_fields_and_field_types()).index("bbox_w")]
    assert type(bbox_type).__name__ == "Array" and bbox_type.size == 6  # fixed size, not bounded
    assert len(MapCell().bbox_w) == 6


def test_get_map_cells_fields():
    from spatialoc_ros.srv import GetMapCells

    assert GetMapCells.Request.get_fields_and_field_types() == {
        "scene": "string",
        "use_circle": "boolean",
        "center_x": "double",
        "center_y": "double",
        "radius": "double",
    }
    assert GetMapCells.Response.get_fields_and_field_types() == {
        "success": "boolean",
        "message": "string",
        "cells": "sequence<spatialoc_ros/MapCell>",
        "frame_id": "string",
    }


def test_map_cell_serialises_through_typesupport():
    """Round trip through the compiled C type support (what DDS sends)."""
    from rclpy.serialization import deserialize_message, serialize_message
    from sensor_msgs.msg import PointField

    from spatialoc_ros.msg import MapCell, MapObject

    obj = MapObject(id=3, instance_id=1234, label="pole")
    obj.points.fields = [
        PointField(name=n, offset=4 * i, datatype=PointField.FLOAT32, count=1)
        for i, n in enumerate("xyzrgb")
    ]
    obj.points.point_step, obj.points.width, obj.points.height = 24, 1, 1
    obj.points.row_step = 24
    obj.points.data = bytes(range(24))
    cell = MapCell(id="s0_7", scene="s0", bbox_w=[1.0, 2.0, 0.0, 31.0, 32.0, 30.0],
                   cell_size=30.0, objects=[obj])

    back = deserialize_message(serialize_message(cell), MapCell)
    assert back == cell
    assert back.objects[0].points.data.tobytes() == bytes(range(24))


# --- (b) package.xml ------------------------------------------------------------------------

def _manifest():
    return ET.parse(REPO_ROOT / "package.xml").getroot()


def test_package_xml_parses_and_matches_metadata():
    from catkin_pkg.package import parse_package

    pkg = parse_package(str(REPO_ROOT / "package.xml"))  # validates format 3
    assert pkg.package_format == 3
    assert pkg.name == PACKAGE
    assert pkg.licenses == ["Apache-2.0"]
    assert pkg.get_build_type() == "ament_cmake"
    import spatialoc_ros

    assert pkg.version == spatialoc_ros.__version__
    groups = [g.name for g in pkg.member_of_groups]
    assert "rosidl_interface_packages" in groups


@pytest.mark.parametrize("path", interface_files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_package_xml_declares_interface_dependencies(path):
    root = _manifest()
    build = {e.text for e in root.iter() if e.tag in ("depend", "build_depend")}
    run = {e.text for e in root.iter() if e.tag in ("depend", "exec_depend")}
    cmake = (REPO_ROOT / "CMakeLists.txt").read_text()
    match = re.search(r"set\(INTERFACE_DEPENDENCIES([^)]*)\)", cmake)
    assert match, "CMakeLists.txt has no set(INTERFACE_DEPENDENCIES ...)"
    cmake_deps = set(match.group(1).split())
    for dep in referenced_packages(path) - {PACKAGE}:
        assert dep in build and dep in run, f"{path.name} uses {dep}: add <depend>{dep}</depend>"
        assert dep in cmake_deps, f"{path.name} uses {dep}: add it to INTERFACE_DEPENDENCIES"


def test_package_xml_build_tools():
    root = _manifest()
    tools = {e.text for e in root.iter("buildtool_depend")}
    assert {"ament_cmake", "ament_cmake_python", "rosidl_default_generators"} <= tools
    assert "rosidl_default_runtime" in {e.text for e in root.iter("exec_depend")}
    assert "ament_cmake_pytest" in {e.text for e in root.iter("test_depend")}


# --- (c) install space ----------------------------------------------------------------------

@pytest.mark.parametrize("node", PRESENT_NODES)
def test_node_executable_installed(install_prefix, node):
    installed = install_prefix / "lib" / PACKAGE / node
    assert installed.is_file(), f"{installed} missing: rebuild with `bash scripts/setup.sh`"
    assert os.access(installed, os.X_OK), f"{installed} is not executable"
    assert installed.read_bytes() == (REPO_ROOT / "scripts" / node).read_bytes(), "stale install"


@pytest.mark.parametrize("folder", [d for d in ("launch", "config") if (REPO_ROOT / d).is_dir()])
def test_share_folder_installed(install_prefix, folder):
    for src in (REPO_ROOT / folder).rglob("*"):
        if src.is_file() and "__pycache__" not in src.parts:
            rel = src.relative_to(REPO_ROOT)
            assert (install_prefix / "share" / PACKAGE / rel).is_file(), f"{rel} not installed"


def test_python_package_installed_whole(install_prefix):
    """Every hand-written module is merged into the installed (generated) package."""
    site = install_prefix / PY_SITE
    src_root = REPO_ROOT / PACKAGE
    sources = [p for p in src_root.rglob("*.py") if "__pycache__" not in p.parts]
    assert sources, "no Python sources found"
    stale = [
        str(p.relative_to(REPO_ROOT)) for p in sources
        if not (site / p.relative_to(REPO_ROOT)).is_file()
        or (site / p.relative_to(REPO_ROOT)).read_bytes() != p.read_bytes()
    ]
    assert not stale, f"not installed or stale (run `bash scripts/setup.sh`): {stale}"
    assert (site / PACKAGE / "msg" / "__init__.py").is_file(), "generated msg package missing"
    assert (site / PACKAGE / "srv" / "__init__.py").is_file(), "generated srv package missing"


def test_interface_definitions_installed(install_prefix):
    for path in interface_files():
        rel = path.relative_to(REPO_ROOT)
        assert (install_prefix / "share" / PACKAGE / rel).is_file(), f"{rel} not installed"


# --- (d) pip metadata -----------------------------------------------------------------------

def test_setup_cfg_names_package():
    cfg = configparser.ConfigParser()
    cfg.read(REPO_ROOT / "setup.cfg")
    assert cfg["metadata"]["name"] == PACKAGE
    requires = cfg["options"]["install_requires"].split()
    assert any(r.startswith("torch") for r in requires)


def test_setup_py_reports_name_and_version():
    out = subprocess.run(
        [sys.executable, "setup.py", "--name", "--version"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=True,
    ).stdout.split()
    import spatialoc_ros

    assert out[-2:] == [PACKAGE, spatialoc_ros.__version__]


def test_cmake_lists_every_interface_and_install_explicitly():
    cmake = (REPO_ROOT / "CMakeLists.txt").read_text()
    listed = set(re.search(r"set\(INTERFACE_FILES([^)]*)\)", cmake).group(1).split())
    assert listed == {str(p.relative_to(REPO_ROOT)) for p in interface_files()}
    assert "GLOB" not in cmake, "install explicit lists: a missing file must fail the build"
    for exe in NODE_EXECUTABLES:
        assert f"scripts/{exe}" in cmake


def test_package_xml_lists_what_the_nodes_import():
    """Every ROS package imported under spatialoc_ros/ is a dependency; none is listed unused."""
    import ast

    root = _manifest()
    deps = {e.text for e in root.iter() if e.tag in ("depend", "exec_depend")}
    imported = set()
    for path in (REPO_ROOT / PACKAGE).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module.split(".")[0])
                if node.module == "rclpy.lifecycle":
                    imported.add("lifecycle_msgs")  # rclpy's lifecycle services are lifecycle_msgs
            elif isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
    ros = {m for m in imported if m.endswith(("_msgs", "_srvs", "_interfaces")) or m == "rclpy"}
    assert ros <= deps, f"imported but not in package.xml: {sorted(ros - deps)}"
    listed_msgs = {d for d in deps if d.endswith(("_msgs", "_srvs"))}
    assert listed_msgs <= ros | {"geometry_msgs", "sensor_msgs", "std_msgs"}, \
        f"listed but never imported: {sorted(listed_msgs - ros)}"
