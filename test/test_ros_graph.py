"""Graph tests over real ROS 2: map_server and localizer as separate processes (the installed
executables), a probe node in the test process, real messages on a private domain.

One node pair is shared by the tests of this module (started by the first test that needs it,
with that test's ``ros_env``), on the small synthetic city and tiny random-initialised checkpoints.
"""
import math
import subprocess

import numpy as np
import pytest

from ros_helpers import VALID_TEXT, Graph, localizer_params, tiny_checkpoints

TOP_K = 5


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return tiny_checkpoints(tmp_path_factory.mktemp("ros_ckpt"))


@pytest.fixture(scope="module")
def _graph_holder():
    holder = {}
    yield holder
    if "graph" in holder:
        holder["graph"].close()


@pytest.fixture
def graph(_graph_holder, ros_env, small_city, checkpoints, tmp_path_factory) -> Graph:
    if "graph" not in _graph_holder:
        g = Graph(
            ros_env,
            tmp_path_factory.mktemp("ros_logs"),
            {"base_path": small_city, "split": "test"},
            localizer_params(checkpoints, top_k=TOP_K),
        )
        _graph_holder["graph"] = g
        g.wait_ready(timeout_s=120)
    g = _graph_holder["graph"]
    assert g.localizer.alive() and g.map_server.alive(), "a node of the shared graph died"
    return g


def _counter(g: Graph, key: str) -> int:
    return int(g.probe.status_value(key) or 0)


def _settled_counters(g: Graph, *keys: str) -> tuple:
    """Counters of the status topic once it has caught up (it is refreshed once a second)."""
    g.probe.spin_for(1.3)
    return tuple(_counter(g, k) for k in keys)


def _wait_counter(g: Graph, key: str, at_least: int, timeout_s: float = 10.0) -> int:
    g.probe.spin_until(lambda: int(g.probe.status_value(key) or 0) >= at_least, timeout_s)
    return int(g.probe.status_value(key) or 0)


def _assert_finite_answer(detail, pose, array):
    values = [pose.pose.pose.position.x, pose.pose.pose.position.y, pose.pose.pose.position.z, *pose.pose.covariance]
    for h in detail.hypotheses:
        values += [h.score, h.pose.pose.position.x, h.pose.pose.position.y, *h.pose.covariance,
                   h.ellipse_major_2sigma, h.ellipse_minor_2sigma]
    for p in array.poses:
        values += [p.position.x, p.position.y]
    assert all(math.isfinite(v) for v in values), "an answer holds NaN or inf"


# --------------------------------------------------------------------------- answers

def test_pose_arrives_in_the_map_frame_with_a_valid_covariance(graph):
    graph.probe.send(VALID_TEXT)
    answer = graph.probe.answer_to(VALID_TEXT, timeout_s=60)
    assert answer is not None, f"no answer; localizer log:\n{graph.localizer.log()[-2000:]}"
    detail, pose, array, markers = answer
    assert pose.header.frame_id == "map" and detail.header.frame_id == "map" and array.header.frame_id == "map"
    assert pose.header.stamp.sec > 0 or pose.header.stamp.nanosec > 0
    _assert_finite_answer(detail, pose, array)

    cov = np.asarray(pose.pose.covariance, dtype=np.float64).reshape(6, 6)
    np.testing.assert_array_equal(cov, cov.T)
    assert np.linalg.eigvalsh(cov).min() > 0
    assert np.linalg.eigvalsh(cov[0:2, 0:2]).min() > 0
    assert cov[2, 2] >= 1e5 and cov[5, 5] >= 1e5  # z and yaw unknown
    assert pose.pose.pose.position.z == 0.0 and pose.pose.pose.orientation.w == 1.0

    assert len(detail.hypotheses) == TOP_K and len(array.poses) == TOP_K
    assert [h.rank for h in detail.hypotheses] == list(range(TOP_K))
    scores = [h.score for h in detail.hypotheses]
    assert scores == sorted(scores, reverse=True)
    top = detail.hypotheses[0]
    bbox = np.asarray(top.cell_bbox_w)
    np.testing.assert_allclose(  # each hypothesis mean is its cell-normalised one mapped to the world
        bbox[0:2] + np.asarray(top.pos_in_cell) * (bbox[3] - bbox[0]),
        [top.pose.pose.position.x, top.pose.pose.position.y], atol=1e-6)
    # the published pose is the estimate: the probability-weighted mixture of the top scene's hypotheses
    probs = [h.probability for h in detail.hypotheses]
    assert probs == sorted(probs, reverse=True) and all(0 < p <= 1 for p in probs) and sum(probs) <= 1 + 1e-9
    assert detail.confidence == top.probability and detail.pose_published and detail.covariance_mode == "mixture"
    same = [h for h in detail.hypotheses if h.scene == top.scene]
    w = np.array([h.probability for h in same])
    mix = (w[:, None] * np.array([[h.pose.pose.position.x, h.pose.pose.position.y] for h in same])).sum(0) / w.sum()
    np.testing.assert_allclose([pose.pose.pose.position.x, pose.pose.pose.position.y], mix, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(pose.pose.covariance), np.asarray(detail.estimate.covariance))
    # the mixture covers its components: never tighter than their probability-weighted covariance
    from spatialoc_ros.ros.conversions import covariance_xy_of

    inner = sum(wk * covariance_xy_of(h.pose.covariance) for wk, h in zip(w / w.sum(), same))
    assert np.linalg.eigvalsh(cov[0:2, 0:2] - inner).min() > -1e-6

    namespaces = {m.ns for m in markers.markers}
    assert {"cells", "ellipse", "scores"} <= namespaces
    ellipse = next(m for m in markers.markers if m.ns == "ellipse")
    assert ellipse.type == ellipse.LINE_STRIP and len(ellipse.points) > 10


