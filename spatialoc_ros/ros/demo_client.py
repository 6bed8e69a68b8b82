"""``demo_client``: send held-out test instructions to a running localizer and report.

For each of ``--count`` test positions of a KITTI360Pose folder (the embedded synthetic city by
default) it publishes the position's description on ``<namespace>/instruction``, waits for the
matching ``<namespace>/hypotheses_detail`` answer and prints the true position, the predicted
pose, the error in metres and the 2-sigma radius. Then it draws the map (cells from
``<namespace>/get_map_cells``), the true and predicted positions and the 2-sigma ellipses into a
PNG, and prints the ``ros2 topic pub`` line a user would type on a full ROS 2 install.

Works against any running localizer::

    demo_client --namespace /spatialoc --count 5 --base_path '' --timeout 120

Exit code 0 when every instruction was answered with finite numbers, 1 otherwise.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from std_msgs.msg import String

from spatialoc_ros.data.kitti360pose import Cell, Pose
from spatialoc_ros.ros import conversions
from spatialoc_ros.ros.instruction import check_instruction
from spatialoc_ros.ros.localizer_node import INSTRUCTION_QOS, OUTPUT_QOS, STATUS_QOS
from spatialoc_ros.msg import HypothesisArray
from spatialoc_ros.srv import GetMapCells


@dataclass
class DemoResult:
    """One instruction and its answer (world metres)."""

    pose: Pose
    text: str
    answer: Optional[HypothesisArray] = None
    latency_ms: float = float("nan")

    @property
    def predicted_xy(self) -> Optional[np.ndarray]:
        """The published estimate's mean (what `pose` carries)."""
        if self.answer is None or not self.answer.hypotheses:
            return None
        p = self.answer.estimate.pose.position
        return np.array([p.x, p.y])

    @property
    def predicted_scene(self) -> str:
        return self.answer.hypotheses[0].scene if self.answer and self.answer.hypotheses else ""

    @property
    def cov_xy(self) -> Optional[np.ndarray]:
        if self.answer is None or not self.answer.hypotheses:
            return None
        return conversions.covariance_xy_of(self.answer.estimate.covariance)

    @property
    def radius_2sigma(self) -> float:
        """Major semi-axis (m) of the published estimate's 2-sigma ellipse."""
        cov = self.cov_xy
        return float("nan") if cov is None else conversions.ellipse_axes(cov, 2.0)[0]

    @property
    def error_m(self) -> float:
        """x-y error of the top-1 answer; inf when it lies in another scene, nan when none."""
        xy = self.predicted_xy
        if xy is None:
            return float("nan")
        if self.predicted_scene != str(self.pose.scene_name):
            return float("inf")
        return float(np.linalg.norm(xy - np.asarray(self.pose.pose_w, dtype=np.float64)[0:2]))


def select_test_poses(poses: list[Pose], count: int, seed: int = 0) -> list[Pose]:
    """``count`` poses spread over the scenes (round robin), deterministic for ``seed``."""
    rng = np.random.default_rng(seed)
    by_scene: dict[str, list[Pose]] = {}
    for p in poses:
        by_scene.setdefault(str(p.scene_name), []).append(p)
    orders = {s: list(rng.permutation(len(ps))) for s, ps in sorted(by_scene.items())}
    out: list[Pose] = []
    while len(out) < count and any(orders.values()):
        for scene in sorted(orders):
            if orders[scene] and len(out) < count:
                out.append(by_scene[scene][orders[scene].pop(0)])
    return out


def ros2_pub_line(namespace: str, text: str) -> str:
    """The ``ros2 topic pub`` command that sends ``text`` on a full ROS 2 install."""
    topic = f"{namespace.rstrip('/')}/instruction" if namespace.strip("/") else "/instruction"
    quoted = text.replace("'", "''")  # YAML single-quoted string
    return f"ros2 topic pub --once {topic} std_msgs/msg/String \"{{data: '{quoted}'}}\""


