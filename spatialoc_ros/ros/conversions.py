"""Pure conversions between the project's data and ROS 2 messages.

No node, no rclpy context: every function takes plain values (numpy arrays, :class:`Cell`,
hypotheses) and returns messages, or the reverse, so each one is unit-tested on its own.

Units and frames:
- Map cells keep the KITTI360Pose convention: object points are cell-normalised
  (``world = bbox_w[0:3] + xyz * cell_size``), ``bbox_w`` is in world metres.
- Hypotheses (see :class:`spatialoc_ros.inference.Hypothesis`) carry ``mean_xy`` in world metres
  and ``cov_xy`` in m^2; they become poses in the map frame with z = 0 and identity orientation.
- Pose covariances are 6x6 row-major over (x, y, z, roll, pitch, yaw): the x-y block is the
  model's covariance, the other four variances are :data:`UNKNOWN_VARIANCE`, cross terms 0.
"""
from __future__ import annotations

import array
import math
from typing import Iterable, Optional, Sequence

import numpy as np
from builtin_interfaces.msg import Duration, Time
from geometry_msgs.msg import (
    Point,
    Pose,
    PoseArray,
    PoseWithCovariance,
    PoseWithCovarianceStamped,
    Quaternion,
)
from sensor_msgs.msg import PointCloud2, PointField
from std_msgs.msg import ColorRGBA, Header
from visualization_msgs.msg import Marker, MarkerArray

from spatialoc_ros.data.constants import CLASSES, PAD_LABEL
from spatialoc_ros.data.kitti360pose import Cell, Object3d
from spatialoc_ros.msg import Hint as HintMsg
from spatialoc_ros.msg import Hypothesis as HypothesisMsg
from spatialoc_ros.msg import HypothesisArray, MapCell, MapObject

#: Variance (m^2 or rad^2) written for the pose components the model does not estimate.
UNKNOWN_VARIANCE = 1.0e6
#: Fields of the point clouds inside MapObject, in this order, all float32.
CLOUD_FIELDS: tuple[str, ...] = ("x", "y", "z", "r", "g", "b")
_FLOAT32_SIZE = 4

# One colour per object class (index order of CLASSES, padding excluded), chosen to be told
# apart on a dark rviz background; grey for anything unknown.
_CLASS_COLORS = np.array(
    [
        [0.85, 0.33, 0.10],  # building
        [0.93, 0.69, 0.13],  # pole
        [1.00, 0.10, 0.10],  # traffic light
        [1.00, 0.85, 0.00],  # traffic sign
        [0.55, 0.27, 0.07],  # garage
        [0.80, 0.00, 0.40],  # stop
        [0.99, 0.85, 0.50],  # smallpole
        [1.00, 1.00, 0.60],  # lamp
        [0.50, 0.50, 0.00],  # trash bin
        [0.00, 0.75, 0.75],  # vending machine
        [0.75, 0.50, 0.25],  # box
        [0.50, 0.25, 0.50],  # road
        [0.96, 0.14, 0.91],  # sidewalk
        [0.98, 0.67, 0.63],  # parking
        [0.40, 0.40, 0.61],  # wall
        [0.75, 0.60, 0.60],  # fence
        [0.71, 0.65, 0.71],  # guard rail
        [0.59, 0.39, 0.39],  # bridge
        [0.59, 0.47, 0.35],  # tunnel
        [0.42, 0.56, 0.14],  # vegetation
        [0.60, 0.98, 0.60],  # terrain
    ],
    dtype=np.float64,
)
_UNKNOWN_COLOR = np.array([0.6, 0.6, 0.6])


def class_color(label: str) -> np.ndarray:
    """RGB in [0, 1] used for ``label`` in markers and plots (grey when unknown)."""
    try:
        index = CLASSES.index(label)
    except ValueError:
        return _UNKNOWN_COLOR.copy()
    if CLASSES[index] == PAD_LABEL:
        return _UNKNOWN_COLOR.copy()
    return _CLASS_COLORS[index].copy()


# --------------------------------------------------------------------------- point clouds


