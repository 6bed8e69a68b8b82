"""The ``localizer`` node: text instruction in, pose estimate out.

On start it loads the models (:class:`spatialoc_ros.inference.Localizer`), waits for the map
service (exponential back-off, logged, never gives up), fetches the cells and embeds them once.
Then, for each instruction (std_msgs/String on ``instruction``) it publishes, with one stamp:

- ``pose`` (geometry_msgs/PoseWithCovarianceStamped): the top-1 mean in world metres, z = 0,
  identity orientation, covariance 6x6 row-major with the x-y block in m^2 and the unknown
  z/roll/pitch/yaw variances set large;
- ``hypotheses`` (geometry_msgs/PoseArray): the top-k means;
- ``hypotheses_detail`` (spatialoc_ros/HypothesisArray): the top-k with scores and covariances;
- ``markers`` (visualization_msgs/MarkerArray): the top-1 2-sigma ellipse, the top-k cells, scores.

Inference runs on a worker thread fed by a bounded queue that keeps the newest instructions
(``queue_size``); drops are counted and logged. Bad input (empty, whitespace-only, too long,
nonsense, or anything before the map is ready) is refused with one log line; nothing is published
for it and the node carries on. ``status`` (std_msgs/String, transient local) tells where the node
stands, e.g. ``state=ready cells=120 received=3 answered=3 dropped=0 rejected=0 device=cpu``.
Service ``reload_map`` (std_srvs/Trigger) fetches and embeds the map again.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import re
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Optional

import rclpy
from geometry_msgs.msg import PoseArray, PoseWithCovarianceStamped
from rcl_interfaces.msg import ParameterDescriptor, ParameterType, SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from std_msgs.msg import String
from std_srvs.srv import Trigger
from visualization_msgs.msg import MarkerArray

from spatialoc_ros.ros import conversions
from spatialoc_ros.ros.instruction import check_instruction
from spatialoc_ros.ros.params import declare_or_default
from spatialoc_ros.msg import HypothesisArray
from spatialoc_ros.srv import GetMapCells

NODE_NAME = "localizer"
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
MAX_TOP_K = 100

#: Deep enough that a burst reaches the node and is counted; the node's own bounded queue
#: (queue_size) then decides what is kept.
INSTRUCTION_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST, depth=100, reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.VOLATILE,
)
OUTPUT_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.VOLATILE,
)
STATUS_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.TRANSIENT_LOCAL,
)


@dataclass(frozen=True)
class LocalizerConfig:
    """The node's parameters (defaults here; descriptions in :data:`PARAMETERS`)."""

    coarse_checkpoint: str = ""
    fine_checkpoint: str = ""
    text_model: str = "minilm"
    device: str = "auto"
    top_k: int = 5
    frame_id: str = "map"
    map_service: str = "get_map_cells"
    max_instruction_chars: int = 2000
    queue_size: int = 1
    service_wait_s: float = 1.0
    service_backoff_max_s: float = 30.0
    service_call_timeout_s: float = 60.0
    sentence_cache: bool = True


