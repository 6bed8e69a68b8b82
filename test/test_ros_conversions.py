"""The ROS layer's pure parts, without a ROS graph: message conversions, instruction checks,
parameter checks, cutting a labelled point cloud into cells."""
import math

import numpy as np
import pytest

from spatialoc_ros.data.kitti360pose import Cell, Object3d
from spatialoc_ros.inference import Hypothesis
from spatialoc_ros.ros import conversions as conv
from spatialoc_ros.ros.instruction import check_instruction

from ros_helpers import street_cloud as _street_cloud


def _hyp(mean=(12.0, -3.0), cov=((4.0, 1.0), (1.0, 2.0)), score=1.5, cell_id="0003_00001") -> Hypothesis:
    bbox = np.array([0.0, -20.0, -1.0, 30.0, 10.0, 29.0])
    mean = np.asarray(mean, dtype=np.float64)
    return Hypothesis(
        cell_id=cell_id, scene="0003", score=score, mean_xy=mean, cov_xy=np.asarray(cov, dtype=np.float64),
        pos_in_cell=(mean - bbox[0:2]) / 30.0, bbox_w=bbox,
    )


def _cell(cell_id="0003_00007", n_objects=3, seed=0) -> Cell:
    rng = np.random.default_rng(seed)
    objects = [
        Object3d(id=i, instance_id=100 + i, xyz=rng.uniform(-0.2, 1.2, (5 + i, 3)), rgb=rng.uniform(0, 1, (5 + i, 3)),
                 label=["building", "pole", "traffic light"][i % 3])
        for i in range(n_objects)
    ]
    return Cell(id=cell_id, scene_name="0003", objects=objects, cell_size=30.0,
                bbox_w=np.array([100.0, 200.0, -2.0, 130.0, 230.0, 28.0]))


# --------------------------------------------------------------------------- point clouds

def test_pointcloud2_round_trip_keeps_values_and_layout():
    rng = np.random.default_rng(1)
    xyz = rng.normal(size=(50, 3)).astype(np.float32)
    rgb = rng.uniform(size=(50, 3)).astype(np.float32)
    msg = conv.xyzrgb_to_cloud(xyz, rgb)
    assert [f.name for f in msg.fields] == ["x", "y", "z", "r", "g", "b"]
    assert all(f.datatype == 7 and f.count == 1 for f in msg.fields)  # FLOAT32
    assert (msg.height, msg.width, msg.point_step, msg.row_step) == (1, 50, 24, 1200)
    assert len(msg.data) == 1200 and not msg.is_bigendian and msg.is_dense
    xyz2, rgb2 = conv.cloud_to_xyzrgb(msg)
    np.testing.assert_array_equal(xyz2, xyz)
    np.testing.assert_array_equal(rgb2, rgb)


def test_pointcloud2_empty_and_mismatched():
    xyz, rgb = conv.cloud_to_xyzrgb(conv.xyzrgb_to_cloud(np.zeros((0, 3)), np.zeros((0, 3))))
    assert xyz.shape == (0, 3) and rgb.shape == (0, 3)
    with pytest.raises(ValueError, match="rgb has"):
        conv.xyzrgb_to_cloud(np.zeros((3, 3)), np.zeros((2, 3)))


def test_pointcloud2_reader_handles_foreign_layout():
    """A big-endian cloud with padding, other field order and float64 fields (e.g. from another driver)."""
    from sensor_msgs.msg import PointCloud2, PointField

    n = 7
    dtype = np.dtype([("b", ">f8"), ("pad", "V4"), ("x", ">f4"), ("y", ">f4"), ("z", ">f4"), ("r", ">f8"), ("g", ">f8")])
    arr = np.zeros(n, dtype=dtype)
    for i, name in enumerate(["x", "y", "z", "r", "g", "b"]):
        arr[name] = np.arange(n) + 10 * i
    msg = PointCloud2(height=1, width=n, is_bigendian=True, point_step=dtype.itemsize, row_step=dtype.itemsize * n)
    msg.fields = [PointField(name=name, offset=dtype.fields[name][1], datatype=7 if dtype[name].itemsize == 4 else 8, count=1)
                  for name in ("b", "x", "y", "z", "r", "g")]
    msg.data = arr.tobytes()
    xyz, rgb = conv.cloud_to_xyzrgb(msg)
    np.testing.assert_array_equal(xyz[:, 1], np.arange(n) + 10)
    np.testing.assert_array_equal(rgb[:, 2], np.arange(n) + 50)
    msg.fields = msg.fields[1:]
    with pytest.raises(ValueError, match="lacks field"):
        conv.cloud_to_xyzrgb(msg)
    msg.fields = [PointField(name=c, offset=0, datatype=7, count=1) for c in "xyzrgb"]
    msg.data = msg.data[:10]
    with pytest.raises(ValueError, match="does not hold"):
        conv.cloud_to_xyzrgb(msg)


