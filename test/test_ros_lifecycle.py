"""The nodes as lifecycle nodes over real ROS 2 (separate processes, real messages):

- a plain rclpy lifecycle client (lifecycle_msgs services, as nav2's lifecycle_manager uses)
  drives both nodes through configure / activate / deactivate / cleanup and back, and the answers
  are right after every cycle;
- a hostile map server of the test's own feeds the localizer bad cells and bad reloads;
- bad checkpoints and invalid start-up parameters fail configure with one ERROR line each, the
  node stays alive, and fixing the parameter lets it configure;
- the nav2 hand-off: pose remapped to /initialpose, transient local, stamped at reception, in the
  map server's frame; a frame mismatch keeps the localizer inactive with the reason.
No assertion depends on a tight wall-clock race: waits are generous and end on events.
"""
import math
import os

import numpy as np
import pytest
import torch

from ros_helpers import VALID_TEXT, Graph, NodeProcess, Probe, localizer_params, tiny_checkpoints

SCENE_0003 = "2013_05_28_drive_0003_sync"
START_S = 180.0  # generous: model loading on a busy 2-core machine


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return tiny_checkpoints(tmp_path_factory.mktemp("ros_ckpt_lifecycle"))


def _answer(probe: Probe, text: str, timeout_s: float = 90.0):
    probe.send(text)
    answer = probe.answer_to(text, timeout_s=timeout_s)
    assert answer is not None, f"{text!r} was not answered"
    detail, pose, _, _ = answer
    cov = np.array(pose.pose.covariance).reshape(6, 6)
    assert all(math.isfinite(v) for v in [pose.pose.pose.position.x, pose.pose.pose.position.y, *cov.ravel()])
    assert np.linalg.eigvalsh(cov[0:2, 0:2]).min() > 0  # finite PSD (positive definite) x-y block
    return detail, pose


def _top(detail):
    h = detail.hypotheses[0]
    return h.cell_id, round(h.pose.pose.position.x, 6), round(h.pose.pose.position.y, 6)


# --------------------------------------------------------------------------- lifecycle client

def test_a_lifecycle_client_drives_both_nodes_through_cycles(graph_factory, checkpoints, small_city):
    g = graph_factory({"base_path": small_city, "autostart": False},
                      localizer_params(checkpoints, autostart=False))
    p = g.probe
    assert p.wait_lifecycle("map_server", "unconfigured", START_S)
    assert p.wait_lifecycle("localizer", "unconfigured", START_S)
    assert not p.get_cells().success  # nothing served before activation
    assert p.change_state("map_server", "configure") and p.change_state("map_server", "activate")
    assert p.lifecycle_state("map_server") == "active" and p.get_cells().success
    answers = []
    for cycle in range(2):
        assert p.change_state("localizer", "configure"), g.localizer.log()[-2000:]
        assert p.lifecycle_state("localizer") == "inactive"
        assert p.change_state("localizer", "activate"), g.localizer.log()[-2000:]
        assert p.lifecycle_state("localizer") == "active"
        assert p.wait_state("ready", 30) and p.wait_subscriber()
        text = f"{VALID_TEXT} The pose is west of a gray pole."
        p.details.clear()
        answers.append(_top(_answer(p, text)[0]))
        # a diagnostics entry for the localizer says OK while ready
        assert p.spin_until(lambda: any(
            s.name.endswith("/spatialoc/localizer") and s.level == s.OK
            for a in p.diagnostics for s in a.status), 10)
        assert p.change_state("localizer", "deactivate")
        assert p.lifecycle_state("localizer") == "inactive"
        mark = g.localizer.log_mark()
        p.send(VALID_TEXT)
        assert g.localizer.wait_log("instruction refused: the map is not ready", 20, since=mark)
        assert p.change_state("localizer", "cleanup")
        assert p.lifecycle_state("localizer") == "unconfigured"
        # the map server's own cycle: deactivated it refuses, re-activated it serves again
        assert p.change_state("map_server", "deactivate") and not p.get_cells().success
        assert p.change_state("map_server", "activate") and p.get_cells().success
    assert answers[0] == answers[1], answers  # the same model and map give the same answer
    assert g.localizer.alive() and g.map_server.alive()
    assert not g.localizer.error_lines() and not g.map_server.error_lines()


# --------------------------------------------------------------------------- hostile map server

