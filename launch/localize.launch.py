"""Text localisation: the map server and the localizer in one namespace (default /spatialoc).

    ros2 launch spatialoc_ros localize.launch.py
    ros2 launch spatialoc_ros localize.launch.py device:=cpu base_path:=/data/k360_30-10_scG_pd10_pc4_spY_all
    ros2 launch spatialoc_ros localize.launch.py pose_topic:=/initialpose   # feed nav2 / AMCL
    ros2 launch spatialoc_ros localize.launch.py use_rviz:=true

Topics (namespace /spatialoc): instruction (in), pose, hypotheses, hypotheses_detail, markers,
status, map_markers; services get_map_cells, reload_map. Parameter files: config/localizer.yaml and
config/map_server.yaml of this package (override them with localizer_params / map_server_params).
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare

PACKAGE = "spatialoc_ros"


def _text(name: str) -> ParameterValue:
    """A launch argument passed on as a string parameter (also when it is '')."""
    return ParameterValue(LaunchConfiguration(name), value_type=str)


def generate_launch_description() -> LaunchDescription:
    share = FindPackageShare(PACKAGE)
    arguments = [
        DeclareLaunchArgument(
            "namespace", default_value="spatialoc",
            description="Namespace of both nodes and of all their topics and services.",
        ),
        DeclareLaunchArgument(
            "device", default_value="auto", choices=["auto", "cpu", "cuda"],
            description="Inference device of the localizer; auto = CUDA when present (CUDA asked for "
                        "but absent falls back to the CPU, logged).",
        ),
        DeclareLaunchArgument(
            "text_model", default_value="minilm",
            description="Frozen language model: minilm (shipped), a local model folder or a name in "
                        "the local Hugging Face cache; '' = the one named in the checkpoints.",
        ),
        DeclareLaunchArgument(
            "coarse_checkpoint", default_value="",
            description="Coarse (retrieval) checkpoint .pth; '' = the shipped one.",
        ),
        DeclareLaunchArgument(
            "fine_checkpoint", default_value="",
            description="Fine (UGFL) checkpoint .pth; '' = the shipped one.",
        ),
        DeclareLaunchArgument(
            "base_path", default_value="",
            description="KITTI360Pose-format folder served by the map server; '' = the embedded "
                        "synthetic city (generated on first start).",
        ),
        DeclareLaunchArgument(
            "split", default_value="test", choices=["train", "val", "test", "all"],
            description="Scenes of base_path the map server serves.",
        ),
        DeclareLaunchArgument(
            "pose_topic", default_value="pose",
            description="Where the top-1 pose goes; /initialpose hands it to nav2 / AMCL.",
        ),
        DeclareLaunchArgument(
            "localizer_params", default_value=PathJoinSubstitution([share, "config", "localizer.yaml"]),
            description="Parameter file of the localizer.",
        ),
        DeclareLaunchArgument(
            "map_server_params", default_value=PathJoinSubstitution([share, "config", "map_server.yaml"]),
            description="Parameter file of the map server.",
        ),
        DeclareLaunchArgument(
            "use_rviz", default_value="false", choices=["true", "false"],
            description="Also start rviz2 with config/spatialoc.rviz.",
        ),
    ]
    namespace = LaunchConfiguration("namespace")

    map_server = Node(
        package=PACKAGE,
        executable="map_server",
        name="map_server",
        namespace=namespace,
        output="screen",
        parameters=[
            LaunchConfiguration("map_server_params"),
            {"base_path": _text("base_path"), "split": _text("split")},
        ],
    )
    localizer = Node(
        package=PACKAGE,
        executable="localizer",
        name="localizer",
        namespace=namespace,
        output="screen",
        parameters=[
            LaunchConfiguration("localizer_params"),
            {
                "device": _text("device"),
                "text_model": _text("text_model"),
                "coarse_checkpoint": _text("coarse_checkpoint"),
                "fine_checkpoint": _text("fine_checkpoint"),
            },
        ],
        remappings=[("pose", LaunchConfiguration("pose_topic"))],
    )
    rviz = Node(
        package="rviz2",
        executable="rviz2",
        name="rviz2",
        arguments=["-d", PathJoinSubstitution([share, "config", "spatialoc.rviz"])],
        condition=IfCondition(LaunchConfiguration("use_rviz")),
        output="screen",
    )
    return LaunchDescription([*arguments, map_server, localizer, rviz])