def xyzrgb_to_cloud(xyz: np.ndarray, rgb: np.ndarray, header: Optional[Header] = None) -> PointCloud2:
    """An unorganised PointCloud2 with float32 fields x, y, z, r, g, b.

    xyz: (N, 3); rgb: (N, 3) in [0, 1]. Values are written as given (no unit change).
    """
    xyz = np.asarray(xyz, dtype=np.float32).reshape(-1, 3)
    rgb = np.asarray(rgb, dtype=np.float32).reshape(-1, 3)
    if len(xyz) != len(rgb):
        raise ValueError(f"xyz has {len(xyz)} points but rgb has {len(rgb)}")
    points = np.ascontiguousarray(np.concatenate([xyz, rgb], axis=1), dtype="<f4")  # (N, 6)
    msg = PointCloud2()
    if header is not None:
        msg.header = header
    msg.height = 1
    msg.width = len(points)
    msg.fields = [
        PointField(name=name, offset=i * _FLOAT32_SIZE, datatype=PointField.FLOAT32, count=1)
        for i, name in enumerate(CLOUD_FIELDS)
    ]
    msg.is_bigendian = False
    msg.point_step = _FLOAT32_SIZE * len(CLOUD_FIELDS)
    msg.row_step = msg.point_step * msg.width
    msg.data = array.array("B", points.tobytes())
    msg.is_dense = bool(np.isfinite(points).all())
    return msg


_POINTFIELD_DTYPES = {
    PointField.INT8: "i1",
    PointField.UINT8: "u1",
    PointField.INT16: "i2",
    PointField.UINT16: "u2",
    PointField.INT32: "i4",
    PointField.UINT32: "u4",
    PointField.FLOAT32: "f4",
    PointField.FLOAT64: "f8",
}


def cloud_fields(msg: PointCloud2, names: Sequence[str]) -> np.ndarray:
    """Read the scalar fields ``names`` of any PointCloud2 as a (N, len(names)) float64 array.

    Honours field offsets, datatypes, point_step, row_step and endianness; raises ValueError
    when a field is missing or the buffer is shorter than the header says.
    """
    by_name = {f.name: f for f in msg.fields}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ValueError(
            f"PointCloud2 lacks field(s) {missing}; it has {sorted(by_name)}"
        )
    n_points = int(msg.width) * int(msg.height)
    if n_points == 0:
        return np.zeros((0, len(names)), dtype=np.float64)
    raw = np.frombuffer(msg.data, dtype=np.uint8)
    row_bytes = int(msg.width) * int(msg.point_step)
    if msg.point_step <= 0 or msg.row_step < row_bytes or len(raw) < msg.row_step * (msg.height - 1) + row_bytes:
        raise ValueError(
            f"PointCloud2 buffer of {len(raw)} bytes does not hold {msg.height}x{msg.width} points "
            f"of {msg.point_step} bytes (row_step {msg.row_step})"
        )
    rows = [raw[r * msg.row_step: r * msg.row_step + row_bytes] for r in range(msg.height)]
    packed = np.concatenate(rows).reshape(n_points, msg.point_step)
    order = ">" if msg.is_bigendian else "<"
    out = np.empty((n_points, len(names)), dtype=np.float64)
    for j, name in enumerate(names):
        field = by_name[name]
        if field.datatype not in _POINTFIELD_DTYPES:
            raise ValueError(f"PointCloud2 field {name!r} has unknown datatype {field.datatype}")
        dtype = np.dtype(order + _POINTFIELD_DTYPES[field.datatype])
        if field.offset + dtype.itemsize > msg.point_step:
            raise ValueError(f"PointCloud2 field {name!r} lies outside point_step {msg.point_step}")
        column = np.ascontiguousarray(packed[:, field.offset: field.offset + dtype.itemsize])
        out[:, j] = column.view(dtype).reshape(n_points)
    return out


def cloud_to_xyzrgb(msg: PointCloud2) -> tuple[np.ndarray, np.ndarray]:
    """(xyz (N, 3) float32, rgb (N, 3) float32) from a cloud with fields x, y, z, r, g, b."""
    values = cloud_fields(msg, CLOUD_FIELDS).astype(np.float32)
    return values[:, 0:3].copy(), values[:, 3:6].copy()


# --------------------------------------------------------------------------- map cells


def object_to_msg(obj: Object3d) -> MapObject:
    """MapObject of one Object3d (points stay cell-normalised)."""
    msg = MapObject()
    msg.id = int(obj.id)
    msg.instance_id = int(obj.instance_id)
    msg.label = str(obj.label)
    msg.points = xyzrgb_to_cloud(obj.xyz, obj.rgb)
    return msg