def _bad_cells(good):
    """Crafted cells of every kind the boundary must drop, built from a good one."""
    import copy

    def variant(cid, **changes):
        c = copy.deepcopy(good)
        c.id = cid
        for k, v in changes.items():
            setattr(c, k, v)
        return c

    nan_point = variant("0003_90001")
    nan_point.objects[0].xyz[0, 0] = np.nan
    empty_label = variant("0003_90002")
    empty_label.objects[0].label = ""
    return [
        nan_point,
        empty_label,
        variant("0003_90003", bbox_w=np.array([np.nan, 0, 0, 30, 30, 30], dtype=np.float64)),
        variant("0003_90004", cell_size=0.0),
        variant(good.id),  # a duplicate id (the first one is kept)
    ]


def test_a_hostile_map_server_never_poisons_the_localizer(graph_factory, checkpoints, small_city):
    from spatialoc_ros.data.loading import load_split
    from spatialoc_ros.ros import conversions

    good = load_split(small_city, "test").cells
    good_msgs = conversions.cells_to_msgs(good)
    bad_msgs = conversions.cells_to_msgs(_bad_cells(good[0]))
    serving = {"cells": good_msgs + bad_msgs, "success": True, "frame": "map"}

    def respond(resp):
        resp.success, resp.message, resp.frame_id = serving["success"], "hostile", serving["frame"]
        resp.cells = serving["cells"]
        return resp

    g = graph_factory(None, localizer_params(checkpoints, map_service="hostile_map"))
    g.probe.serve_map("hostile_map", respond)
    g.wait_ready(timeout_s=START_S)
    assert int(g.probe.status_value("cells")) == len(good)
    assert g.localizer.wait_log(r"dropped 5 of \d+ cells from", 10) is not None
    detail, _ = _answer(g.probe, VALID_TEXT)
    assert {h.cell_id for h in detail.hypotheses}.isdisjoint({"0003_90001", "0003_90002", "0003_90003", "0003_90004"})

    from std_srvs.srv import Trigger

    def reload():
        return g.probe.call(g.probe.reload_client, Trigger.Request(), timeout_s=120)

    only_bad = bad_msgs[:-1]  # without the duplicate, which alone is a good cell
    for change in ({"cells": only_bad}, {"success": False}, {"cells": []}, {"frame": ""}):
        serving.update({"cells": good_msgs + bad_msgs, "success": True, "frame": "map"})
        serving.update(change)
        response = reload()
        assert not response.success and "previous map" in response.message, (change, response.message)
        text = f"{VALID_TEXT} The pose is north of a black vegetation."
        g.probe.details.clear()
        _answer(g.probe, text)  # the previous map keeps answering
        assert int(g.probe.status_value("cells")) == len(good)
    serving.update({"cells": good_msgs[:40], "success": True, "frame": "map"})
    response = reload()
    assert response.success, response.message
    assert g.probe.spin_until(lambda: g.probe.status_value("cells") == "40", 10)
    assert g.localizer.alive()


# --------------------------------------------------------------------------- checkpoints, parameters

def _bad_checkpoints(good_fine: str, folder) -> dict:
    payload = torch.load(good_fine, map_location="cpu", weights_only=True)
    out = {}
    (folder / "random.pth").write_bytes(os.urandom(2048))
    out["random bytes"] = (str(folder / "random.pth"), "cannot be read")
    for name, edit, needle in (
        ("config None", lambda p: p.update(config=None), "'config' is a NoneType"),
        ("extra None", lambda p: p.update(extra=None), "'extra' is a NoneType"),
        ("sigma 1e-200", lambda p: p["extra"].update(sigma_scale=1e-200), "sigma_scale"),
        ("nan weights", lambda p: p["model"].update(
            {k: torch.full_like(v, float("nan")) for k, v in p["model"].items() if v.is_floating_point()}),
         "non-finite weights"),
    ):
        copy = {**payload, "model": dict(payload["model"]), "extra": dict(payload["extra"])}
        edit(copy)
        path = folder / f"{name.replace(' ', '_')}.pth"
        torch.save(copy, path)
        out[name] = (str(path), needle)
    out["missing"] = (str(folder / "nowhere.pth"), "does not exist")
    return out