class DemoClient(Node):
    """Publisher of instructions, subscriber of answers and status, client of the map."""

    def __init__(self, namespace: str) -> None:
        super().__init__("demo_client", namespace=namespace)
        self.answers: list[HypothesisArray] = []
        self.status = ""
        self._pub = self.create_publisher(String, "instruction", INSTRUCTION_QOS)
        self.create_subscription(HypothesisArray, "hypotheses_detail", self.answers.append, OUTPUT_QOS)
        self.create_subscription(String, "status", self._on_status, STATUS_QOS)
        self._cells_client = self.create_client(GetMapCells, "get_map_cells")
        self._executor = SingleThreadedExecutor(context=self.context)
        self._executor.add_node(self)

    def _on_status(self, msg: String) -> None:
        self.status = msg.data

    def spin_until(self, done: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() > deadline or not rclpy.ok(context=self.context):
                return False
            self._executor.spin_once(timeout_sec=0.05)
        return True

    def wait_ready(self, timeout_s: float) -> tuple[bool, str]:
        """Wait for status state=ready and a subscriber on the instruction topic."""
        ok = self.spin_until(
            lambda: (self.status.startswith("state=ready") or self.status.startswith("state=error"))
            and self._pub.get_subscription_count() > 0,
            timeout_s,
        )
        if self.status.startswith("state=error"):
            return False, f"the localizer reports an error: {self.status}"
        if not ok:
            return False, f"the localizer was not ready within {timeout_s:g} s (last status: {self.status or 'none'})"
        return True, self.status

    def ask(self, text: str, timeout_s: float) -> tuple[Optional[HypothesisArray], float]:
        """Publish ``text`` and wait for the answer that echoes it: (answer or None, latency ms)."""
        wanted = check_instruction(text, max_chars=len(text) + 1).text
        start = len(self.answers)
        t0 = time.perf_counter()
        self._pub.publish(String(data=text))
        found: list[HypothesisArray] = []

        def answered() -> bool:
            found.extend(a for a in self.answers[start:] if a.instruction == wanted)
            del self.answers[start:]
            return bool(found)

        if not self.spin_until(answered, timeout_s):
            return None, float("nan")
        return found[0], 1e3 * (time.perf_counter() - t0)

    def fetch_cells(self, scene: str, timeout_s: float) -> list[Cell]:
        if not self._cells_client.wait_for_service(timeout_sec=timeout_s):
            return []
        future = self._cells_client.call_async(GetMapCells.Request(scene=scene))
        if not self.spin_until(future.done, timeout_s) or future.result() is None or not future.result().success:
            return []
        return conversions.msgs_to_cells(future.result().cells)


def plot_demo(results: list[DemoResult], cells_by_scene: dict[str, list[Cell]], path: str) -> str:
    """PNG of each scene's cells with true (green) and predicted (red) positions and 2-sigma ellipses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    scenes = sorted({str(r.pose.scene_name) for r in results} | {r.predicted_scene for r in results if r.predicted_scene})
    ncol = max(len(scenes), len(results))
    fig, axes = plt.subplots(2, ncol, figsize=(4.5 * ncol, 9.5), squeeze=False)
    for ax in list(axes[0][len(scenes):]) + list(axes[1][len(results):]):
        ax.axis("off")
    for ax, r, i in zip(axes[1], results, range(1, len(results) + 1)):
        _zoom_panel(ax, r, i, cells_by_scene.get(str(r.pose.scene_name), []))
    for ax, scene in zip(axes[0], scenes):
        outlines, centres, colors = _cell_drawing(cells_by_scene.get(scene, []))
        if outlines:
            ax.add_collection(LineCollection(outlines, colors="0.85", linewidths=0.5, zorder=1))
        if centres:
            xy = np.array(centres)
            ax.scatter(xy[:, 0], xy[:, 1], s=3, c=np.array(colors), zorder=2)
        for i, r in enumerate(results, start=1):
            if str(r.pose.scene_name) == scene:
                t = np.asarray(r.pose.pose_w, dtype=np.float64)
                ax.scatter(t[0], t[1], marker="*", s=160, color="tab:green", edgecolor="k", zorder=5)
                ax.annotate(str(i), (t[0], t[1]), xytext=(4, 4), textcoords="offset points", color="tab:green")
            xy, cov = r.predicted_xy, r.cov_xy
            if xy is not None and r.predicted_scene == scene:
                ring = conversions.ellipse_points(xy, cov, 2.0)
                ax.plot(ring[:, 0], ring[:, 1], color="tab:red", lw=1.2, zorder=4)
                ax.scatter(xy[0], xy[1], marker="x", s=80, color="tab:red", zorder=6)
                ax.annotate(str(i), (xy[0], xy[1]), xytext=(4, -10), textcoords="offset points", color="tab:red")
                if str(r.pose.scene_name) == scene:
                    t = np.asarray(r.pose.pose_w, dtype=np.float64)
                    ax.plot([t[0], xy[0]], [t[1], xy[1]], color="0.3", lw=0.8, ls="--", zorder=3)
        ax.set_title(f"scene {scene}: true * (green), predicted x + 2-sigma ellipse (red)", fontsize=9)
        ax.set_xlabel("x (m)")
        ax.set_ylabel("y (m)")
        ax.set_aspect("equal", adjustable="datalim")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return os.path.abspath(path)


def _cell_drawing(cells: list, window=None) -> tuple[list, list, list]:
    """(cell outlines, object centres, object colours) in world metres of the cells overlapping
    ``window`` ((lo xy, hi xy); None = all)."""
    outlines, centres, colors = [], [], []
    for cell in cells:
        b = np.asarray(cell.bbox_w, dtype=np.float64)
        if window is not None:
            lo, hi = window
            if b[3] < lo[0] or b[0] > hi[0] or b[4] < lo[1] or b[1] > hi[1]:
                continue
        outlines.append(np.array([[b[0], b[1]], [b[3], b[1]], [b[3], b[4]], [b[0], b[4]], [b[0], b[1]]]))
        for obj in cell.objects:
            centres.append(b[0:2] + np.asarray(obj.get_center())[0:2] * float(cell.cell_size))
            colors.append(conversions.class_color(obj.label))
    return outlines, centres, colors


#: Half width (m) of the zoomed panel drawn around each true position.
ZOOM_HALF_WIDTH_M = 30.0


def _zoom_panel(ax, r: DemoResult, number: int, cells: list) -> None:
    """About 60 m around the true position: cells and objects, the top-k hypotheses as dots whose
    size and opacity follow their probability, the published 2-sigma ellipse, the truth, the
    confidence."""
    from matplotlib.collections import LineCollection

    t = np.asarray(r.pose.pose_w, dtype=np.float64)[0:2]
    lo, hi = t - ZOOM_HALF_WIDTH_M, t + ZOOM_HALF_WIDTH_M
    outlines, centres, colors = _cell_drawing(cells, (lo, hi))
    if outlines:
        ax.add_collection(LineCollection(outlines, colors="0.88", linewidths=0.5, zorder=1))
    if centres:
        xy = np.array(centres)
        ax.scatter(xy[:, 0], xy[:, 1], s=6, c=np.array(colors), zorder=2)
    title = f"#{number}: no answer"
    if r.answer is not None and r.answer.hypotheses:
        for h in r.answer.hypotheses:
            if h.scene != str(r.pose.scene_name):
                continue
            p = h.pose.pose.position
            ax.scatter(p.x, p.y, s=20 + 400 * h.probability, color="tab:orange", alpha=0.3 + 0.7 * h.probability,
                       edgecolor="k", linewidth=0.5, zorder=4)
            ax.annotate(f"{h.probability:.2f}", (p.x, p.y), xytext=(5, 3), textcoords="offset points", fontsize=7)
        xy, cov = r.predicted_xy, r.cov_xy
        if r.predicted_scene == str(r.pose.scene_name):
            ring = conversions.ellipse_points(xy, cov, 2.0)
            ax.plot(ring[:, 0], ring[:, 1], color="tab:red", lw=1.5, zorder=5)
            ax.scatter(xy[0], xy[1], marker="x", s=70, color="tab:red", zorder=6)
        err = r.error_m
        where = f"error {err:.1f} m" if math.isfinite(err) else f"answered in scene {r.predicted_scene}"
        title = f"#{number}: confidence {r.answer.confidence:.2f}, {where}"
    ax.scatter(t[0], t[1], marker="*", s=200, color="tab:green", edgecolor="k", zorder=7)
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(lo[1], hi[1])
    ax.set_aspect("equal")
    ax.set_title(title + "\n(dots: hypotheses by probability; red: published 2-sigma)", fontsize=8)
    ax.set_xlabel("x (m)", fontsize=8)


def _fmt_xy(xy) -> str:
    return f"({xy[0]:8.1f}, {xy[1]:8.1f})"


def run(args: argparse.Namespace, node: DemoClient) -> int:
    from spatialoc_ros.data.loading import load_split

    base = args.base_path
    if not base:
        from spatialoc_ros.data.synthetic import ensure_default_city

        base = ensure_default_city(log=print)
    data = load_split(base, args.split, with_direction=False)
    poses = select_test_poses(data.poses, args.count, args.seed)
    if not poses:
        print(f"[demo_client] no {args.split} positions in {base}", file=sys.stderr)
        return 1

    print(f"[demo_client] waiting for the localizer in {node.get_namespace()} (up to {args.timeout:g} s) ...", flush=True)
    ready, status = node.wait_ready(args.timeout)
    if not ready:
        print(f"[demo_client] {status}", file=sys.stderr)
        return 1
    print(f"[demo_client] ready: {status}")

    from spatialoc_ros.data.loading import query_text

    results: list[DemoResult] = []
    for i, pose in enumerate(poses, start=1):
        text = query_text(pose)
        answer, latency = node.ask(text, args.timeout)
        r = DemoResult(pose, text, answer, latency)
        results.append(r)
        true_xy = np.asarray(pose.pose_w, dtype=np.float64)[0:2]
        print(f"\n[{i}/{len(poses)}] scene {pose.scene_name}: {text}")
        print(f"    true position       {_fmt_xy(true_xy)} m   cell {pose.cell_id}")
        if answer is None or not answer.hypotheses:
            print(f"    no answer within {args.timeout:g} s")
            continue
        top = answer.hypotheses[0]
        xy = r.predicted_xy
        err = r.error_m
        err_text = f"{err:.1f} m" if math.isfinite(err) else f"wrong scene (predicted in {r.predicted_scene})"
        print(f"    published pose      {_fmt_xy(xy)} m   top cell {top.cell_id} (p {top.probability:.2f}); "
              f"confidence {answer.confidence:.2f}")
        print(
            f"    error {err_text}   2-sigma radius {r.radius_2sigma:.1f} m ({answer.covariance_mode}; top cell alone "
            f"{top.ellipse_major_2sigma:.1f} m)   latency {latency:.0f} ms (inference {answer.inference_ms:.0f} ms)"
        )

    answered = [r for r in results if r.answer is not None and r.answer.hypotheses]
    errors = np.array([r.error_m for r in answered], dtype=np.float64)
    finite_ok = all(
        np.isfinite(r.predicted_xy).all() and np.isfinite(r.cov_xy).all() for r in answered
    )
    print(f"\n[demo_client] answered {len(answered)}/{len(results)} instructions")
    if len(errors):
        same = errors[np.isfinite(errors)]
        inside = sum(
            1 for r in answered
            if math.isfinite(r.error_m) and r.error_m <= r.radius_2sigma
        )
        print(
            f"[demo_client] median error {np.median(same):.1f} m over {len(same)} answers in the right scene; "
            f"within 5/10/15 m: {np.mean(errors <= 5):.0%}/{np.mean(errors <= 10):.0%}/{np.mean(errors <= 15):.0%}; "
            f"true position inside the 2-sigma radius: {inside}/{len(answered)}"
            if len(same) else "[demo_client] no answer in the right scene"
        )

    scenes = sorted({str(r.pose.scene_name) for r in results} | {r.predicted_scene for r in answered})
    cells_by_scene = {s: node.fetch_cells(s, min(args.timeout, 30.0)) for s in scenes}
    png = plot_demo(results, cells_by_scene, args.out)
    print(f"[demo_client] map with true/predicted positions and 2-sigma ellipses: {png}")
    print("[demo_client] on a full ROS 2 install, the same instruction by hand:")
    print(f"    {ros2_pub_line(node.get_namespace(), results[0].text)}")
    return 0 if (len(answered) == len(results) and finite_ok) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="demo_client",
        description="Send held-out test instructions to a running spatialoc_ros localizer and report the errors.",
    )
    g = parser.add_argument_group("graph")
    g.add_argument("--namespace", default="/spatialoc", help="namespace of the localizer and map_server (default /spatialoc)")
    g.add_argument("--timeout", type=float, default=120.0,
                   help="seconds to wait for readiness and for each answer (default 120)")
    d = parser.add_argument_group("data")
    d.add_argument("--base_path", "--base-path", default="",
                   help="KITTI360Pose folder holding the test positions; '' = the embedded synthetic city")
    d.add_argument("--split", default="test", choices=("train", "val", "test", "all"),
                   help="split the positions are taken from (default test)")
    d.add_argument("--count", type=int, default=5, help="how many instructions to send (default 5)")
    d.add_argument("--seed", type=int, default=0, help="seed of the position choice (default 0)")
    o = parser.add_argument_group("output")
    o.add_argument("--out", default=os.path.join("out", "demo.png"), help="PNG to write (default out/demo.png)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ros_args = []
    if "--ros-args" in argv:
        cut = argv.index("--ros-args")
        argv, ros_args = argv[:cut], argv[cut:]
    args = build_parser().parse_args(argv)
    if args.count < 1:
        print("[demo_client] --count must be >= 1", file=sys.stderr)
        return 2
    namespace = "/" + args.namespace.strip("/") if args.namespace.strip("/") else "/"
    try:
        with rclpy.init(args=["demo_client", *ros_args]):
            node = DemoClient(namespace)
            try:
                return run(args, node)
            finally:
                node.destroy_node()
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