def msg_to_object(msg: MapObject) -> Object3d:
    xyz, rgb = cloud_to_xyzrgb(msg.points)
    return Object3d(id=int(msg.id), instance_id=int(msg.instance_id), xyz=xyz, rgb=rgb, label=msg.label)


def cell_to_msg(cell: Cell) -> MapCell:
    """MapCell of one Cell. ``scene`` is the cell's scene_name (short, e.g. '0003')."""
    bbox = np.asarray(cell.bbox_w, dtype=np.float64).reshape(-1)
    if bbox.shape != (6,):
        raise ValueError(f"cell {cell.id}: bbox_w must hold 6 numbers, got {bbox.shape}")
    msg = MapCell()
    msg.id = str(cell.id)
    msg.scene = str(cell.scene_name)
    msg.bbox_w = bbox
    msg.cell_size = float(cell.cell_size)
    msg.objects = [object_to_msg(o) for o in cell.objects]
    return msg


def msg_to_cell(msg: MapCell) -> Cell:
    return Cell(
        id=msg.id,
        scene_name=msg.scene,
        objects=[msg_to_object(o) for o in msg.objects],
        cell_size=float(msg.cell_size),
        bbox_w=np.array(msg.bbox_w, dtype=np.float64),
    )


def cells_to_msgs(cells: Iterable[Cell]) -> list[MapCell]:
    return [cell_to_msg(c) for c in cells]


def msgs_to_cells(msgs: Iterable[MapCell]) -> list[Cell]:
    return [msg_to_cell(m) for m in msgs]


def cell_center_xy(cell: Cell) -> np.ndarray:
    bbox = np.asarray(cell.bbox_w, dtype=np.float64)
    return 0.5 * (bbox[0:2] + bbox[3:5])


def select_cells(
    cells: Sequence[Cell],
    scene: str = "",
    circle: Optional[tuple[float, float, float]] = None,
) -> list[Cell]:
    """Cells of ``scene`` ('' = all; short '0003' or full drive name) whose centre lies within
    ``circle`` = (x, y, radius) in world metres (None = everywhere)."""
    wanted = _scene_aliases(scene) if scene else None
    out = []
    for cell in cells:
        if wanted is not None and str(cell.scene_name) not in wanted:
            continue
        if circle is not None:
            cx, cy, radius = circle
            centre = cell_center_xy(cell)
            if math.hypot(centre[0] - cx, centre[1] - cy) > radius:
                continue
        out.append(cell)
    return out


def _scene_aliases(scene: str) -> set[str]:
    names = {scene}
    parts = scene.split("_")
    if len(parts) == 6:  # full KITTI-360 drive name -> its short form
        names.add(parts[-2])
    return names


# --------------------------------------------------------------------------- Gaussians, poses


def covariance_6x6(cov_xy: np.ndarray, unknown_variance: float = UNKNOWN_VARIANCE) -> np.ndarray:
    """The 36 numbers (row-major 6x6 over x, y, z, roll, pitch, yaw) of a pose covariance whose
    x-y block is ``cov_xy`` (2x2, m^2, symmetrised) and whose other variances are unknown."""
    cov_xy = np.asarray(cov_xy, dtype=np.float64).reshape(2, 2)
    if not np.isfinite(cov_xy).all():
        raise ValueError(f"covariance is not finite: {cov_xy.tolist()}")
    full = np.zeros((6, 6), dtype=np.float64)
    full[0:2, 0:2] = 0.5 * (cov_xy + cov_xy.T)
    for i in range(2, 6):
        full[i, i] = unknown_variance
    return full.reshape(36)


def ellipse_axes(cov_xy: np.ndarray, n_sigma: float = 2.0) -> tuple[float, float, float]:
    """(major, minor, angle): semi-axes in metres of the ``n_sigma`` ellipse of a 2x2 covariance
    and the angle (radians) of the major axis from +x."""
    cov = np.asarray(cov_xy, dtype=np.float64).reshape(2, 2)
    eigval, eigvec = np.linalg.eigh(0.5 * (cov + cov.T))  # ascending
    eigval = np.clip(eigval, 0.0, None)
    major = n_sigma * math.sqrt(eigval[1])
    minor = n_sigma * math.sqrt(eigval[0])
    angle = math.atan2(eigvec[1, 1], eigvec[0, 1])
    return major, minor, angle