#: name -> (description, type, read_only). Read-only ones only take effect at start.
PARAMETERS: dict[str, tuple[str, int, bool]] = {
    "coarse_checkpoint": (
        "Coarse (retrieval) checkpoint .pth; '' = the one shipped in spatialoc_ros/resources/checkpoints.",
        ParameterType.PARAMETER_STRING, True,
    ),
    "fine_checkpoint": (
        "Fine (UGFL) checkpoint .pth; '' = the one shipped in spatialoc_ros/resources/checkpoints.",
        ParameterType.PARAMETER_STRING, True,
    ),
    "text_model": (
        "Frozen language model: 'minilm' (shipped), a local model folder, or a name in the local "
        "Hugging Face cache; '' = the one named in the checkpoints.",
        ParameterType.PARAMETER_STRING, True,
    ),
    "device": (
        "Inference device: auto | cpu | cuda | cuda:N. auto = CUDA when present; CUDA asked for "
        "but absent falls back to the CPU (logged).",
        ParameterType.PARAMETER_STRING, True,
    ),
    "top_k": (f"Hypotheses (retrieved cells) per instruction, 1..{MAX_TOP_K}.", ParameterType.PARAMETER_INTEGER, False),
    "frame_id": ("Frame of the published poses and markers (the map's world frame).", ParameterType.PARAMETER_STRING, False),
    "map_service": (
        "Name of the GetMapCells service to fetch the map from (relative names follow the namespace).",
        ParameterType.PARAMETER_STRING, True,
    ),
    "max_instruction_chars": (
        "Longer instructions are refused (logged), not answered.", ParameterType.PARAMETER_INTEGER, False,
    ),
    "queue_size": (
        "Instructions waiting for inference; when full the oldest is dropped (counted, logged).",
        ParameterType.PARAMETER_INTEGER, False,
    ),
    "service_wait_s": (
        "First wait for the map service, seconds; doubled after each failed try.",
        ParameterType.PARAMETER_DOUBLE, False,
    ),
    "service_backoff_max_s": (
        "Longest wait between tries to reach the map service, seconds.", ParameterType.PARAMETER_DOUBLE, False,
    ),
    "service_call_timeout_s": (
        "How long one get_map_cells call may take before it counts as failed, seconds.",
        ParameterType.PARAMETER_DOUBLE, False,
    ),
    "sentence_cache": (
        "Keep the language-model features of every distinct hint sentence (faster repeated hints; "
        "memory grows with the number of distinct sentences seen).",
        ParameterType.PARAMETER_BOOL, True,
    ),
}


def check_parameter(name: str, value: Any) -> Optional[str]:
    """Why ``value`` is not acceptable for parameter ``name``, or None when it is."""
    if name == "top_k" and not (1 <= int(value) <= MAX_TOP_K):
        return f"top_k must be in 1..{MAX_TOP_K}, got {value}"
    if name == "device" and not DEVICE_PATTERN.match(str(value).strip().lower()):
        return f"device must be auto, cpu, cuda or cuda:N, got {value!r}"
    if name in ("frame_id", "map_service") and (not str(value).strip() or any(c.isspace() for c in str(value))):
        return f"{name} must be a non-empty name without spaces, got {value!r}"
    if name == "max_instruction_chars" and int(value) < 1:
        return f"max_instruction_chars must be >= 1, got {value}"
    if name == "queue_size" and not (1 <= int(value) <= 10000):
        return f"queue_size must be in 1..10000, got {value}"
    if name in ("service_wait_s", "service_backoff_max_s", "service_call_timeout_s"):
        if not (math.isfinite(float(value)) and float(value) > 0):
            return f"{name} must be a positive number of seconds, got {value}"
    return None


@dataclass
class _Counters:
    received: int = 0
    answered: int = 0
    dropped: int = 0
    rejected: int = 0
    failed: int = 0


