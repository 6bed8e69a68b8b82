"""KITTI360Pose data: the project's own classes, safe loading, query text, synthetic cities.

Everything in this sub-package is ROS-free and torch-free.
"""
from spatialoc_ros.data.kitti360pose import (  # noqa: F401
    Cell,
    DescriptionBestCell,
    DescriptionPoseCell,
    Object3d,
    Pose,
)
from spatialoc_ros.data.loading import (  # noqa: F401
    DataFormatError,
    SceneData,
    hint_texts,
    load_direction_map,
    load_scene,
    load_split,
    query_text,
)
from spatialoc_ros.data.safe_pickle import UnsafePickleError, safe_load_pickle  # noqa: F401
