"""The ``map_server`` lifecycle node: serves KITTI360Pose-style map cells over ROS 2.

Map source, in this order of precedence:
- ``cloud_path``: a user's labelled point cloud (.npz / .ply / .pcd), cut into cells
  (:mod:`spatialoc_ros.data.cloud_cells`, the same cutter the synthetic generator uses);
- ``base_path``: a KITTI360Pose folder (the release, or a synthetic city), scenes from ``scenes``
  or else from ``split``;
- neither: the embedded synthetic city (generated on first start, which is logged).

Lifecycle: **configure** reads and validates the map (bad cells are dropped with a logged reason,
:mod:`spatialoc_ros.data.validation`; a source that cannot be read, or holds no good cell, fails
the transition with one ERROR line naming the cause, and the node stays unconfigured and alive);
**activate** starts serving and publishes the markers; **deactivate** stops serving;
**cleanup** frees the map. ``autostart`` (default true) configures and activates by itself.

Interfaces (relative names; put the node in a namespace with ``-r __ns:=/spatialoc``):
- service ``get_map_cells`` (spatialoc_ros/srv/GetMapCells): cells filtered by scene and by a
  world x-y circle, with the map's ``frame_id``; when not active it answers success=False with
  the reason;
- topic ``map_markers`` (visualization_msgs/MarkerArray, transient local): cell outlines and
  object centroids coloured by class, bounded in size;
- ``~/status`` (``<namespace>/map_server/status``; the namespace's ``status`` is the localizer's)
  and ``/diagnostics`` (see :mod:`spatialoc_ros.ros.lifecycle_base`).
"""
from __future__ import annotations

import math
import pickle
import time
from dataclasses import dataclass, fields
from typing import Any, Optional

from rclpy.lifecycle import LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rcl_interfaces.msg import ParameterDescriptor
from visualization_msgs.msg import MarkerArray

from spatialoc_ros.data.constants import SPLITS
from spatialoc_ros.data.kitti360pose import Cell
from spatialoc_ros.data.loading import DataFormatError
from spatialoc_ros.data.safe_pickle import UnsafePickleError
from spatialoc_ros.data.validation import validate_cells
from spatialoc_ros.ros import conversions
from spatialoc_ros.ros.lifecycle_base import COMMON_PARAMETERS, SpatialocLifecycleNode, reliable_qos, spin
from spatialoc_ros.ros.params import ParamSpec, frame_problem
from spatialoc_ros.srv import GetMapCells

NODE_NAME = "map_server"
#: Transient-local, depth 1: late subscribers (rviz) still get the map once.
MAP_MARKERS_QOS = reliable_qos(1, latched=True)


def _split_problem(value: Any) -> Optional[str]:
    return None if value in SPLITS else f"split must be one of {sorted(SPLITS)}, got {value!r}"


#: Every parameter of the node but ``scenes`` (a string array, declared by type: an empty list has
#: no type in ROS 2). config/map_server.yaml mirrors these.
PARAMETERS: dict[str, ParamSpec] = {
    "base_path": ParamSpec(
        "", "KITTI360Pose-format folder (cells/<scene>.pkl, poses/<scene>.pkl). '' = the embedded synthetic "
            "city, generated on first start."),
    "split": ParamSpec("test", "Split served when `scenes` is empty: train | val | test | all.", check=_split_problem),
    "cloud_path": ParamSpec(
        "", "A labelled point cloud (.npz with xyz, rgb, label, instance; or .ply/.pcd via open3d) cut into "
            "cells instead of reading base_path. '' = off."),
    "cell_size": ParamSpec(30.0, "Edge of a cell cut from cloud_path, metres.", 1.0, 1000.0),
    "cell_stride": ParamSpec(10.0, "Grid step between cells cut from cloud_path, metres.", 0.5, 1000.0),
    "min_objects": ParamSpec(6, "Cells cut from cloud_path with fewer objects are dropped.", 1, 1000),
    "frame_id": ParamSpec(
        "map", "Frame of the cells' world coordinates: the map markers, and the frame the localizer "
               "publishes in (it reads it from get_map_cells).", check=frame_problem),
    "max_marker_cells": ParamSpec(2000, "At most this many cell outlines in map_markers.", 0, 1_000_000),
    "max_marker_objects": ParamSpec(20000, "At most this many object centroids in map_markers.", 0, 10_000_000),
}
SCENES_DESCRIPTION = ("Scenes to serve (full drive names, e.g. 2013_05_28_drive_0003_sync). Unset or empty = "
                      "the scenes of `split`.")


@dataclass(frozen=True)
class MapServerConfig:
    """The node's parameters as read at configure."""

    autostart: bool = True
    diagnostics_period_s: float = 1.0
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


assert {f.name for f in fields(MapServerConfig)} == set(PARAMETERS) | set(COMMON_PARAMETERS) | {"scenes"}
assert all(getattr(MapServerConfig, n) == spec.default for n, spec in PARAMETERS.items()), \
    "MapServerConfig defaults and PARAMETERS disagree"