class LocalizerNode(Node):
    """See the module docstring."""

    def __init__(self, **kwargs) -> None:
        super().__init__(NODE_NAME, **kwargs)
        self.cfg = self._read_parameters()
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.add_post_set_parameters_callback(self._after_set_parameters)

        self._lock = threading.Condition()
        self._queue: collections.deque = collections.deque()
        self._reload_requests: list[dict] = []
        self._stop = threading.Event()
        self._counts = _Counters()
        self._counts_lock = threading.Lock()
        self._state = "starting"
        self._detail = ""
        self._num_cells = 0
        self._device = "?"
        self._localizer = None  # spatialoc_ros.inference.Localizer, built on the worker thread
        self._status_sent = ""

        self._service_group = MutuallyExclusiveCallbackGroup()
        self._client_group = MutuallyExclusiveCallbackGroup()
        self._map_client = self.create_client(
            GetMapCells, self.cfg.map_service, callback_group=self._client_group
        )
        self._pose_pub = self.create_publisher(PoseWithCovarianceStamped, "pose", OUTPUT_QOS)
        self._array_pub = self.create_publisher(PoseArray, "hypotheses", OUTPUT_QOS)
        self._detail_pub = self.create_publisher(HypothesisArray, "hypotheses_detail", OUTPUT_QOS)
        self._markers_pub = self.create_publisher(MarkerArray, "markers", OUTPUT_QOS)
        self._status_pub = self.create_publisher(String, "status", STATUS_QOS)
        self.create_subscription(String, "instruction", self._on_instruction, INSTRUCTION_QOS)
        self.create_service(Trigger, "reload_map", self._on_reload_map, callback_group=self._service_group)
        self.create_timer(1.0, self._publish_status)
        self._set_state("starting")

        self._worker = threading.Thread(target=self._run_worker, name="localizer-inference", daemon=True)
        self._worker.start()

    # ----------------------------------------------------------------- parameters
    def _read_parameters(self) -> LocalizerConfig:
        defaults = LocalizerConfig()
        values = {}
        for name, (description, ptype, read_only) in PARAMETERS.items():
            descriptor = ParameterDescriptor(description=description, type=ptype, read_only=read_only)
            value = declare_or_default(self, name, getattr(defaults, name), descriptor)
            problem = check_parameter(name, value)
            if problem is not None:
                self.get_logger().error(f"invalid parameter: {problem}; using the default {getattr(defaults, name)!r}")
                value = getattr(defaults, name)
            values[name] = value
        cfg = LocalizerConfig(**values)
        if cfg.service_backoff_max_s < cfg.service_wait_s:
            cfg = dataclasses.replace(cfg, service_backoff_max_s=cfg.service_wait_s)
        return cfg

    def _on_set_parameters(self, params) -> SetParametersResult:
        for p in params:
            if p.name not in PARAMETERS:
                continue
            problem = check_parameter(p.name, p.value)
            if problem is not None:
                self.get_logger().warning(f"parameter change refused: {problem}")
                return SetParametersResult(successful=False, reason=problem)
        return SetParametersResult(successful=True)

    def _after_set_parameters(self, params) -> None:
        changes = {p.name: p.value for p in params if p.name in PARAMETERS}
        if changes:
            self.cfg = dataclasses.replace(self.cfg, **changes)
            self.get_logger().info(f"parameters changed: {changes}")

    # ----------------------------------------------------------------- status
    def _count(self, name: str) -> None:
        with self._counts_lock:
            setattr(self._counts, name, getattr(self._counts, name) + 1)

    def _set_state(self, state: str, detail: str = "") -> None:
        self._state, self._detail = state, detail
        self._publish_status()

    def _status_text(self) -> str:
        c = self._counts
        text = (
            f"state={self._state} cells={self._num_cells} received={c.received} answered={c.answered} "
            f"dropped={c.dropped} rejected={c.rejected} failed={c.failed} device={self._device}"
        )
        return text + (f" detail={self._detail}" if self._detail else "")

    def _publish(self, publisher, msg) -> None:
        """Publish unless the node is shutting down (the worker may outlive the context by a moment)."""
        if self._stop.is_set() or not self.context.ok():
            return
        try:
            publisher.publish(msg)
        except _rclpy.RCLError:
            if self.context.ok():
                raise
            # the context was shut down between the check and the call: nothing left to publish to

    def _publish_status(self) -> None:
        text = self._status_text()
        if text != self._status_sent:
            self._status_sent = text
            self._publish(self._status_pub, String(data=text))

    # ----------------------------------------------------------------- instruction input
    def _on_instruction(self, msg: String) -> None:
        cfg = self.cfg
        self._count("received")
        check = check_instruction(msg.data, cfg.max_instruction_chars)
        if not check.ok:
            self._count("rejected")
            self.get_logger().warning(f"instruction refused: {check.reason}")
            return
        if self._state != "ready":
            self._count("rejected")
            self.get_logger().warning(
                f"instruction refused: the map is not ready yet (state {self._state}"
                + (f": {self._detail}" if self._detail else "")
                + "); send it again once the status topic says state=ready"
            )
            return
        with self._lock:
            while len(self._queue) >= cfg.queue_size:
                self._queue.popleft()
                self._count("dropped")
                self.get_logger().warning(
                    f"instructions arrive faster than inference: dropped the oldest waiting one "
                    f"(queue_size={cfg.queue_size} keeps the newest; {self._counts.dropped} dropped so far)",
                    throttle_duration_sec=1.0,
                )
            self._queue.append((check.text, time.perf_counter()))
            self._lock.notify()

    def _on_reload_map(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        if not self._worker.is_alive():
            response.success = False
            response.message = f"cannot reload: the models are not loaded ({self._detail})"
            return response
        ticket = {"done": threading.Event(), "success": False, "message": ""}
        with self._lock:
            self._reload_requests.append(ticket)
            self._lock.notify()
        while not ticket["done"].wait(0.5):
            if self._stop.is_set() or not rclpy.ok(context=self.context):
                response.success, response.message = False, "node is shutting down"
                return response
        response.success, response.message = ticket["success"], ticket["message"]
        return response

    # ----------------------------------------------------------------- worker thread
    def _run_worker(self) -> None:
        """Owns the model: loads it, fetches the map, then answers instructions one by one."""
        if not self._load_model() or self._stop.is_set():
            return
        self._acquire_map_with_backoff()
        while not self._stop.is_set():
            with self._lock:
                while not (self._queue or self._reload_requests or self._stop.is_set()):
                    self._lock.wait(0.5)
                if self._stop.is_set():
                    break
                reloads, self._reload_requests = self._reload_requests, []
                job = self._queue.popleft() if (self._queue and not reloads) else None
            for ticket in reloads:
                ticket["success"], ticket["message"], _ = self._fetch_and_embed(reason="reload_map")
                ticket["done"].set()
            if job is not None:
                self._answer(*job)
        for ticket in self._reload_requests:
            ticket["done"].set()

    def _load_model(self) -> bool:
        cfg = self.cfg
        self._set_state("loading_model")
        try:
            from spatialoc_ros.inference import Localizer

            self._localizer = Localizer.from_checkpoints(
                coarse_path=cfg.coarse_checkpoint or None,
                fine_path=cfg.fine_checkpoint or None,
                text_model=cfg.text_model or None,
                device=cfg.device,
                fixed_embedding=cfg.sentence_cache,
            )
        except (OSError, ValueError, RuntimeError, KeyError, ImportError) as e:
            reason = f"cannot load the models: {type(e).__name__}: {e}"
            self.get_logger().error(
                f"{reason}; the node stays up but answers nothing (fix coarse_checkpoint/fine_checkpoint/"
                "text_model and restart)"
            )
            self._set_state("error", reason[:300])
            return False
        self._device = str(self._localizer.device)
        note = getattr(self._localizer, "device_note", None)
        if note:
            self.get_logger().warning(f"device fallback: {note}")
        self.get_logger().info(
            f"models loaded on {self._device} (device parameter {cfg.device!r}, text model {cfg.text_model!r})"
        )
        return True

    def _acquire_map_with_backoff(self) -> None:
        """Try until a map is embedded: while the service is absent, wait for it (the wait grows
        from service_wait_s to service_backoff_max_s); when it answers without a usable map,
        sleep that long before asking again."""
        self._set_state("waiting_for_map", f"service {self._map_client.srv_name}")
        delay = self.cfg.service_wait_s
        attempt = 0
        while not self._stop.is_set() and self.context.ok():
            attempt += 1
            ok, message, reachable = self._fetch_and_embed(reason=f"start, try {attempt}", wait_s=delay)
            if ok:
                return
            self.get_logger().warning(
                f"no map yet (try {attempt}): {message}; "
                + (f"asking again in {delay:.1f} s" if reachable else f"waiting up to {min(2 * delay, self.cfg.service_backoff_max_s):.1f} s for it")
            )
            if reachable and self._stop.wait(delay):
                return
            with self._lock:  # reload requests meanwhile: this loop is already retrying
                tickets, self._reload_requests = self._reload_requests, []
            for ticket in tickets:
                ticket["success"], ticket["message"] = False, f"no map yet: {message} (retrying on its own)"
                ticket["done"].set()
            delay = min(delay * 2.0, self.cfg.service_backoff_max_s)

    def _fetch_and_embed(self, reason: str, wait_s: Optional[float] = None) -> tuple[bool, str, bool]:
        """Fetch the map and embed it; on failure keep the current map.

        Returns (success, message, service_reachable)."""
        cfg = self.cfg
        had_map = self._num_cells > 0
        service = self._map_client.srv_name
        if not self._map_client.wait_for_service(timeout_sec=wait_s if wait_s is not None else cfg.service_wait_s):
            return False, f"map service {service} is not available", False
        future = self._map_client.call_async(GetMapCells.Request())
        done = threading.Event()
        future.add_done_callback(lambda _f: done.set())
        if not done.wait(cfg.service_call_timeout_s):
            self._map_client.remove_pending_request(future)
            return False, f"map service {service} did not answer within {cfg.service_call_timeout_s:g} s", True
        if future.exception() is not None:
            return False, f"map service {service} failed: {future.exception()}", True
        result = future.result()
        if not result.success:
            return False, f"map service {service} refused: {result.message}", True
        if not result.cells:
            return False, f"map service {service} sent an empty map ({result.message})", True
        try:
            cells = conversions.msgs_to_cells(result.cells)
        except ValueError as e:
            return False, f"map from {service} is malformed: {e}", True
        usable = [c for c in cells if c.objects and all(len(o.xyz) > 0 for o in c.objects)]
        if len(usable) < len(cells):
            skipped = [c.id for c in cells if not (c.objects and all(len(o.xyz) > 0 for o in c.objects))]
            self.get_logger().warning(
                f"skipping {len(skipped)} of {len(cells)} cell(s) without objects or with empty objects "
                f"(e.g. {skipped[0]}); they cannot match any description"
            )
        if not usable:
            return False, f"none of the {len(cells)} cells from {service} holds objects", True
        if not had_map:
            self._set_state("embedding_map", f"{len(usable)} cells")
        t0 = time.perf_counter()
        try:
            self._localizer.set_map(usable, progress=False)
        except (ValueError, RuntimeError) as e:
            message = f"cannot embed the map: {type(e).__name__}: {e}"
            self.get_logger().error(message)
            self._num_cells = 0  # the Localizer's previous index is gone too
            self._set_state("waiting_for_map", message)
            return False, message, True
        self._num_cells = len(usable)
        message = f"map of {len(usable)} cells embedded in {time.perf_counter() - t0:.1f} s ({reason})"
        self.get_logger().info(message)
        self._set_state("ready")
        return True, message, True

    def _answer(self, text: str, received_at: float) -> None:
        cfg = self.cfg
        t0 = time.perf_counter()
        try:
            hyps = self._localizer.localize(text, top_k=cfg.top_k)
        except ValueError as e:  # the inference API's refusal of a text: bad input, not a bug
            self._count("rejected")
            self.get_logger().warning(f"instruction refused by the model: {e}")
            return
        except Exception as e:  # noqa: BLE001 - keep the node alive, but say exactly what failed
            self._count("failed")
            self.get_logger().error(
                f"inference failed for {text[:60]!r}: {type(e).__name__}: {e}\n{traceback.format_exc()}"
            )
            return
        inference_ms = 1e3 * (time.perf_counter() - t0)
        finite = [h for h in hyps if conversions.is_finite_hypothesis(h)]
        if len(finite) < len(hyps):
            self.get_logger().error(
                f"{len(hyps) - len(finite)} of {len(hyps)} hypotheses were not finite and are left out"
            )
        if not finite:
            self._count("failed")
            self.get_logger().error(f"no finite hypothesis for {text[:60]!r}; nothing published")
            return
        stamp = self.get_clock().now().to_msg()
        self._publish(self._detail_pub, conversions.hypotheses_to_msg(finite, cfg.frame_id, stamp, text, inference_ms))
        self._publish(self._pose_pub, conversions.hypothesis_to_pose_stamped(finite[0], cfg.frame_id, stamp))
        self._publish(self._array_pub, conversions.hypotheses_to_pose_array(finite, cfg.frame_id, stamp))
        self._publish(self._markers_pub, conversions.hypotheses_to_markers(finite, cfg.frame_id, stamp))
        self._count("answered")
        top = finite[0]
        self.get_logger().info(
            f"answered in {inference_ms:.0f} ms (queued {1e3 * (t0 - received_at):.0f} ms): cell {top.cell_id} "
            f"({top.mean_xy[0]:.1f}, {top.mean_xy[1]:.1f}) score {top.score:.3f}"
        )

    # ----------------------------------------------------------------- shutdown
    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            self._lock.notify_all()
        self._worker.join(timeout=5.0)


def main(args=None) -> int:
    try:
        with rclpy.init(args=args):
            node = LocalizerNode()
            executor = MultiThreadedExecutor(num_threads=3)
            executor.add_node(node)
            try:
                executor.spin()
            finally:
                node.stop()
                executor.shutdown(timeout_sec=1.0)
    except (KeyboardInterrupt, ExternalShutdownException):
        return 0  # Ctrl-C / SIGTERM: a normal way to stop a node
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