def test_bad_checkpoints_and_parameters_fail_configure_and_the_node_stays(ros_env, tmp_path, checkpoints):
    """One localizer process: an invalid start-up value, then each bad checkpoint, fails configure
    with one ERROR line naming it; the node stays alive and unconfigured; a good file configures."""
    bad = _bad_checkpoints(checkpoints[1], tmp_path)
    params = localizer_params(checkpoints, top_k=0, device="tpu", fine_checkpoint=bad["random bytes"][0])
    node = NodeProcess("localizer", ros_env, tmp_path / "logs", params)
    probe = Probe(int(ros_env["ROS_DOMAIN_ID"]))
    try:
        assert probe.wait_state("error", START_S), node.log()[-2000:]
        errors = node.error_lines()
        assert len(errors) == 1 and "top_k" in errors[0] and "device" in errors[0], errors
        assert probe.lifecycle_state("localizer") == "unconfigured"
        assert probe.set_localizer_parameter("top_k", 3).successful
        assert probe.set_localizer_parameter("device", "cpu").successful
        for case, (path, needle) in bad.items():
            mark = node.log_mark()
            assert probe.set_localizer_parameter("fine_checkpoint", path).successful
            assert not probe.change_state("localizer", "configure"), case
            errors = node.error_lines(since=mark)
            assert len(errors) == 1 and needle in errors[0] and "configure failed" in errors[0], (case, errors)
            assert "Traceback" not in node.log()[mark:]
            assert node.alive() and probe.lifecycle_state("localizer") == "unconfigured"
        assert probe.set_localizer_parameter("fine_checkpoint", checkpoints[1]).successful
        assert probe.change_state("localizer", "configure"), node.log()[-2000:]
        assert probe.lifecycle_state("localizer") == "inactive"
    finally:
        probe.close()
        assert node.stop() == 0


# --------------------------------------------------------------------------- nav2 hand-off

def test_pose_for_nav2_initialpose_latched_stamped_at_reception(checkpoints, small_city, ros_env, tmp_path):
    from geometry_msgs.msg import PoseWithCovarianceStamped

    from spatialoc_ros.ros.localizer_node import POSE_QOS

    g = Graph(ros_env, tmp_path / "logs", {"base_path": small_city, "frame_id": "world"}, None)
    g.localizer = NodeProcess("localizer", ros_env, tmp_path / "logs",
                              localizer_params(checkpoints, queue_size=2), remaps={"pose": "/initialpose"})
    try:
        p = g.probe
        initial = []
        p.node.create_subscription(PoseWithCovarianceStamped, "/initialpose", initial.append, POSE_QOS)
        g.wait_ready(timeout_s=START_S)
        assert p.status_value("frame") == "world"
        texts = [f"{VALID_TEXT} The pose is east of a gray box.", f"{VALID_TEXT} The pose is south of a gray box."]
        for t in texts:  # back to back: the second waits in the queue while the first is answered
            p.send(t)
        arrival = {}

        def both_answered() -> bool:
            for d in p.details:
                arrival.setdefault(d.instruction, (d, p.node.get_clock().now().nanoseconds))
            return all(" ".join(t.split()) in arrival for t in texts)

        assert p.spin_until(both_answered, 90), g.localizer.log()[-2000:]
        detail2, t_received = arrival[" ".join(texts[1].split())]
        assert all(arrival[" ".join(t.split())][0].pose_published for t in texts)
        # this subscription keeps one pose (depth 1): the first answer's pose may be
        # replaced by the second's before it is taken, so wait for the second's, not for two
        assert p.spin_until(lambda: any(m.header.stamp == detail2.header.stamp for m in initial), 30), \
            f"the second answer's pose did not reach /initialpose ({len(initial)} pose(s) there)"
        assert all(m.header.frame_id == "world" for m in initial)
        stamp2 = detail2.header.stamp.sec * 10**9 + detail2.header.stamp.nanosec
        # stamped when the instruction arrived: the inference time lies between stamp and delivery
        assert stamp2 + detail2.inference_ms * 1e6 <= t_received + 5e6
        assert initial[-1].header.stamp == detail2.header.stamp
        # transient local, depth 1: a subscriber that comes late still gets the last pose
        late = []
        p.node.create_subscription(PoseWithCovarianceStamped, "/initialpose", late.append, POSE_QOS)
        assert p.spin_until(lambda: bool(late), 20) and late[-1].header.stamp == detail2.header.stamp
        # one frame source: a localizer insisting on another frame stays inactive, with the reason
        other = NodeProcess("localizer", ros_env, tmp_path / "logs",
                            localizer_params(checkpoints, frame_id="odom", map_service="/spatialoc/get_map_cells"),
                            namespace="/other")
        try:
            line = other.wait_log(r"frame mismatch: the map is in 'world' but frame_id is 'odom'", START_S)
            assert line is not None, other.log()[-2000:]
            assert other.alive() and p.lifecycle_state("/other/localizer") == "inactive"
        finally:
            other.stop()
    finally:
        g.close()