def ellipse_points(mean_xy: np.ndarray, cov_xy: np.ndarray, n_sigma: float = 2.0, n: int = 48) -> np.ndarray:
    """(n + 1, 2) closed polygon of the ``n_sigma`` ellipse around ``mean_xy`` (metres)."""
    major, minor, angle = ellipse_axes(cov_xy, n_sigma)
    t = np.linspace(0.0, 2.0 * math.pi, n + 1)
    local = np.stack([major * np.cos(t), minor * np.sin(t)], axis=1)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return np.asarray(mean_xy, dtype=np.float64)[None, 0:2] + local @ rot.T


def is_finite_hypothesis(hyp) -> bool:
    """True when the hypothesis' mean, covariance and score are all finite."""
    return bool(
        np.isfinite(np.asarray(hyp.mean_xy, dtype=np.float64)).all()
        and np.isfinite(np.asarray(hyp.cov_xy, dtype=np.float64)).all()
        and math.isfinite(float(hyp.score))
    )


def _pose_at(mean_xy: np.ndarray, z: float = 0.0) -> Pose:
    mean_xy = np.asarray(mean_xy, dtype=np.float64).reshape(-1)
    if not np.isfinite(mean_xy[0:2]).all():
        raise ValueError(f"mean is not finite: {mean_xy.tolist()}")
    return Pose(
        position=Point(x=float(mean_xy[0]), y=float(mean_xy[1]), z=float(z)),
        orientation=Quaternion(x=0.0, y=0.0, z=0.0, w=1.0),
    )


def gaussian_to_pose_with_covariance(
    mean_xy: np.ndarray, cov_xy: np.ndarray, unknown_variance: float = UNKNOWN_VARIANCE
) -> PoseWithCovariance:
    """PoseWithCovariance at ``mean_xy`` (world metres, z = 0, identity orientation)."""
    msg = PoseWithCovariance()
    msg.pose = _pose_at(mean_xy)
    msg.covariance = covariance_6x6(cov_xy, unknown_variance)
    return msg


def gaussian_to_pose_stamped(
    mean_xy: np.ndarray, cov_xy: np.ndarray, frame_id: str, stamp: Time,
    unknown_variance: float = UNKNOWN_VARIANCE,
) -> PoseWithCovarianceStamped:
    msg = PoseWithCovarianceStamped()
    msg.header = Header(frame_id=frame_id, stamp=stamp)
    msg.pose = gaussian_to_pose_with_covariance(mean_xy, cov_xy, unknown_variance)
    return msg


def hypothesis_to_pose_stamped(hyp, frame_id: str, stamp: Time) -> PoseWithCovarianceStamped:
    """The top hypothesis as the ``pose`` output (world metres, covariance as documented above)."""
    return gaussian_to_pose_stamped(hyp.mean_xy, hyp.cov_xy, frame_id, stamp)


def hypotheses_to_pose_array(hyps: Sequence, frame_id: str, stamp: Time) -> PoseArray:
    msg = PoseArray()
    msg.header = Header(frame_id=frame_id, stamp=stamp)
    msg.poses = [_pose_at(h.mean_xy) for h in hyps]
    return msg


def hypothesis_to_msg(hyp, rank: int) -> HypothesisMsg:
    msg = HypothesisMsg()
    msg.cell_id = str(hyp.cell_id)
    msg.scene = str(hyp.scene)
    msg.rank = int(rank)
    msg.score = float(hyp.score)
    msg.probability = float(hyp.probability)  # NaN only for cells given, not retrieved (never published)
    msg.pose = gaussian_to_pose_with_covariance(hyp.mean_xy, hyp.cov_xy)
    msg.pos_in_cell = np.asarray(hyp.pos_in_cell, dtype=np.float64).reshape(2)
    msg.cell_bbox_w = np.asarray(hyp.bbox_w, dtype=np.float64).reshape(6)
    major, minor, angle = ellipse_axes(hyp.cov_xy, 2.0)
    msg.ellipse_major_2sigma = major
    msg.ellipse_minor_2sigma = minor
    msg.ellipse_angle = angle
    return msg


