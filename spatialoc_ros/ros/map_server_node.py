"""The ``map_server`` node: serves KITTI360Pose-style map cells over ROS 2.

Map source, in this order of precedence:
- ``cloud_path``: a user's labelled point cloud (.npz / .ply / .pcd), cut into cells
  (:mod:`spatialoc_ros.data.cloud_cells`);
- ``base_path``: a KITTI360Pose folder (the release, or a synthetic city), scenes from ``scenes``
  or else from ``split``;
- neither: the embedded synthetic city (generated on first start, which is logged).

Interfaces (relative names; put the node in a namespace with ``-r __ns:=/spatialoc``):
- service ``get_map_cells`` (spatialoc_ros/srv/GetMapCells): cells filtered by scene and by a
  world x-y circle;
- topic ``map_markers`` (visualization_msgs/MarkerArray, transient local): cell outlines and
  object centroids coloured by class, bounded in size.

A map that cannot be read is logged in one line; the node then serves an empty map and answers
every request with success=False and the reason.
"""
from __future__ import annotations

import math
import pickle
import time
from dataclasses import dataclass
from typing import Optional

import rclpy
from rcl_interfaces.msg import ParameterDescriptor, ParameterType
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from visualization_msgs.msg import MarkerArray

from spatialoc_ros.data.constants import SPLITS
from spatialoc_ros.data.kitti360pose import Cell
from spatialoc_ros.data.loading import DataFormatError
from spatialoc_ros.data.safe_pickle import UnsafePickleError
from spatialoc_ros.ros import conversions
from spatialoc_ros.ros.params import declare_or_default
from spatialoc_ros.srv import GetMapCells

NODE_NAME = "map_server"
#: Transient-local, depth 1: late subscribers (rviz) still get the map once.
MAP_MARKERS_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST,
    depth=1,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.TRANSIENT_LOCAL,
)


@dataclass(frozen=True)
class MapServerConfig:
    """The node's parameters, read once at start (all read-only afterwards)."""

    base_path: str = ""
    scenes: tuple[str, ...] = ()
    split: str = "test"
    cloud_path: str = ""
    cell_size: float = 30.0
    cell_stride: float = 10.0
    min_objects: int = 6
    frame_id: str = "map"
    max_marker_cells: int = 2000
    max_marker_objects: int = 20000


#: name -> (description, type); defaults come from MapServerConfig.
PARAMETERS: dict[str, tuple[str, int]] = {
    "base_path": (
        "KITTI360Pose-format folder (cells/<scene>.pkl, poses/<scene>.pkl). '' = the embedded "
        "synthetic city, generated on first start.",
        ParameterType.PARAMETER_STRING,
    ),
    "scenes": (
        "Scenes to serve (full drive names, e.g. 2013_05_28_drive_0003_sync). Unset or empty = "
        "the scenes of `split`.",
        ParameterType.PARAMETER_STRING_ARRAY,
    ),
    "split": ("Split served when `scenes` is empty: train | val | test | all.", ParameterType.PARAMETER_STRING),
    "cloud_path": (
        "A labelled point cloud (.npz with xyz, rgb, label, instance; or .ply/.pcd via open3d) cut into "
        "cells instead of reading base_path. '' = off.",
        ParameterType.PARAMETER_STRING,
    ),
    "cell_size": ("Edge of a cell cut from cloud_path, metres.", ParameterType.PARAMETER_DOUBLE),
    "cell_stride": ("Grid step between cells cut from cloud_path, metres.", ParameterType.PARAMETER_DOUBLE),
    "min_objects": ("Cells cut from cloud_path with fewer objects are dropped.", ParameterType.PARAMETER_INTEGER),
    "frame_id": ("Frame of the map markers (world metres of the cells).", ParameterType.PARAMETER_STRING),
    "max_marker_cells": ("At most this many cell outlines in map_markers.", ParameterType.PARAMETER_INTEGER),
    "max_marker_objects": ("At most this many object centroids in map_markers.", ParameterType.PARAMETER_INTEGER),
}


def check_config(cfg: MapServerConfig) -> Optional[str]:
    """Why ``cfg`` is invalid, or None."""
    if not cfg.scenes and cfg.split not in SPLITS:
        return f"split must be one of {sorted(SPLITS)}, got {cfg.split!r}"
    if not (cfg.cell_size > 0 and cfg.cell_stride > 0 and math.isfinite(cfg.cell_size + cfg.cell_stride)):
        return f"cell_size ({cfg.cell_size}) and cell_stride ({cfg.cell_stride}) must be positive"
    if cfg.min_objects < 1:
        return f"min_objects must be >= 1, got {cfg.min_objects}"
    if not cfg.frame_id.strip():
        return "frame_id must not be empty"
    if cfg.max_marker_cells < 0 or cfg.max_marker_objects < 0:
        return "max_marker_cells and max_marker_objects must be >= 0"
    return None