# --------------------------------------------------------------------------- cells

def test_map_cell_round_trip():
    cell = _cell()
    msg = conv.cell_to_msg(cell)
    assert msg.id == cell.id and msg.scene == "0003" and msg.cell_size == 30.0
    assert list(msg.bbox_w) == list(cell.bbox_w)
    back = conv.msg_to_cell(msg)
    assert (back.id, back.scene_name, back.cell_size) == (cell.id, cell.scene_name, cell.cell_size)
    np.testing.assert_array_equal(back.bbox_w, cell.bbox_w)
    assert len(back.objects) == len(cell.objects)
    for a, b in zip(cell.objects, back.objects):
        assert (a.id, a.instance_id, a.label) == (b.id, b.instance_id, b.label)
        np.testing.assert_allclose(b.xyz, a.xyz, atol=1e-6)  # float32 on the wire
        np.testing.assert_allclose(b.rgb, a.rgb, atol=1e-6)


def test_map_cell_without_objects_round_trips():
    cell = _cell(n_objects=0)
    back = conv.msg_to_cell(conv.cell_to_msg(cell))
    assert back.objects == [] and back.id == cell.id


def test_select_cells_by_scene_and_circle():
    cells = [_cell("0003_00001"), _cell("0005_00002")]
    cells[1].scene_name = "0005"
    cells[1].bbox_w = np.array([1000.0, 0.0, 0.0, 1030.0, 30.0, 30.0])
    assert [c.id for c in conv.select_cells(cells, "0005")] == ["0005_00002"]
    assert [c.id for c in conv.select_cells(cells, "2013_05_28_drive_0003_sync")] == ["0003_00001"]
    assert len(conv.select_cells(cells, "")) == 2
    assert [c.id for c in conv.select_cells(cells, "", (115.0, 215.0, 1.0))] == ["0003_00001"]
    assert conv.select_cells(cells, "", (0.0, 0.0, 5.0)) == []


# --------------------------------------------------------------------------- Gaussians

def test_covariance_6x6_layout():
    cov = conv.covariance_6x6(np.array([[4.0, 1.0], [1.0, 2.0]]))
    full = np.asarray(cov).reshape(6, 6)
    assert cov.shape == (36,)
    assert (cov[0], cov[1], cov[6], cov[7]) == (4.0, 1.0, 1.0, 2.0)  # row-major x-y block
    for i in (14, 21, 28, 35):
        assert cov[i] == conv.UNKNOWN_VARIANCE
    off = full.copy()
    off[0:2, 0:2] = 0
    np.fill_diagonal(off, 0)
    assert not off.any()
    np.testing.assert_array_equal(full, full.T)
    assert np.linalg.eigvalsh(full).min() > 0


def test_covariance_rejects_nan():
    with pytest.raises(ValueError, match="not finite"):
        conv.covariance_6x6(np.array([[np.nan, 0], [0, 1.0]]))


def test_hypothesis_to_pose_stamped():
    from builtin_interfaces.msg import Time

    msg = conv.hypothesis_to_pose_stamped(_hyp(), "map", Time(sec=5, nanosec=6))
    assert msg.header.frame_id == "map" and msg.header.stamp.sec == 5
    p = msg.pose.pose
    assert (p.position.x, p.position.y, p.position.z) == (12.0, -3.0, 0.0)
    assert (p.orientation.x, p.orientation.y, p.orientation.z, p.orientation.w) == (0.0, 0.0, 0.0, 1.0)
    np.testing.assert_array_equal(conv.covariance_xy_of(msg.pose.covariance), [[4.0, 1.0], [1.0, 2.0]])
    assert all(math.isfinite(v) for v in msg.pose.covariance)