def hypotheses_to_msg(
    hyps: Sequence, frame_id: str, stamp: Time, instruction: str = "", inference_ms: float = 0.0,
    understood=None, estimate=None, pose_published: bool = True,
) -> HypothesisArray:
    """HypothesisArray of ``hyps`` (best first); ``understood`` (a ParsedInstruction) fills the
    echo of what was read: the hints, the unread fragments with their reasons, one line;
    ``estimate`` (an inference.Estimate) the confidence and the published estimate."""
    msg = HypothesisArray()
    msg.header = Header(frame_id=frame_id, stamp=stamp)
    msg.instruction = instruction
    msg.inference_ms = float(inference_ms)
    msg.hypotheses = [hypothesis_to_msg(h, i) for i, h in enumerate(hyps)]
    msg.pose_published = bool(pose_published)
    if estimate is not None:
        msg.confidence = float(estimate.confidence)
        msg.estimate = gaussian_to_pose_with_covariance(estimate.mean_xy, estimate.cov_xy)
        msg.covariance_mode = str(estimate.covariance)
    if understood is not None:
        msg.understood = [hint_to_msg(h) for h in understood.hints]
        msg.unread = [f"'{f}' ({r})" for f, r in zip(understood.unread, understood.unread_reasons)]
        msg.interpretation = understood.describe()
    return msg


# --------------------------------------------------------------------------- hints


def hint_to_msg(hint) -> HintMsg:
    """spatialoc_ros/Hint of a :class:`spatialoc_ros.language.Hint` (colour None -> "")."""
    return HintMsg(direction=hint.direction, colour=hint.colour or "", label=hint.label)


def msg_to_hints(msgs: Sequence[HintMsg]) -> tuple[list, list[tuple[str, str]]]:
    """(valid language.Hint objects, (fragment, reason) per invalid message) of structured hints:
    names are matched case-insensitively, '_' as a space, 'grey' as 'gray'; anything else is refused."""
    from spatialoc_ros.language import Hint

    hints, problems = [], []
    for i, m in enumerate(msgs):
        direction = m.direction.strip().lower()
        colour = m.colour.strip().lower().replace("grey", "gray") or None
        label = m.label.strip().lower().replace("_", " ")
        try:
            hints.append(Hint(direction, colour, label))
        except ValueError as e:
            problems.append((f"hint {i} ({m.direction!r}, {m.colour!r}, {m.label!r})", str(e)))
    return hints, problems


def covariance_xy_of(msg_covariance: Sequence[float]) -> np.ndarray:
    """The 2x2 x-y block of a 36-element row-major pose covariance."""
    full = np.asarray(msg_covariance, dtype=np.float64).reshape(6, 6)
    return full[0:2, 0:2].copy()


# --------------------------------------------------------------------------- markers


def _color(rgb: Sequence[float], alpha: float = 1.0) -> ColorRGBA:
    return ColorRGBA(r=float(rgb[0]), g=float(rgb[1]), b=float(rgb[2]), a=float(alpha))


def _marker(kind: int, ns: str, marker_id: int, frame_id: str, stamp: Time) -> Marker:
    m = Marker()
    m.header = Header(frame_id=frame_id, stamp=stamp)
    m.ns = ns
    m.id = marker_id
    m.type = kind
    m.action = Marker.ADD
    m.pose.orientation.w = 1.0
    m.lifetime = Duration(sec=0, nanosec=0)
    return m


def _delete_all(frame_id: str, stamp: Time) -> Marker:
    m = Marker()
    m.header = Header(frame_id=frame_id, stamp=stamp)
    m.action = Marker.DELETEALL
    return m


def _square(bbox_w: np.ndarray, z: float) -> list[Point]:
    x0, y0, _, x1, y1, _ = (float(v) for v in np.asarray(bbox_w, dtype=np.float64))
    corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]
    return [Point(x=x, y=y, z=z) for x, y in corners]