def test_answer_matches_the_inference_api(graph, checkpoints):
    from spatialoc_ros.inference import Localizer
    from spatialoc_ros.ros.conversions import covariance_xy_of, msgs_to_cells

    response = graph.probe.get_cells()
    assert response.success
    cells = msgs_to_cells(response.cells)
    localizer = Localizer.from_checkpoints(*checkpoints, device="cpu")
    localizer.set_map(cells, progress=False)
    text = "The pose is west of a gray pole. The pose is north of a gray-green road. The pose is east of a green vegetation."
    expected = localizer.localize(text, top_k=TOP_K)

    graph.probe.send(text)
    answer = graph.probe.answer_to(text, timeout_s=60)
    assert answer is not None
    detail = answer[0]
    assert [h.cell_id for h in detail.hypotheses] == [h.cell_id for h in expected]
    for got, want in zip(detail.hypotheses, expected):
        assert got.scene == want.scene
        assert got.score == pytest.approx(want.score, rel=1e-4, abs=1e-4)
        np.testing.assert_allclose([got.pose.pose.position.x, got.pose.pose.position.y], want.mean_xy, atol=1e-3)
        np.testing.assert_allclose(covariance_xy_of(got.pose.covariance), want.cov_xy, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got.pos_in_cell, want.pos_in_cell, atol=1e-6)
        assert got.probability == pytest.approx(want.probability, rel=1e-4, abs=1e-6)
    est = localizer.combine(expected, "mixture")
    assert detail.confidence == pytest.approx(est.confidence, rel=1e-4, abs=1e-6)
    np.testing.assert_allclose([detail.estimate.pose.position.x, detail.estimate.pose.position.y], est.mean_xy, atol=1e-3)
    np.testing.assert_allclose(covariance_xy_of(detail.estimate.covariance), est.cov_xy, rtol=1e-3, atol=1e-5)


# --------------------------------------------------------------------------- bad instructions

BAD_INSTRUCTIONS = {
    "empty": "",
    "whitespace_only": " \t\n   \n",
    "one_megabyte": "The pose is north of a gray building. " * 27000,  # ~1 MB
    "non_ascii": "Ünïcødé ☃ 建物の北にいます",
    "nonsense": "asdf qwerty zxcv 12345 !!",
    "direction_alone": "north",
    "one_hint": "The pose is north of a gray building.",
    "colorless_green_ideas": "colorless green ideas sleep furiously",
}


@pytest.mark.parametrize("case", sorted(BAD_INSTRUCTIONS))
def test_bad_instruction_is_refused_and_the_next_one_answered(graph, case):
    bad = BAD_INSTRUCTIONS[case]
    probe = graph.probe
    (rejected_before,) = _settled_counters(graph, "rejected")
    mark = graph.localizer.log_mark()
    n_details = len(probe.details)

    probe.send(bad)
    line = graph.localizer.wait_log(r"instruction refused", timeout_s=20, since=mark)
    assert line is not None, f"no log line for the {case} instruction"
    assert len(line) < 600, "the refusal should be one short line"
    good = f"{VALID_TEXT} The pose is west of a gray lamp ({case})."
    probe.send(good)
    answer = probe.answer_to(good, timeout_s=60)
    assert answer is not None, f"the valid instruction after the {case} one was not answered"
    _assert_finite_answer(*answer[:3])
    assert [d.instruction for d in probe.details[n_details:]] == [" ".join(good.split())], "the bad one got an answer"
    assert _wait_counter(graph, "rejected", rejected_before + 1) == rejected_before + 1
    assert graph.localizer.alive()


