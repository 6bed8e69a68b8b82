"""Text localisation: the map server and the localizer in one namespace (default /spatialoc).

    ros2 launch spatialoc_ros localize.launch.py
    ros2 launch spatialoc_ros localize.launch.py device:=cuda:1 base_path:=/data/k360_30-10_scG_pd10_pc4_spY_all
    ros2 launch spatialoc_ros localize.launch.py pose_topic:=/initialpose   # seed nav2 / AMCL
    ros2 launch spatialoc_ros localize.launch.py use_rviz:=true
    ros2 launch spatialoc_ros localize.launch.py use_lifecycle_manager:=true  # nav2_lifecycle_manager drives them

Both nodes are lifecycle nodes. By default they come up to active by themselves (their
``autostart`` parameter); with ``use_lifecycle_manager:=true`` nav2's lifecycle_manager (package
nav2_lifecycle_manager, not a dependency of this package) configures and activates them in order,
map server first, and the nodes' autostart is off. Python lifecycle nodes hold no bond, so the
manager runs with ``bond_timeout: 0.0``.

Parameters: the files ``localizer_params`` and ``map_server_params`` (default: this package's
config/*.yaml) are the single source. The override arguments (device, text_model,
coarse_checkpoint, fine_checkpoint, base_path, split) change a value only when given: their
default '' keeps the file's value.

Topics (namespace /spatialoc): instruction (in), pose (-> pose_topic), hypotheses,
hypotheses_detail, markers, status, map_markers, map_server/status; services get_map_cells,
reload_map; /diagnostics.
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

PACKAGE = "spatialoc_ros"
#: The default of an override argument: keep the value of the parameter file.
FROM_PARAMS = ""
#: Launch arguments that override one parameter of one node, only when given.
OVERRIDES = {
    "localizer": ("device", "text_model", "coarse_checkpoint", "fine_checkpoint"),
    "map_server": ("base_path", "split"),
}
LIFECYCLE_MANAGER_NAME = "lifecycle_manager_spatialoc"


def _given(context, node: str) -> dict:
    """The override arguments of ``node`` that were given (not left at FROM_PARAMS)."""
    values = {}
    for name in OVERRIDES[node]:
        value = LaunchConfiguration(name).perform(context)
        if value != FROM_PARAMS:
            values[name] = value
    return values


def _flag(context, name: str) -> bool:
    return LaunchConfiguration(name).perform(context).lower() == "true"


def _actions(context):
    namespace = LaunchConfiguration("namespace")
    pose_topic = LaunchConfiguration("pose_topic")
    managed = _flag(context, "use_lifecycle_manager")
    common = {"use_sim_time": _flag(context, "use_sim_time"), "autostart": not managed}
    ros_args = ["--ros-args", "--log-level", LaunchConfiguration("log_level")]
    actions = [
        Node(
            package=PACKAGE,
            executable="map_server",
            name="map_server",
            namespace=namespace,
            output="screen",
            arguments=ros_args,
            parameters=[LaunchConfiguration("map_server_params"), common, _given(context, "map_server")],
        ),
        Node(
            package=PACKAGE,
            executable="localizer",
            name="localizer",
            namespace=namespace,
            output="screen",
            arguments=ros_args,
            parameters=[LaunchConfiguration("localizer_params"), common, _given(context, "localizer")],
            remappings=[("pose", pose_topic)],
        ),
    ]
    if managed:
        actions.append(Node(
            package="nav2_lifecycle_manager",
            executable="lifecycle_manager",
            name=LIFECYCLE_MANAGER_NAME,
            namespace=namespace,
            output="screen",
            arguments=ros_args,
            parameters=[{
                "node_names": ["map_server", "localizer"],
                "autostart": True,
                "bond_timeout": 0.0,
                "use_sim_time": common["use_sim_time"],
            }],
        ))
    if _flag(context, "use_rviz"):
        actions.append(Node(
            package="rviz2",
            executable="rviz2",
            name="rviz2",
            namespace=namespace,  # the config's topics are relative
            arguments=["-d", PathJoinSubstitution([FindPackageShare(PACKAGE), "config", "spatialoc.rviz"])],
            parameters=[{"use_sim_time": common["use_sim_time"]}],
            remappings=[("pose", pose_topic)],
            output="screen",
        ))
    return actions


def generate_launch_description() -> LaunchDescription:
    share = FindPackageShare(PACKAGE)
    from_params = "'' (default) keeps the value of the parameter file."
    arguments = [
        DeclareLaunchArgument(
            "namespace", default_value="spatialoc",
            description="Namespace of both nodes (and rviz) and of all their topics and services.",
        ),
        DeclareLaunchArgument(
            "device", default_value=FROM_PARAMS,
            description="Inference device of the localizer: auto | cpu | cuda | cuda:N (auto = CUDA when present; "
                        "CUDA asked for but absent falls back to the CPU, logged). " + from_params,
        ),
        DeclareLaunchArgument(
            "text_model", default_value=FROM_PARAMS,
            description="Frozen language model: minilm (shipped), a local model folder or a name in the local "
                        "Hugging Face cache. " + from_params,
        ),
        DeclareLaunchArgument(
            "coarse_checkpoint", default_value=FROM_PARAMS,
            description="Coarse (retrieval) checkpoint .pth. " + from_params,
        ),
        DeclareLaunchArgument(
            "fine_checkpoint", default_value=FROM_PARAMS,
            description="Fine (UGFL) checkpoint .pth. " + from_params,
        ),
        DeclareLaunchArgument(
            "base_path", default_value=FROM_PARAMS,
            description="KITTI360Pose-format folder served by the map server. " + from_params,
        ),
        DeclareLaunchArgument(
            "split", default_value=FROM_PARAMS, choices=[FROM_PARAMS, "train", "val", "test", "all"],
            description="Scenes of base_path the map server serves. " + from_params,
        ),
        DeclareLaunchArgument(
            "pose_topic", default_value="pose",
            description="Where the top-1 pose goes (relative to the namespace); /initialpose seeds nav2 / AMCL.",
        ),
        DeclareLaunchArgument(
            "localizer_params", default_value=PathJoinSubstitution([share, "config", "localizer.yaml"]),
            description="Parameter file of the localizer (the single source of its parameters).",
        ),
        DeclareLaunchArgument(
            "map_server_params", default_value=PathJoinSubstitution([share, "config", "map_server.yaml"]),
            description="Parameter file of the map server (the single source of its parameters).",
        ),
        DeclareLaunchArgument(
            "use_sim_time", default_value="false", choices=["true", "false"],
            description="Use the /clock topic (simulation or a bag) for every node's time.",
        ),
        DeclareLaunchArgument(
            "log_level", default_value="info", choices=["debug", "info", "warn", "error", "fatal"],
            description="Log level of the launched nodes.",
        ),
        DeclareLaunchArgument(
            "use_lifecycle_manager", default_value="false", choices=["true", "false"],
            description="Start nav2_lifecycle_manager to drive both lifecycle nodes (their autostart off).",
        ),
        DeclareLaunchArgument(
            "use_rviz", default_value="false", choices=["true", "false"],
            description="Also start rviz2 with config/spatialoc.rviz, in the same namespace.",
        ),
    ]
    return LaunchDescription([*arguments, OpaqueFunction(function=_actions)])