def load_map(cfg: MapServerConfig, log=print) -> list[Cell]:
    """The cells ``cfg`` names. Raises DataFormatError / UnsafePickleError / ValueError / OSError
    with a readable message when the source cannot be used."""
    if cfg.cloud_path:
        from spatialoc_ros.data.cloud_cells import CellCutConfig, cells_from_cloud_file

        cut = CellCutConfig(cell_size=cfg.cell_size, cell_stride=cfg.cell_stride, min_objects=cfg.min_objects)
        log(f"cutting {cfg.cloud_path} into {cfg.cell_size:g} m cells every {cfg.cell_stride:g} m")
        return cells_from_cloud_file(cfg.cloud_path, cfg=cut)

    from spatialoc_ros.data.loading import load_scenes, scenes_of_split

    base = cfg.base_path
    if not base:
        from spatialoc_ros.data.synthetic import default_city_path, ensure_default_city

        log(f"base_path is '': using the embedded synthetic city at {default_city_path()}")
        base = ensure_default_city(log=log)
    scenes = list(cfg.scenes) if cfg.scenes else scenes_of_split(base, cfg.split)
    return load_scenes(base, scenes, with_direction=False).cells


class MapServerNode(Node):
    """Loads the map once, then serves it (see the module docstring)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(NODE_NAME, **kwargs)
        self.cfg = self._read_parameters()
        self.cells: list[Cell] = []
        self.error: Optional[str] = None
        self._cell_msgs: dict[str, object] = {}

        self._markers_pub = self.create_publisher(MarkerArray, "map_markers", MAP_MARKERS_QOS)
        self._load()
        self._service = self.create_service(GetMapCells, "get_map_cells", self._on_get_map_cells)
        self._publish_markers()
        self.get_logger().info(
            f"serving {len(self.cells)} cells on {self._service.srv_name}"
            + (f" (error: {self.error})" if self.error else "")
        )

    # ----------------------------------------------------------------- set-up
    def _read_parameters(self) -> MapServerConfig:
        defaults = MapServerConfig()
        for name, (description, ptype) in PARAMETERS.items():
            descriptor = ParameterDescriptor(description=description, type=ptype, read_only=True)
            if name == "scenes":  # an empty list has no type in ROS 2: declare by type, unset
                self.declare_parameter(name, Parameter.Type.STRING_ARRAY, descriptor)
            else:
                declare_or_default(self, name, getattr(defaults, name), descriptor)
        scenes = self.get_parameter_or("scenes", Parameter("scenes", value=None)).value or []
        cfg = MapServerConfig(
            base_path=self.get_parameter("base_path").value,
            scenes=tuple(s for s in scenes if s),
            split=self.get_parameter("split").value,
            cloud_path=self.get_parameter("cloud_path").value,
            cell_size=float(self.get_parameter("cell_size").value),
            cell_stride=float(self.get_parameter("cell_stride").value),
            min_objects=int(self.get_parameter("min_objects").value),
            frame_id=self.get_parameter("frame_id").value,
            max_marker_cells=int(self.get_parameter("max_marker_cells").value),
            max_marker_objects=int(self.get_parameter("max_marker_objects").value),
        )
        return cfg

    def _load(self) -> None:
        problem = check_config(self.cfg)
        if problem is not None:
            self._fail(f"invalid parameters: {problem}")
            return
        t0 = time.perf_counter()
        try:
            cells = load_map(self.cfg, log=self.get_logger().info)
        except (DataFormatError, UnsafePickleError, ValueError, OSError, pickle.UnpicklingError) as e:
            self._fail(f"cannot load the map: {e}")
            return
        if not cells:
            self._fail("the map source holds no cells (nothing to localise in)")
            return
        try:
            self._cell_msgs = {c.id: conversions.cell_to_msg(c) for c in cells}
        except ValueError as e:
            self._fail(f"cannot convert the map to messages: {e}")
            return
        self.cells = cells
        n_objects = sum(len(c.objects) for c in cells)
        scenes = sorted({str(c.scene_name) for c in cells})
        self.get_logger().info(
            f"loaded {len(cells)} cells, {n_objects} objects, scenes {', '.join(scenes)} "
            f"in {time.perf_counter() - t0:.1f} s"
        )

    def _fail(self, reason: str) -> None:
        self.error = reason
        self.cells = []
        self._cell_msgs = {}
        self.get_logger().error(f"{reason}; serving an empty map (get_map_cells answers success=False)")

    def _publish_markers(self) -> None:
        markers = conversions.map_markers(
            self.cells,
            self.cfg.frame_id,
            self.get_clock().now().to_msg(),
            max_cells=self.cfg.max_marker_cells,
            max_objects=self.cfg.max_marker_objects,
        )
        self._markers_pub.publish(markers)

    # ----------------------------------------------------------------- service
    def _on_get_map_cells(self, request: GetMapCells.Request, response: GetMapCells.Response):
        if self.error is not None:
            response.success = False
            response.message = self.error
            return response
        circle = None
        if request.use_circle:
            values = (request.center_x, request.center_y, request.radius)
            if not all(math.isfinite(v) for v in values) or request.radius <= 0:
                response.success = False
                response.message = (
                    f"invalid circle (center {request.center_x}, {request.center_y}, radius {request.radius}): "
                    "need finite values and radius > 0"
                )
                return response
            circle = values
        selected = conversions.select_cells(self.cells, request.scene, circle)
        response.cells = [self._cell_msgs[c.id] for c in selected]
        response.success = True
        where = f" in scene {request.scene!r}" if request.scene else ""
        if circle is not None:
            where += f" within {circle[2]:g} m of ({circle[0]:g}, {circle[1]:g})"
        response.message = f"{len(selected)} of {len(self.cells)} cells{where}"
        self.get_logger().info(f"get_map_cells: {response.message}")
        return response


def main(args=None) -> int:
    try:
        with rclpy.init(args=args):
            node = MapServerNode()
            rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        return 0  # Ctrl-C / SIGTERM: a normal way to stop a node
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