def test_non_ascii_free_text_is_answered(graph):
    text = "I’m just north of a gray building 🙂 — and east of a dark-green vegetation."
    graph.probe.send(text)
    answer = graph.probe.answer_to(text, timeout_s=60)
    assert answer is not None
    _assert_finite_answer(*answer[:3])


def test_free_form_instruction_is_answered_with_what_was_understood(graph):
    """A free-form text and the same hints as a Hint[] message give the template's answer, and
    every answer echoes the hints understood and the fragments that were not read."""
    from spatialoc_ros.msg import Hint, InstructionHints

    probe = graph.probe
    template = ("The pose is west of a gray building. The pose is on-top of a gray sidewalk. "
                "The pose is south of a green pole.")
    free = "a building is ... no: a gray house is to my east, I'm standing on the grey pavement, a green pole just north of me; the sky is blue"
    probe.send(template)
    want = probe.answer_to(template, timeout_s=60)
    probe.send(free)
    got = probe.answer_to(free, timeout_s=60)
    assert want is not None and got is not None
    detail = got[0]
    assert [(h.direction, h.colour, h.label) for h in detail.understood] == [
        ("west", "gray", "building"), ("on-top", "gray", "sidewalk"), ("south", "green", "pole")]
    assert any("sky" in u for u in detail.unread), detail.unread
    assert "3 hints" in detail.interpretation
    assert [h.cell_id for h in detail.hypotheses] == [h.cell_id for h in want[0].hypotheses]

    hints_pub = probe.node.create_publisher(InstructionHints, "instruction_hints", 10)
    assert probe.spin_until(lambda: hints_pub.get_subscription_count() > 0, 20)
    msg = InstructionHints(hints=[Hint(direction="west", colour="gray", label="building"),
                                  Hint(direction="on-top", colour="gray", label="sidewalk"),
                                  Hint(direction="sideways", colour="", label="building"),
                                  Hint(direction="south", colour="green", label="pole")])
    n = len(probe.details)
    hints_pub.publish(msg)
    assert probe.spin_until(lambda: len(probe.details) > n, 60)
    structured = probe.details[-1]
    assert structured.instruction == template
    assert len(structured.understood) == 3 and len(structured.unread) == 1 and "sideways" in structured.unread[0]
    assert [h.cell_id for h in structured.hypotheses] == [h.cell_id for h in want[0].hypotheses]


def test_instructions_faster_than_inference_keep_the_newest(graph):
    probe = graph.probe
    received0, answered0, dropped0 = _settled_counters(graph, "received", "answered", "dropped")
    mark = graph.localizer.log_mark()
    texts = [f"{VALID_TEXT} The pose is west of a gray lamp {i}." for i in range(40)]
    for text in texts:  # ~2 ms apart: far faster than inference
        probe.send(text)
        probe.executor.spin_once(timeout_sec=0.002)
    assert probe.answer_to(texts[-1], timeout_s=90) is not None, (
        f"the newest instruction was not answered; localizer log:\n{graph.localizer.log()[mark:][-3000:]}")
    probe.spin_until(lambda: int(probe.status_value("received") or 0) >= received0 + 40
                     and int(probe.status_value("answered") or 0) + int(probe.status_value("dropped") or 0)
                     >= answered0 + dropped0 + 40, timeout_s=30)
    answered = _counter(graph, "answered") - answered0
    dropped = _counter(graph, "dropped") - dropped0
    assert _counter(graph, "received") - received0 == 40
    assert dropped > 0 and answered + dropped == 40, (answered, dropped)
    assert graph.localizer.wait_log(r"dropped the oldest", timeout_s=5, since=mark) is not None


# --------------------------------------------------------------------------- parameters, services

def test_parameter_changes_are_validated(graph):
    probe = graph.probe
    bad = (("top_k", 0), ("top_k", 1000), ("frame_id", "two words"), ("queue_size", 0), ("device", "tpu"),
           ("service_wait_s", float("nan")), ("max_instruction_chars", -1))
    for name, value in bad:
        result = probe.set_localizer_parameter(name, value)
        assert not result.successful, f"{name}={value!r} was accepted"
        assert result.reason
    try:
        assert probe.set_localizer_parameter("top_k", 2).successful
        text = f"{VALID_TEXT} The pose is east of a beige building."
        probe.send(text)
        answer = probe.answer_to(text, timeout_s=60)
        assert answer is not None
        assert len(answer[0].hypotheses) == 2 and answer[1].header.frame_id == "map"
    finally:
        probe.set_localizer_parameter("top_k", TOP_K)