def test_hypotheses_messages_and_ellipse():
    from builtin_interfaces.msg import Time

    hyps = [_hyp(score=2.0), _hyp(mean=(1.0, 1.0), score=1.0, cell_id="0003_00002")]
    arr = conv.hypotheses_to_pose_array(hyps, "map", Time())
    assert len(arr.poses) == 2 and arr.header.frame_id == "map"
    detail = conv.hypotheses_to_msg(hyps, "map", Time(), "the text", 12.5)
    assert detail.instruction == "the text" and detail.inference_ms == 12.5
    assert [h.rank for h in detail.hypotheses] == [0, 1]
    assert [h.cell_id for h in detail.hypotheses] == ["0003_00001", "0003_00002"]
    h0 = detail.hypotheses[0]
    eig = np.linalg.eigvalsh([[4.0, 1.0], [1.0, 2.0]])
    assert h0.ellipse_major_2sigma == pytest.approx(2 * math.sqrt(eig[1]))
    assert h0.ellipse_minor_2sigma == pytest.approx(2 * math.sqrt(eig[0]))
    ring = conv.ellipse_points(hyps[0].mean_xy, hyps[0].cov_xy, 2.0, n=64)
    d = ring - hyps[0].mean_xy
    mahal = np.einsum("ni,ij,nj->n", d, np.linalg.inv(hyps[0].cov_xy), d)
    np.testing.assert_allclose(mahal, 4.0, rtol=1e-9)  # every point on the 2-sigma contour
    np.testing.assert_allclose(ring[0], ring[-1])


def test_markers_of_answer_and_no_nan():
    from builtin_interfaces.msg import Time
    from visualization_msgs.msg import Marker

    hyps = [_hyp(), _hyp(mean=(3.0, 4.0), cell_id="0003_00002")]
    markers = conv.hypotheses_to_markers(hyps, "map", Time()).markers
    assert markers[0].action == Marker.DELETEALL
    by_ns = {}
    for m in markers[1:]:
        by_ns.setdefault(m.ns, []).append(m)
        assert m.header.frame_id == "map"
        for p in m.points:
            assert all(math.isfinite(v) for v in (p.x, p.y, p.z))
    assert len(by_ns["cells"]) == 2 and len(by_ns["scores"]) == 2
    assert by_ns["ellipse"][0].type == Marker.LINE_STRIP and len(by_ns["ellipse"][0].points) > 10
    assert "score" in by_ns["scores"][0].text


def test_non_finite_hypothesis_is_detected():
    assert conv.is_finite_hypothesis(_hyp())
    assert not conv.is_finite_hypothesis(_hyp(mean=(np.nan, 0.0)))
    assert not conv.is_finite_hypothesis(_hyp(cov=((np.inf, 0), (0, 1))))
    assert not conv.is_finite_hypothesis(_hyp(score=float("nan")))
    with pytest.raises(ValueError):
        conv.hypothesis_to_msg(_hyp(mean=(np.nan, 0.0)), 0)


def test_map_markers_are_bounded():
    from builtin_interfaces.msg import Time

    cells = [_cell(f"0003_{i:05d}", n_objects=3, seed=i) for i in range(30)]
    markers = conv.map_markers(cells, "map", Time(), max_cells=10, max_objects=25).markers
    outlines = next(m for m in markers if m.ns == "cell_outlines")
    dots = next(m for m in markers if m.ns == "object_centroids")
    assert len(outlines.points) == 10 * 8  # 4 segments of 2 points per cell
    assert len(dots.points) == 25 and len(dots.colors) == 25
    assert len(conv.map_markers([], "map", Time()).markers) == 1  # only the DELETEALL


# --------------------------------------------------------------------------- instructions