def load_map(cfg: MapServerConfig, log=print, warn=print) -> list[Cell]:
    """The good cells ``cfg`` names (bad ones dropped, one ``warn`` line). Raises DataFormatError /
    UnsafePickleError / ValueError / OSError with a readable message when the source cannot be used."""
    if cfg.cloud_path:
        from spatialoc_ros.data.cloud_cells import CellCutConfig, cells_from_cloud_file

        cut = CellCutConfig(cell_size=cfg.cell_size, cell_stride=cfg.cell_stride, min_objects=cfg.min_objects)
        log(f"cutting {cfg.cloud_path} into {cfg.cell_size:g} m cells every {cfg.cell_stride:g} m")
        cells = cells_from_cloud_file(cfg.cloud_path, cfg=cut, log=warn)
        return validate_cells(cells, log=warn, what=f"cells cut from {cfg.cloud_path}").good

    from spatialoc_ros.data.loading import load_scenes, scenes_of_split

    base = cfg.base_path
    if not base:
        from spatialoc_ros.data.synthetic import default_city_path, ensure_default_city

        log(f"base_path is '': using the embedded synthetic city at {default_city_path()}")
        base = ensure_default_city(log=log)
    scenes = list(cfg.scenes) if cfg.scenes else scenes_of_split(base, cfg.split)
    return load_scenes(base, scenes, with_direction=False, log=warn).cells


class MapServerNode(SpatialocLifecycleNode):
    """Loads the map at configure, serves it while active (see the module docstring)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(NODE_NAME, PARAMETERS, status_topic="~/status", **kwargs)
        self.declare_parameter("scenes", Parameter.Type.STRING_ARRAY,
                               ParameterDescriptor(description=SCENES_DESCRIPTION + " (takes effect at the next configure)"))
        self.cfg: Optional[MapServerConfig] = None
        self.cells: list[Cell] = []
        self._cell_msgs: dict[str, object] = {}
        self._markers_pub = None
        self._service = self.create_service(GetMapCells, "get_map_cells", self._on_get_map_cells,
                                            callback_group=self._io_group)
        self.set_phase("unconfigured")

    def status_values(self) -> dict[str, str]:
        return {"cells": str(len(self.cells)), "frame": self.cfg.frame_id if self.cfg else "?"}

    # ----------------------------------------------------------------- lifecycle
    def _read_config(self) -> MapServerConfig:
        values = self.parameter_values()
        scenes = self.get_parameter_or("scenes", Parameter("scenes", value=None)).value or []
        return MapServerConfig(**values, scenes=tuple(s for s in scenes if s))

    def configure_node(self) -> TransitionCallbackReturn:
        problem = self.parameter_problem()
        if problem is not None:
            return self.refuse_transition("configure", f"{problem}; set valid values and configure again")
        self.cfg = cfg = self._read_config()
        self.set_phase("loading_map")
        t0 = time.perf_counter()
        log = self.get_logger()
        try:
            cells = load_map(cfg, log=log.info, warn=log.warning)
        except (DataFormatError, UnsafePickleError, ValueError, OSError, pickle.UnpicklingError) as e:
            return self.refuse_transition("configure", f"cannot load the map: {e}")
        except Exception as e:  # noqa: BLE001 - rclpy turns an escaping exception into a silent ERROR
            return self.refuse_transition("configure", f"cannot load the map: {type(e).__name__}: {e}")
        msgs = {}
        for cell in cells:
            try:
                msgs[cell.id] = conversions.cell_to_msg(cell)
            except ValueError as e:
                log.warning(f"cell {cell.id} cannot be sent and is dropped: {e}")
        cells = [c for c in cells if c.id in msgs]
        if not cells:
            return self.refuse_transition("configure", "the map source holds no usable cell (nothing to localise in)")
        self.cells, self._cell_msgs = cells, msgs
        self._markers_pub = self.create_lifecycle_publisher(MarkerArray, "map_markers", MAP_MARKERS_QOS)
        n_objects = sum(len(c.objects) for c in cells)
        scenes = sorted({str(c.scene_name) for c in cells})
        log.info(f"loaded {len(cells)} cells, {n_objects} objects, scenes {', '.join(scenes)} "
                 f"in {time.perf_counter() - t0:.1f} s (frame {cfg.frame_id})")
        self.set_phase("inactive")
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        result = super().on_activate(state)
        self._markers_pub.publish(conversions.map_markers(
            self.cells, self.cfg.frame_id, self.get_clock().now().to_msg(),
            max_cells=self.cfg.max_marker_cells, max_objects=self.cfg.max_marker_objects,
        ))
        self.get_logger().info(f"serving {len(self.cells)} cells on {self._service.srv_name}")
        self.set_phase("ready")
        return result

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.set_phase("inactive")
        return super().on_deactivate(state)

    def release(self) -> None:
        if self._markers_pub is not None:
            self.destroy_lifecycle_publisher(self._markers_pub)
            self._markers_pub = None
        self.cells, self._cell_msgs = [], {}

    # ----------------------------------------------------------------- service
    def _on_get_map_cells(self, request: GetMapCells.Request, response: GetMapCells.Response):
        if self.phase != "ready":
            response.success = False
            response.message = (f"map_server is not active (state {self.phase}, lifecycle {self.lifecycle_state}"
                                + (f": {self._detail}" if self._detail else "") + ")")
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
        response.frame_id = self.cfg.frame_id
        where = f" in scene {request.scene!r}" if request.scene else ""
        if circle is not None:
            where += f" within {circle[2]:g} m of ({circle[0]:g}, {circle[1]:g})"
        response.message = f"{len(selected)} of {len(self.cells)} cells{where}"
        self.get_logger().info(f"get_map_cells: {response.message}")
        return response


def main(args=None) -> int:
    return spin(MapServerNode, args, threads=2)


if __name__ == "__main__":
    raise SystemExit(main())
