"""Helpers of the ROS graph tests (not a test module): node processes, a probe node living in the
test process, tiny checkpoints.

Every node runs as a separate process started from the installed executables with the
environment of the ``ros_env`` fixture (localhost-only discovery, a ROS_DOMAIN_ID of its own);
the probe joins the same domain through its own rclpy context.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

NAMESPACE = "/spatialoc"
VALID_TEXT = (
    "The pose is north of a gray building. The pose is east of a dark-green vegetation. "
    "The pose is south of a gray pole."
)


def tiny_checkpoints(folder: Path) -> tuple[str, str]:
    """Random-initialised small coarse and fine checkpoints (seeded), written once per folder."""
    coarse, fine = folder / "coarse.pth", folder / "fine.pth"
    if coarse.is_file() and fine.is_file():
        return str(coarse), str(fine)
    import torch

    from spatialoc_ros.models.builder import build_coarse_model, build_fine_model
    from spatialoc_ros.models.checkpoint import save_checkpoint
    from spatialoc_ros.models.config import CoarseConfig, FineConfig

    tiny = dict(num_points=8, max_objects=12, pointnet_dim=16, dropout=0.0)
    torch.manual_seed(0)
    ccfg = CoarseConfig(embed_dim=16, num_hidden_layers=1, num_heads=2, beose_dim=8, bezier_samples=2, **tiny)
    fcfg = FineConfig(embed_dim=16, num_layers=1, num_heads=2, **tiny)
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(str(coarse), build_coarse_model(ccfg, 384), ccfg, "coarse", {"max_tokens": 24})
    save_checkpoint(str(fine), build_fine_model(fcfg, 384), fcfg, "fine", {"max_tokens": 24})
    return str(coarse), str(fine)


def executable(env: dict, name: str) -> str:
    for entry in env.get("AMENT_PREFIX_PATH", "").split(os.pathsep):
        path = Path(entry, "lib", "spatialoc_ros", name)
        if entry and os.access(path, os.X_OK):
            return str(path)
    raise FileNotFoundError(f"installed executable {name} not found on AMENT_PREFIX_PATH; build first")


class NodeProcess:
    """One installed executable running as a child process, its output in a log file."""

    def __init__(self, name: str, env: dict, log_dir: Path, params: dict, namespace: str = NAMESPACE,
                 remaps: Optional[dict] = None) -> None:
        self.name = name
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}-{time.monotonic_ns()}.log"
        cmd = [executable(env, name), "--ros-args", "-r", f"__ns:={namespace}"]
        for key, value in (remaps or {}).items():
            cmd += ["-r", f"{key}:={value}"]
        for key, value in params.items():
            cmd += ["-p", f"{key}:={value}"]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_mark(self) -> int:
        return len(self.log())

    def wait_log(self, pattern: str, timeout_s: float, since: int = 0) -> Optional[str]:
        """The first log line after offset ``since`` matching ``pattern`` (regex), or None."""
        deadline = time.monotonic() + timeout_s
        rx = re.compile(pattern)
        while True:
            for line in self.log()[since:].splitlines():
                if rx.search(line):
                    return line
            if time.monotonic() > deadline:
                return None
            time.sleep(0.1)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def error_lines(self, since: int = 0) -> list:
        return [line for line in self.log()[since:].splitlines() if line.startswith("[ERROR]")]

    def stop(self, grace_s: float = 8.0) -> Optional[int]:
        """SIGINT, then SIGKILL after ``grace_s``; the exit code (None when it had to be killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return None
        return self.proc.returncode


class Probe:
    """A node in the test process: sends instructions, collects every output of the localizer."""

    def __init__(self, domain_id: int, namespace: str = NAMESPACE) -> None:
        import rclpy
        from geometry_msgs.msg import PoseArray, PoseWithCovarianceStamped
        from rclpy.executors import SingleThreadedExecutor
        from std_msgs.msg import String
        from std_srvs.srv import Trigger
        from visualization_msgs.msg import MarkerArray

        from spatialoc_ros.msg import HypothesisArray
        from spatialoc_ros.ros.localizer_node import INSTRUCTION_QOS, OUTPUT_QOS, STATUS_QOS
        from spatialoc_ros.ros.map_server_node import MAP_MARKERS_QOS
        from spatialoc_ros.srv import GetMapCells
        from rcl_interfaces.srv import SetParameters

        os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"  # this process joins the graph too
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node("test_probe", namespace=namespace, context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.poses, self.arrays, self.details, self.markers, self.statuses, self.map_markers = [], [], [], [], [], []
        n = self.node
        n.create_subscription(PoseWithCovarianceStamped, "pose", self.poses.append, OUTPUT_QOS)
        n.create_subscription(PoseArray, "hypotheses", self.arrays.append, OUTPUT_QOS)
        n.create_subscription(HypothesisArray, "hypotheses_detail", self.details.append, OUTPUT_QOS)
        n.create_subscription(MarkerArray, "markers", self.markers.append, OUTPUT_QOS)
        n.create_subscription(String, "status", lambda m: self.statuses.append(m.data), STATUS_QOS)
        self.map_statuses = []
        n.create_subscription(String, "map_server/status", lambda m: self.map_statuses.append(m.data), STATUS_QOS)
        n.create_subscription(MarkerArray, "map_markers", self.map_markers.append, MAP_MARKERS_QOS)
        from diagnostic_msgs.msg import DiagnosticArray

        self.diagnostics = []
        n.create_subscription(DiagnosticArray, "/diagnostics", self.diagnostics.append, 10)
        self._lifecycle_clients: dict = {}
        self.instruction_pub = n.create_publisher(String, "instruction", INSTRUCTION_QOS)
        self.cells_client = n.create_client(GetMapCells, "get_map_cells")
        self.reload_client = n.create_client(Trigger, "reload_map")
        self.params_client = n.create_client(SetParameters, "localizer/set_parameters")
        self._String = String

    # --- spinning ---------------------------------------------------------------------------
    def spin_until(self, done: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() > deadline:
                return False
            self.executor.spin_once(timeout_sec=0.05)
        return True

    def spin_for(self, seconds: float) -> None:
        self.spin_until(lambda: False, seconds)

    @property
    def status(self) -> str:
        return self.statuses[-1] if self.statuses else ""

    def status_value(self, key: str) -> str:
        m = re.search(rf"\b{key}=(\S+)", self.status)
        return m.group(1) if m else ""

    def wait_state(self, state: str, timeout_s: float) -> bool:
        return self.spin_until(lambda: self.status_value("state") == state, timeout_s)

    def wait_map_state(self, state: str, timeout_s: float) -> bool:
        """Wait until the map server's own status (map_server/status) says state=``state``."""
        def reached() -> bool:
            m = re.search(r"\bstate=(\S+)", self.map_statuses[-1]) if self.map_statuses else None
            return bool(m) and m.group(1) == state
        return self.spin_until(reached, timeout_s)

    def wait_subscriber(self, timeout_s: float = 20.0) -> bool:
        return self.spin_until(lambda: self.instruction_pub.get_subscription_count() > 0, timeout_s)

    # --- instructions -------------------------------------------------------------------------
    def send(self, text: str) -> None:
        self.instruction_pub.publish(self._String(data=text))

    def answer_to(self, text: str, timeout_s: float = 30.0):
        """(detail, pose, pose_array, markers) published for ``text`` (whitespace-normalised)."""
        wanted = " ".join(text.split())
        found = {}

        def complete() -> bool:
            if "detail" not in found:
                match = [d for d in self.details if d.instruction == wanted]
                if not match:
                    return False
                found["detail"] = match[-1]
            stamp = found["detail"].header.stamp
            for key, pool in (("pose", self.poses), ("array", self.arrays)):
                if key not in found:
                    hit = [m for m in pool if m.header.stamp == stamp]
                    if hit:
                        found[key] = hit[-1]
            if "markers" not in found:
                hit = [m for m in self.markers if m.markers and m.markers[0].header.stamp == stamp]
                if hit:
                    found["markers"] = hit[-1]
            return len(found) == 4

        if not self.spin_until(complete, timeout_s):
            return None
        return found["detail"], found["pose"], found["array"], found["markers"]

    # --- services -----------------------------------------------------------------------------
    def call(self, client, request, timeout_s: float = 30.0):
        if not client.wait_for_service(timeout_sec=timeout_s):
            raise TimeoutError(f"service {client.srv_name} not available")
        future = client.call_async(request)
        if not self.spin_until(future.done, timeout_s):
            raise TimeoutError(f"service {client.srv_name} did not answer")
        return future.result()

    def get_cells(self, **fields):
        from spatialoc_ros.srv import GetMapCells

        return self.call(self.cells_client, GetMapCells.Request(**fields))

    def set_localizer_parameter(self, name: str, value):
        from rcl_interfaces.srv import SetParameters
        from rclpy.parameter import Parameter

        request = SetParameters.Request(parameters=[Parameter(name, value=value).to_parameter_msg()])
        return self.call(self.params_client, request).results[0]

    # --- lifecycle -------------------------------------------------------------------------------
    def _lifecycle_client(self, node: str, kind: str):
        from lifecycle_msgs.srv import ChangeState, GetState

        key = (node, kind)
        if key not in self._lifecycle_clients:
            srv = {"get_state": GetState, "change_state": ChangeState}[kind]
            self._lifecycle_clients[key] = self.node.create_client(srv, f"{node}/{kind}")
        return self._lifecycle_clients[key]

    def lifecycle_state(self, node: str, timeout_s: float = 30.0) -> str:
        """Label of the lifecycle state of ``node`` (relative name, e.g. 'localizer')."""
        from lifecycle_msgs.srv import GetState

        return self.call(self._lifecycle_client(node, "get_state"), GetState.Request(), timeout_s).current_state.label

    def change_state(self, node: str, transition: str, timeout_s: float = 120.0) -> bool:
        """Trigger ``transition`` ('configure', 'activate', 'deactivate', 'cleanup', 'shutdown')."""
        from lifecycle_msgs.msg import Transition
        from lifecycle_msgs.srv import ChangeState

        ids = {"configure": Transition.TRANSITION_CONFIGURE, "activate": Transition.TRANSITION_ACTIVATE,
               "deactivate": Transition.TRANSITION_DEACTIVATE, "cleanup": Transition.TRANSITION_CLEANUP}
        request = ChangeState.Request(transition=Transition(id=ids[transition]))
        return self.call(self._lifecycle_client(node, "change_state"), request, timeout_s).success

    def wait_lifecycle(self, node: str, label: str, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if self.lifecycle_state(node, timeout_s=max(1.0, deadline - time.monotonic())) == label:
                    return True
            except TimeoutError:
                pass
            self.spin_for(0.2)
        return False

    # --- a map server of the test's own (hostile on purpose) ----------------------------------------
    def serve_map(self, name: str, respond: Callable):
        """A GetMapCells service ``name`` whose answer is ``respond(response) -> response``."""
        from spatialoc_ros.srv import GetMapCells

        return self.node.create_service(GetMapCells, name, lambda _req, resp: respond(resp))

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()
        self.context.try_shutdown()


class Graph:
    """map_server + localizer as separate processes, and a probe, on one domain."""

    def __init__(self, env: dict, log_dir: Path, map_params: Optional[dict], localizer_params: Optional[dict]) -> None:
        self.env = env
        self.log_dir = log_dir
        self.domain_id = int(env["ROS_DOMAIN_ID"])
        self.map_server = NodeProcess("map_server", env, log_dir, map_params) if map_params is not None else None
        self.localizer = NodeProcess("localizer", env, log_dir, localizer_params) if localizer_params is not None else None
        self.probe = Probe(self.domain_id)

    def start_map_server(self, params: dict) -> NodeProcess:
        self.map_server = NodeProcess("map_server", self.env, self.log_dir, params)
        return self.map_server

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        ok = self.probe.wait_state("ready", timeout_s) and self.probe.wait_subscriber()
        if not ok:
            raise AssertionError(
                f"localizer not ready within {timeout_s} s; status {self.probe.status!r}\n"
                f"--- localizer log ---\n{self.localizer.log()[-3000:] if self.localizer else ''}\n"
                f"--- map_server log ---\n{self.map_server.log()[-2000:] if self.map_server else ''}"
            )

    def close(self) -> dict:
        codes = {}
        self.probe.close()
        for proc in (self.localizer, self.map_server):
            if proc is not None:
                codes[proc.name] = proc.stop()
        return codes


def localizer_params(checkpoints: tuple[str, str], **extra) -> dict:
    params = {
        "coarse_checkpoint": checkpoints[0],
        "fine_checkpoint": checkpoints[1],
        "device": "cpu",
        "service_wait_s": 0.5,
        "service_backoff_max_s": 2.0,
    }
    params.update(extra)
    return params


def street_cloud(seed=0):
    """A 60 x 60 m street: road strip (stuff), buildings / poles / trees / lamps (instances)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    parts, labels, instances = [], [], []
    road = np.c_[rng.uniform(0, 60, 8000), rng.uniform(25, 33, 8000), rng.normal(0, 0.02, 8000)]
    parts.append(road)
    labels += [7] * len(road)  # KITTI-360 id of road
    instances += [0] * len(road)
    for i in range(40):
        c = rng.uniform(0, 60, 2)
        m = 120
        parts.append(np.c_[c[0] + rng.normal(0, 0.8, m), c[1] + rng.normal(0, 0.8, m), rng.uniform(0, 4, m)])
        labels += [[11, 17, 21, 38][i % 4]] * m
        instances += [1000 + i] * m
    xyz = np.concatenate(parts)
    rgb = rng.integers(0, 256, (len(xyz), 3)).astype(np.uint8)
    return xyz, rgb, np.array(labels), np.array(instances)