@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "empty"),
        ("  \n\t ", "whitespace-only"),
        ("x" * 1_000_000, "too long"),
        ("\x00\x01\x02", "whitespace-only"),
    ],
    ids=["empty", "whitespace_only", "one_megabyte", "control_characters"],
)
def test_bad_instructions_are_refused(text, reason):
    check = check_instruction(text, max_chars=2000)
    assert not check.ok and reason in check.reason
    assert len(check.reason) < 400  # one readable log line


def test_good_instruction_is_normalised():
    check = check_instruction("  The pose is north of a\tgray  building.\n", 2000)
    assert check.ok and check.text == "The pose is north of a gray building."
    assert check_instruction("Die Pose ist nördlich eines gray building.", 2000).ok  # read (and refused) later


def test_hints_to_messages_and_back():
    from spatialoc_ros.language import Hint
    from spatialoc_ros.msg import Hint as HintMsg

    hints = [Hint("north", "gray", "building"), Hint("on-top", None, "traffic light")]
    msgs = [conv.hint_to_msg(h) for h in hints]
    assert msgs[1].colour == "" and msgs[1].label == "traffic light"
    back, problems = conv.msg_to_hints(msgs + [HintMsg(direction="North", colour="GREY", label="trash_bin"),
                                               HintMsg(direction="up", colour="", label="building"),
                                               HintMsg(direction="east", colour="pink", label="building"),
                                               HintMsg(direction="east", colour="", label="spaceship")])
    assert back == hints + [Hint("north", "gray", "trash bin")]
    assert [f.split(" ")[1] for f, _ in problems] == ["3", "4", "5"] and all(r for _, r in problems)


# --------------------------------------------------------------------------- node parameters

def test_localizer_parameter_checks():
    from spatialoc_ros.ros.lifecycle_base import COMMON_PARAMETERS
    from spatialoc_ros.ros.localizer_node import PARAMETERS

    specs = {**COMMON_PARAMETERS, **PARAMETERS}
    for name, spec in specs.items():
        assert spec.problem(name, spec.default) is None, name

    def refused(name, value):
        return specs[name].problem(name, value) is not None

    assert refused("top_k", 0) and refused("top_k", 101) and not refused("top_k", 100)
    assert refused("device", "tpu") and not refused("device", "cuda:1") and not refused("device", "CUDA")
    assert not refused("frame_id", "") and refused("frame_id", "my map")
    assert refused("map_service", "")
    assert refused("queue_size", 0)
    assert refused("service_wait_s", 0.0) and refused("service_wait_s", float("nan"))
    assert refused("diagnostics_period_s", float("inf"))


def test_parameter_descriptors_carry_the_ranges():
    from rcl_interfaces.msg import ParameterType

    from spatialoc_ros.ros.localizer_node import PARAMETERS

    top_k = PARAMETERS["top_k"].descriptor()
    assert top_k.type == ParameterType.PARAMETER_INTEGER
    assert (top_k.integer_range[0].from_value, top_k.integer_range[0].to_value) == (1, 100)
    wait = PARAMETERS["service_wait_s"].descriptor()
    assert wait.floating_point_range[0].from_value == 0.01
    assert "next configure" in PARAMETERS["device"].descriptor().description
    assert "next configure" not in top_k.description  # dynamic


def test_parameter_tables_match_configs():
    from dataclasses import fields

    from spatialoc_ros.ros import localizer_node, map_server_node
    from spatialoc_ros.ros.lifecycle_base import COMMON_PARAMETERS

    assert set(localizer_node.PARAMETERS) | set(COMMON_PARAMETERS) == {f.name for f in fields(localizer_node.LocalizerConfig)}
    assert set(map_server_node.PARAMETERS) | set(COMMON_PARAMETERS) | {"scenes"} == {
        f.name for f in fields(map_server_node.MapServerConfig)}
    for table in (localizer_node.PARAMETERS, map_server_node.PARAMETERS, COMMON_PARAMETERS):
        for name, spec in table.items():
            assert len(spec.description) > 20, f"{name} needs a description"


# --------------------------------------------------------------------------- cloud -> cells