def test_min_confidence_suppresses_the_pose_but_not_the_hypotheses(graph):
    probe = graph.probe
    assert not probe.set_localizer_parameter("min_confidence", 1.5).successful
    assert not probe.set_localizer_parameter("covariance", "widest").successful
    try:
        assert probe.set_localizer_parameter("min_confidence", 1.0).successful
        assert probe.set_localizer_parameter("covariance", "top").successful
        text = f"{VALID_TEXT} The pose is south of a black pole."
        poses_before = len(probe.poses)
        probe.send(text)
        assert probe.spin_until(lambda: any(d.instruction == " ".join(text.split()) for d in probe.details), 60)
        detail = [d for d in probe.details if d.instruction == " ".join(text.split())][-1]
        assert not detail.pose_published and 0 < detail.confidence < 1.0 and detail.covariance_mode == "top"
        assert len(detail.hypotheses) == TOP_K
        probe.spin_until(lambda: len(probe.poses) > poses_before, 2.0)
        assert len(probe.poses) == poses_before  # no pose went out for it
        np.testing.assert_array_equal(np.asarray(detail.estimate.covariance),
                                      np.asarray(detail.hypotheses[0].pose.covariance))
    finally:
        probe.set_localizer_parameter("min_confidence", 0.0)
        probe.set_localizer_parameter("covariance", "mixture")


def test_parameter_ranges_are_in_the_descriptors(graph):
    """What `ros2 param describe` shows: the ranges live in the descriptors, not only in code."""
    from rcl_interfaces.srv import DescribeParameters

    probe = graph.probe
    client = probe.node.create_client(DescribeParameters, "localizer/describe_parameters")
    response = probe.call(client, DescribeParameters.Request(names=["top_k", "service_wait_s", "device"]))
    top_k, wait, device = response.descriptors
    assert top_k.integer_range and (top_k.integer_range[0].from_value, top_k.integer_range[0].to_value) == (1, 100)
    assert wait.floating_point_range and wait.floating_point_range[0].from_value > 0
    assert "cuda:N" in device.description


def test_reload_map_refetches_and_reembeds(graph):
    from std_srvs.srv import Trigger

    response = graph.probe.call(graph.probe.reload_client, Trigger.Request(), timeout_s=60)
    assert response.success, response.message
    assert "embedded" in response.message
    text = f"{VALID_TEXT} The pose is south of a black vegetation."
    graph.probe.send(text)
    assert graph.probe.answer_to(text, timeout_s=60) is not None


def test_get_map_cells_filters(graph, small_city):
    from spatialoc_ros.data.loading import load_split

    probe = graph.probe
    everything = probe.get_cells()
    expected = load_split(small_city, "test").cells
    assert everything.success and len(everything.cells) == len(expected)
    scene = probe.get_cells(scene="2013_05_28_drive_0003_sync")
    assert scene.success and scene.cells and {c.scene for c in scene.cells} == {"0003"}
    first = everything.cells[0]
    cx, cy = (first.bbox_w[0] + first.bbox_w[3]) / 2, (first.bbox_w[1] + first.bbox_w[4]) / 2
    near = probe.get_cells(use_circle=True, center_x=cx, center_y=cy, radius=1.0)
    assert near.success and [c.id for c in near.cells] == [first.id]
    bad = probe.get_cells(use_circle=True, center_x=cx, center_y=cy, radius=-1.0)
    assert not bad.success and "radius" in bad.message and not bad.cells


def test_map_markers_are_latched_and_bounded(graph):
    probe = graph.probe
    assert probe.spin_until(lambda: bool(probe.map_markers), 20), "no transient-local map_markers"
    markers = probe.map_markers[-1].markers
    assert markers[0].action == markers[0].DELETEALL
    assert {m.ns for m in markers[1:]} == {"cell_outlines", "object_centroids"}
    assert len(markers) <= 3 and all(m.header.frame_id == "map" for m in markers)


def test_demo_client_against_the_running_nodes(graph, small_city, tmp_path):
    from ros_helpers import executable

    png = tmp_path / "demo.png"
    run = subprocess.run(
        [executable(graph.env, "demo_client"), "--namespace", "/spatialoc", "--count", "2",
         "--base_path", small_city, "--timeout", "60", "--out", str(png)],
        env=graph.env, capture_output=True, text=True, timeout=150,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert png.is_file() and png.stat().st_size > 10_000
    for needle in ("true position", "published pose", "confidence", "error", "2-sigma radius", "ros2 topic pub --once /spatialoc/instruction"):
        assert needle in run.stdout


def test_nodes_shut_down_cleanly(graph, _graph_holder):
    codes = _graph_holder.pop("graph").close()
    assert codes == {"localizer": 0, "map_server": 0}, codes