def hypotheses_to_markers(hyps: Sequence, frame_id: str, stamp: Time, z: float = 0.2, estimate=None) -> MarkerArray:
    """Markers of one answer: a DELETEALL, then the top-k cells as squares (ns 'cells', line
    width and opacity growing with the cell's probability), each hypothesis's mean as a sphere
    sized by its probability (ns 'hypotheses'), one text per cell with rank, probability and
    score (ns 'scores'), and the published estimate (``estimate``, else the top-1 hypothesis): its
    2-sigma ellipse as a LINE_STRIP (ns 'ellipse') and its mean as a sphere (ns 'mean')."""
    out = MarkerArray()
    out.markers.append(_delete_all(frame_id, stamp))
    for rank, hyp in enumerate(hyps):
        p = float(hyp.probability) if math.isfinite(float(hyp.probability)) else 0.0
        square = _marker(Marker.LINE_STRIP, "cells", rank, frame_id, stamp)
        square.scale.x = 0.2 + 0.8 * p
        square.color = _color((0.1, 0.9, 0.1) if rank == 0 else (0.2, 0.6, 1.0), 0.3 + 0.7 * p)
        square.points = _square(hyp.bbox_w, z)
        out.markers.append(square)

        dot = _marker(Marker.SPHERE, "hypotheses", rank, frame_id, stamp)
        dot.pose.position = Point(x=float(hyp.mean_xy[0]), y=float(hyp.mean_xy[1]), z=z)
        dot.scale.x = dot.scale.y = dot.scale.z = 0.5 + 2.5 * p
        dot.color = _color((1.0, 0.6, 0.1), 0.4 + 0.6 * p)
        out.markers.append(dot)

        text = _marker(Marker.TEXT_VIEW_FACING, "scores", rank, frame_id, stamp)
        bbox = np.asarray(hyp.bbox_w, dtype=np.float64)
        text.pose.position = Point(x=float(0.5 * (bbox[0] + bbox[3])), y=float(bbox[4]) + 1.5, z=z + 1.0)
        text.scale.z = 2.5
        text.color = _color((1.0, 1.0, 1.0))
        text.text = f"#{rank + 1} {hyp.cell_id} p={p:.2f} score {float(hyp.score):.3f}"
        out.markers.append(text)
    if hyps:
        top = estimate if estimate is not None else hyps[0]
        ellipse = _marker(Marker.LINE_STRIP, "ellipse", 0, frame_id, stamp)
        ellipse.scale.x = 0.4
        ellipse.color = _color((1.0, 0.2, 0.2))
        ellipse.points = [Point(x=float(x), y=float(y), z=z) for x, y in ellipse_points(top.mean_xy, top.cov_xy)]
        out.markers.append(ellipse)

        mean = _marker(Marker.SPHERE, "mean", 0, frame_id, stamp)
        mean.pose.position = Point(x=float(top.mean_xy[0]), y=float(top.mean_xy[1]), z=z)
        mean.scale.x = mean.scale.y = mean.scale.z = 1.5
        mean.color = _color((1.0, 0.2, 0.2))
        out.markers.append(mean)
    return out


def map_markers(
    cells: Sequence[Cell], frame_id: str, stamp: Time, max_cells: int = 2000, max_objects: int = 20000
) -> MarkerArray:
    """Bounded markers of a whole map: a DELETEALL, one LINE_LIST of cell outlines (ns
    'cell_outlines', at most ``max_cells`` cells, evenly subsampled) and one SPHERE_LIST of object
    centroids coloured by class (ns 'object_centroids', at most ``max_objects``)."""
    out = MarkerArray()
    out.markers.append(_delete_all(frame_id, stamp))
    if not cells:
        return out
    shown = list(cells)
    if len(shown) > max_cells:
        keep = np.linspace(0, len(shown) - 1, max_cells).round().astype(int)
        shown = [shown[i] for i in keep]

    outlines = _marker(Marker.LINE_LIST, "cell_outlines", 0, frame_id, stamp)
    outlines.scale.x = 0.15
    outlines.color = _color((0.8, 0.8, 0.8), 0.5)
    for cell in shown:
        corners = _square(cell.bbox_w, 0.0)
        for a, b in zip(corners[:-1], corners[1:]):
            outlines.points.extend([a, b])
    out.markers.append(outlines)

    centres, colors = [], []
    for cell in cells:
        bbox = np.asarray(cell.bbox_w, dtype=np.float64)
        for obj in cell.objects:
            if len(obj.xyz) == 0:
                continue
            world = bbox[0:3] + np.asarray(obj.get_center(), dtype=np.float64) * float(cell.cell_size)
            if not np.isfinite(world).all():
                continue
            centres.append(world)
            colors.append(class_color(obj.label))
    if len(centres) > max_objects:
        keep = np.linspace(0, len(centres) - 1, max_objects).round().astype(int)
        centres = [centres[i] for i in keep]
        colors = [colors[i] for i in keep]
    if centres:
        dots = _marker(Marker.SPHERE_LIST, "object_centroids", 0, frame_id, stamp)
        dots.scale.x = dots.scale.y = dots.scale.z = 0.8
        dots.color = _color((1.0, 1.0, 1.0))
        dots.points = [Point(x=float(p[0]), y=float(p[1]), z=float(p[2])) for p in centres]
        dots.colors = [_color(c) for c in colors]
        out.markers.append(dots)
    return out