def test_cloud_is_cut_into_cells():
    from spatialoc_ros.data.cloud_cells import CellCutConfig, cut_cloud_into_cells, make_cloud

    xyz, rgb, labels, instances = _street_cloud()
    cells = cut_cloud_into_cells(make_cloud(xyz, rgb, labels, instances), "street", CellCutConfig())
    assert len(cells) > 0
    ids = [c.id for c in cells]
    assert len(set(ids)) == len(ids) and ids[0] == "street_00000"
    for cell in cells:
        assert len(cell.objects) >= 6 and cell.cell_size == 30.0
        assert {o.label for o in cell.objects} <= {"road", "building", "pole", "vegetation", "lamp"}
        assert [o.id for o in cell.objects] == list(range(len(cell.objects)))
        for o in cell.objects:
            assert o.rgb.min() >= 0 and o.rgb.max() <= 1
            world = cell.bbox_w[0:3] + o.xyz * cell.cell_size  # normalisation is invertible
            assert np.isfinite(world).all()
            if o.label == "road":  # stuff: clipped to the cell
                assert o.xyz[:, 0:2].min() >= -1e-6 and o.xyz[:, 0:2].max() <= 1 + 1e-6


def test_cloud_labels_by_name_and_unknown_classes_dropped():
    from spatialoc_ros.data.cloud_cells import class_names_of

    names = class_names_of(np.array(["Building", "traffic_light", "car", "sky"]))
    assert list(names) == ["building", "traffic light", "", ""]
    assert list(class_names_of(np.array([11, 26, 17]))) == ["building", "", "pole"]


def test_cloud_files_npz_and_bad(tmp_path):
    from spatialoc_ros.data.cloud_cells import cells_from_cloud_file
    from spatialoc_ros.data.loading import DataFormatError

    xyz, rgb, labels, instances = _street_cloud()
    good = tmp_path / "street.npz"
    np.savez(good, xyz=xyz, rgb=rgb, label=labels, instance=instances)
    cells = cells_from_cloud_file(str(good))
    assert cells and cells[0].scene_name == "street"
    bad = tmp_path / "bad.npz"
    np.savez(bad, xyz=xyz)
    with pytest.raises(DataFormatError, match="lacks"):
        cells_from_cloud_file(str(bad))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataFormatError, match="cannot read"):
        cells_from_cloud_file(str(tmp_path / "junk.npz"))
    with pytest.raises(DataFormatError, match="does not exist"):
        cells_from_cloud_file(str(tmp_path / "missing.ply"))
    (tmp_path / "x.las").write_text("x")
    with pytest.raises(DataFormatError, match="unsupported"):
        cells_from_cloud_file(str(tmp_path / "x.las"))


def test_cloud_file_ply_through_open3d(tmp_path):
    o3d = pytest.importorskip("open3d")
    from spatialoc_ros.data.cloud_cells import cells_from_cloud_file
    from spatialoc_ros.data.loading import DataFormatError

    xyz, rgb, labels, instances = _street_cloud()
    pcd = o3d.t.geometry.PointCloud()
    pcd.point.positions = o3d.core.Tensor(xyz.astype(np.float32))
    pcd.point.colors = o3d.core.Tensor((rgb / 255.0).astype(np.float32))
    pcd.point["semantic"] = o3d.core.Tensor(labels.astype(np.int32).reshape(-1, 1))
    pcd.point["instance"] = o3d.core.Tensor(instances.astype(np.int32).reshape(-1, 1))
    path = tmp_path / "street.ply"
    assert o3d.t.io.write_point_cloud(str(path), pcd)
    from_ply = cells_from_cloud_file(str(path))
    np.savez(tmp_path / "street.npz", xyz=xyz, rgb=rgb, label=labels, instance=instances)
    from_npz = cells_from_cloud_file(str(tmp_path / "street.npz"))
    assert [len(c.objects) for c in from_ply] == [len(c.objects) for c in from_npz]
    (tmp_path / "garbage.ply").write_text("garbage")
    with pytest.raises(DataFormatError, match="no points"):
        cells_from_cloud_file(str(tmp_path / "garbage.ply"))
