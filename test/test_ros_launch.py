"""The launch file, parameter files and executables agree with each other and with the nodes.

`launch` / `launch_ros` have no PyPI wheels, so the launch file cannot run here: it is checked by
reading its source (AST) against what the nodes declare and what the package installs. Where
`launch` imports (a full ROS 2 install) the description is also built for real.
"""
import ast
import importlib.util
import os
from pathlib import Path

import pytest
import yaml

from spatialoc_ros.ros import localizer_node, map_server_node

REPO_ROOT = Path(__file__).resolve().parents[1]
LAUNCH_FILE = REPO_ROOT / "launch" / "localize.launch.py"
from spatialoc_ros.ros.lifecycle_base import COMMON_PARAMETERS

NODE_PARAMETERS = {"map_server": {**COMMON_PARAMETERS, **map_server_node.PARAMETERS},
                   "localizer": {**COMMON_PARAMETERS, **localizer_node.PARAMETERS}}
NODE_NAMES = {"map_server": map_server_node.NODE_NAME, "localizer": localizer_node.NODE_NAME}


_MODULE_CONSTANTS: dict = {}


def _const(node):
    """The value of a literal, or of a module-level NAME = literal of the launch file."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return _MODULE_CONSTANTS.get(node.id)
    return None


def _calls(tree, name):
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == name]


def _kw(call, key):
    return next((k.value for k in call.keywords if k.arg == key), None)


@pytest.fixture(scope="module")
def launch_tree():
    tree = ast.parse(LAUNCH_FILE.read_text())
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Constant):
            for target in stmt.targets:
                if isinstance(target, ast.Name):
                    _MODULE_CONSTANTS[target.id] = stmt.value.value
    return tree


def _nodes(tree):
    out = {}
    for call in _calls(tree, "Node"):
        if _const(_kw(call, "package")) == "spatialoc_ros":
            out[_const(_kw(call, "executable"))] = call
    return out


def test_launch_starts_both_executables_with_their_node_names(launch_tree):
    nodes = _nodes(launch_tree)
    assert set(nodes) == {"map_server", "localizer"}
    for exe, call in nodes.items():
        assert _const(_kw(call, "name")) == NODE_NAMES[exe]
        ns = _kw(call, "namespace")
        assert ns is not None, f"{exe} has no namespace"
        assert (REPO_ROOT / "scripts" / exe).is_file()


def test_launch_arguments_have_descriptions_and_choices(launch_tree):
    args = {}
    for call in _calls(launch_tree, "DeclareLaunchArgument"):
        name = _const(call.args[0])
        description = _const(_kw(call, "description"))
        if description is None and isinstance(_kw(call, "description"), ast.BinOp):
            description = "concatenated"  # "..." + from_params
        assert description and len(description) > 10, f"launch argument {name} needs a description"
        args[name] = call
    for required in ("device", "text_model", "coarse_checkpoint", "fine_checkpoint", "base_path", "use_rviz",
                     "namespace", "use_sim_time", "log_level", "use_lifecycle_manager", "pose_topic"):
        assert required in args, f"launch argument {required} missing"
    assert _kw(args["device"], "choices") is None  # cuda:N must pass
    for name in ("device", "text_model", "base_path", "split"):  # overrides: '' keeps the params file's value
        assert _const(_kw(args[name], "default_value")) == "", name
    assert _const(_kw(args["use_rviz"], "default_value")) == "false"
    assert _const(_kw(args["namespace"], "default_value")) == "spatialoc"


def _launch_module(monkeypatch):
    """The launch file executed against small stand-ins of launch / launch_ros (no wheel exists
    here), so that its logic (which parameters go to which node) runs for real."""
    import sys
    import types

    class Recorder:
        def __init__(self, *args, **kwargs):
            self.args, self.kwargs = args, kwargs

    class LaunchConfiguration(Recorder):
        def perform(self, context):
            return context[self.args[0]]

    modules = {
        "launch": {"LaunchDescription": Recorder},
        "launch.actions": {"DeclareLaunchArgument": Recorder, "OpaqueFunction": Recorder},
        "launch.substitutions": {"LaunchConfiguration": LaunchConfiguration, "PathJoinSubstitution": Recorder},
        "launch_ros.actions": {"Node": Recorder},
        "launch_ros.substitutions": {"FindPackageShare": Recorder},
    }
    for name, attrs in modules.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location("localize_launch_stubbed", LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    defaults = {}
    for arg in module.generate_launch_description().args[0]:
        if "default_value" in arg.kwargs:
            value = arg.kwargs["default_value"]
            defaults[arg.args[0]] = value if isinstance(value, str) else "<path>"
    return module, defaults


def _by_executable(actions):
    return {a.kwargs["executable"]: a.kwargs for a in actions}


def test_parameter_files_are_the_single_source(monkeypatch):
    module, defaults = _launch_module(monkeypatch)
    nodes = _by_executable(module._actions(dict(defaults)))
    assert set(nodes) == {"map_server", "localizer"}
    for exe, kw in nodes.items():
        params_file, common, overrides = kw["parameters"]
        assert params_file.args[0] == f"{exe}_params"
        assert overrides == {}, f"{exe} gets overrides nobody gave: {overrides}"
        assert common == {"use_sim_time": False, "autostart": True}
    given = _by_executable(module._actions({**defaults, "device": "cuda:1", "split": "val"}))
    assert given["localizer"]["parameters"][2] == {"device": "cuda:1"}
    assert given["map_server"]["parameters"][2] == {"split": "val"}
    for node, names in module.OVERRIDES.items():
        assert set(names) <= set(NODE_PARAMETERS[node]), f"{node}: unknown parameters"


def test_lifecycle_manager_rviz_and_namespace(monkeypatch):
    module, defaults = _launch_module(monkeypatch)
    context = {**defaults, "use_lifecycle_manager": "true", "use_rviz": "true", "use_sim_time": "true"}
    nodes = _by_executable(module._actions(context))
    manager = nodes["lifecycle_manager"]
    assert manager["package"] == "nav2_lifecycle_manager"
    assert manager["parameters"][0]["node_names"] == ["map_server", "localizer"]
    assert manager["parameters"][0]["bond_timeout"] == 0.0  # rclpy lifecycle nodes hold no bond
    for exe in ("map_server", "localizer"):
        assert nodes[exe]["parameters"][1] == {"use_sim_time": True, "autostart": False}
    rviz = nodes["rviz2"]
    assert rviz["namespace"].args[0] == "namespace"  # rviz in the nodes' namespace
    assert [(a, b.args[0]) for a, b in rviz["remappings"]] == [("pose", "pose_topic")]
    assert [(a, b.args[0]) for a, b in nodes["localizer"]["remappings"]] == [("pose", "pose_topic")]


def test_files_named_by_the_launch_file_exist(launch_tree, install_prefix):
    share = install_prefix / "share" / "spatialoc_ros"
    named = []
    for call in _calls(launch_tree, "PathJoinSubstitution"):
        parts = [_const(e) for e in call.args[0].elts[1:]]
        assert all(isinstance(p, str) for p in parts)
        named.append(Path(*parts))
    assert {p.name for p in named} == {"localizer.yaml", "map_server.yaml", "spatialoc.rviz"}
    for rel in named:
        assert (REPO_ROOT / rel).is_file(), f"{rel} missing in the source tree"
        assert (share / rel).is_file(), f"{rel} not installed under {share}"
    assert (share / "launch" / "localize.launch.py").is_file()


def test_executables_are_installed(install_prefix):
    for exe in ("map_server", "localizer", "demo_client"):
        src = REPO_ROOT / "scripts" / exe
        assert src.read_text().startswith("#!/usr/bin/env python3")
        assert os.access(src, os.X_OK)
        installed = install_prefix / "lib" / "spatialoc_ros" / exe
        assert os.access(installed, os.X_OK), f"{installed} missing or not executable"


@pytest.mark.parametrize("node", ["map_server", "localizer"])
def test_parameter_files_mirror_the_declared_parameters(node):
    path = REPO_ROOT / "config" / f"{node}.yaml"
    data = yaml.safe_load(path.read_text())
    assert list(data) == [f"/**/{node}"]
    values = data[f"/**/{node}"]["ros__parameters"]
    declared = NODE_PARAMETERS[node]
    commented = {line.split("#", 1)[1].split(":", 1)[0].strip() for line in path.read_text().splitlines()
                 if line.strip().startswith("#") and ":" in line}
    missing = set(declared) - set(values) - commented
    assert not missing, f"{path.name} lacks {missing}"
    assert set(values) <= set(declared), f"{path.name} has undeclared {set(values) - set(declared)}"
    for name, value in values.items():
        default = declared[name].default
        assert value == default, f"{path.name}: {name} = {value!r}, node default {default!r}"


def test_readme_documents_every_declared_parameter():
    """The README's parameter list names each parameter of both nodes (a README edit once dropped
    the whole ROS section without any test noticing)."""
    text = (REPO_ROOT / "README.md").read_text()
    assert "\n### Parameters\n" in text, "README.md lost its ROS 'Parameters' section"
    section = text.split("\n### Parameters\n", 1)[1].split("\n### ", 1)[0]
    for node, declared in NODE_PARAMETERS.items():
        missing = sorted(name for name in declared if f"`{name}`" not in section)
        assert not missing, f"README.md's Parameters section does not name {node}'s {missing}"


def test_rviz_config_names_the_published_topics_relative():
    text = (REPO_ROOT / "config" / "spatialoc.rviz").read_text()
    data = yaml.safe_load(text)
    assert data["Visualization Manager"]["Global Options"]["Fixed Frame"] == "map"
    topics = {d["Topic"]["Value"] for d in data["Visualization Manager"]["Displays"] if "Topic" in d}
    assert {"map_markers", "markers", "pose", "hypotheses"} <= topics
    assert not any(t.startswith("/spatialoc") for t in topics), "absolute topics break namespace:="


def test_launch_description_builds_where_launch_exists():
    pytest.importorskip("launch_ros")
    launch = pytest.importorskip("launch")
    if not hasattr(launch, "LaunchDescription"):  # the repository's launch/ folder, not the package
        pytest.skip("the ROS 2 `launch` package is not installed")
    spec = importlib.util.spec_from_file_location("localize_launch", LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    description = module.generate_launch_description()
    names = [getattr(e, "name", None) for e in description.entities]
    assert {"device", "text_model", "base_path", "use_rviz"} <= set(names)


def test_launch_file_brings_up_a_ready_localizer_where_launch_exists(ros_env, small_city, tmp_path, monkeypatch):
    """On a full ROS 2 install: launch localize.launch.py for real and wait for state=ready."""
    pytest.importorskip("launch_ros")
    launch = pytest.importorskip("launch")
    if not hasattr(launch, "LaunchService"):
        pytest.skip("the ROS 2 `launch` package is not installed")
    import threading

    from launch.actions import IncludeLaunchDescription
    from launch.launch_description_sources import PythonLaunchDescriptionSource

    from ros_helpers import Probe, tiny_checkpoints

    for key in ("ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE", "AMENT_PREFIX_PATH", "PYTHONPATH", "LD_LIBRARY_PATH", "PATH"):
        if key in ros_env:
            monkeypatch.setenv(key, ros_env[key])  # the launched processes inherit this environment
    coarse, fine = tiny_checkpoints(tmp_path / "ckpt")
    service = launch.LaunchService()
    service.include_launch_description(IncludeLaunchDescription(
        PythonLaunchDescriptionSource(str(LAUNCH_FILE)),
        launch_arguments={"device": "cpu", "base_path": small_city, "coarse_checkpoint": coarse,
                          "fine_checkpoint": fine}.items(),
    ))
    outcome = {}

    def watch() -> None:  # a probe on another thread; LaunchService.run() wants the main thread
        probe = Probe(int(ros_env["ROS_DOMAIN_ID"]))
        try:
            outcome["ready"] = probe.wait_state("ready", 120)
            outcome["status"] = probe.status
            outcome["cells"] = probe.get_cells() if outcome["ready"] else None
        finally:
            probe.close()
            service.shutdown()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    service.run()
    watcher.join(timeout=30)
    assert outcome.get("ready"), f"no ready localizer; last status {outcome.get('status')!r}"
    assert outcome["cells"].success and outcome["cells"].cells
