"""The ``localizer`` lifecycle node: text instruction in, pose estimate out.

Lifecycle (``rclpy.lifecycle``; nav2's ``lifecycle_manager`` can drive it, see the README):

- **configure**: check the parameters, load and validate the checkpoints (an invalid value or a
  bad file fails the transition with one ERROR line naming it; the node stays unconfigured and
  alive), create the publishers and the map-service client.
- **activate**: fetch the map from the ``GetMapCells`` service, validate the cells
  (:func:`spatialoc_ros.data.validation.validate_cells`: bad cells are dropped with a reason), check
  that the map's frame agrees with ``frame_id``, embed the cells, start answering. Without a usable
  map the transition fails and the node stays inactive.
- **deactivate**: stop answering and drop the map embedding; **cleanup**: free the models (and the
  CUDA cache when on CUDA); **shutdown** from any state.

With ``autostart`` (default true) the node configures and activates itself; while the map service
is missing or has no usable map it tries to activate again, the wait growing from
``service_wait_s`` to ``service_backoff_max_s``. Under a lifecycle manager set ``autostart:=false``.

For each instruction (std_msgs/String on ``instruction``) it publishes, stamped with the ROS time
the instruction was RECEIVED (so AMCL integrates the odometry of the time spent queueing and
inferring):

- ``pose`` (geometry_msgs/PoseWithCovarianceStamped, transient local, depth 1, like AMCL's
  ``amcl_pose``; remap it to ``/initialpose`` to seed AMCL): the estimate of
  :meth:`spatialoc_ros.inference.Localizer.combine` in world metres, z = 0, identity orientation,
  covariance 6x6 with the x-y block in m^2 (by default the moment-matched mixture of the top_k
  hypotheses, so a doubt between cells widens it; parameter ``covariance``) and the unknown
  z/roll/pitch/yaw variances set large; not published when the confidence is below
  ``min_confidence`` (counted as ``pose_suppressed``);
- ``hypotheses`` (geometry_msgs/PoseArray), ``hypotheses_detail`` (spatialoc_ros/HypothesisArray),
  ``markers`` (visualization_msgs/MarkerArray).

Inference runs on a worker thread, with ``inference_threads`` torch CPU threads, fed by a bounded
queue that keeps the newest instructions (``queue_size``); drops are counted and logged. Bad input
is refused with one log line; nothing is published for it. Non-finite model outputs are counted and
logged, never published. Readiness and counters go to ``/diagnostics``
(diagnostic_msgs/DiagnosticArray) and, human-readable, to ``status`` (std_msgs/String, transient
local), e.g. ``state=ready lifecycle=active cells=120 received=3 answered=3 ...``. Service
``reload_map`` (std_srvs/Trigger) fetches the map again; a failed reload keeps the previous map
answering.
"""
from __future__ import annotations

import collections
import re
import threading
import time
import traceback
from dataclasses import dataclass, fields
from typing import Any, Optional

import rclpy
from geometry_msgs.msg import PoseArray, PoseWithCovarianceStamped
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.lifecycle import LifecycleState, TransitionCallbackReturn
from rclpy.time import Time
from std_msgs.msg import String
from std_srvs.srv import Trigger
from visualization_msgs.msg import MarkerArray

from spatialoc_ros.data.validation import validate_cells
from spatialoc_ros.models.vector_index import INDEX_KINDS, PRESELECT_ABOVE
from spatialoc_ros.ros import conversions
from spatialoc_ros.ros.instruction import check_instruction
from spatialoc_ros.ros.lifecycle_base import COMMON_PARAMETERS, STATUS_QOS, SpatialocLifecycleNode, reliable_qos, spin
from spatialoc_ros.ros.params import ParamSpec, frame_problem
from spatialoc_ros.msg import HypothesisArray, InstructionHints
from spatialoc_ros.srv import GetMapCells

NODE_NAME = "localizer"
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
MAX_TOP_K = 100
#: More structured hints than ten times this in one message are refused unread.
MAX_STRUCTURED_HINTS = 12

#: Instructions: deep enough that a burst reaches the node and is counted; the node's own bounded
#: queue (queue_size) then decides what is kept.
INSTRUCTION_QOS = reliable_qos(100)
OUTPUT_QOS = reliable_qos(10)
#: The pose is latched like AMCL's amcl_pose: a late subscriber still gets the last estimate.
POSE_QOS = reliable_qos(1, latched=True)
__all__ = ["INSTRUCTION_QOS", "OUTPUT_QOS", "POSE_QOS", "STATUS_QOS", "PARAMETERS", "LocalizerNode", "main"]


def _device_problem(value: Any) -> Optional[str]:
    if not DEVICE_PATTERN.match(str(value).strip().lower()):
        return f"device must be auto, cpu, cuda or cuda:N, got {value!r}"
    return None


def _service_name_problem(value: Any) -> Optional[str]:
    """Why ``value`` is no valid ROS service name (relative or absolute), or None."""
    from rclpy.exceptions import InvalidServiceNameException, InvalidTopicNameException
    from rclpy.validate_full_topic_name import validate_full_topic_name
    from rclpy.validate_topic_name import validate_topic_name

    text = str(value)
    try:
        validate_topic_name(text, is_service=True)
        validate_full_topic_name(text if text.startswith("/") else "/ns/" + text.lstrip("~/"), is_service=True)
    except (InvalidServiceNameException, InvalidTopicNameException) as e:
        return f"map_service {text!r} is not a valid service name ({str(e).splitlines()[0]})"
    return None


#: Every parameter of the node (one source of truth: config/localizer.yaml mirrors these).
PARAMETERS: dict[str, ParamSpec] = {
    "coarse_checkpoint": ParamSpec(
        "", "Coarse (retrieval) checkpoint .pth; '' = the one shipped in spatialoc_ros/resources/checkpoints."),
    "fine_checkpoint": ParamSpec(
        "", "Fine (UGFL) checkpoint .pth; '' = the one shipped in spatialoc_ros/resources/checkpoints."),
    "text_model": ParamSpec(
        "minilm", "Frozen language model: 'minilm' (shipped), a local model folder, or a name in the local "
                  "Hugging Face cache; '' = the one named in the checkpoints."),
    "device": ParamSpec(
        "auto", "Inference device: auto | cpu | cuda | cuda:N. auto = CUDA when present; CUDA asked for but "
                "absent falls back to the CPU (logged).", check=_device_problem),
    "top_k": ParamSpec(5, f"Hypotheses (retrieved cells) per instruction, 1..{MAX_TOP_K}.", 1, MAX_TOP_K, dynamic=True),
    "frame_id": ParamSpec(
        "", "Frame of the published poses and markers. '' = the map server's frame (GetMapCells.frame_id); "
            "a non-empty value must agree with it, else activation fails.",
        check=lambda value: frame_problem(value, allow_empty=True)),
    "map_service": ParamSpec(
        "get_map_cells", "Name of the GetMapCells service to fetch the map from (relative names follow the "
                         "namespace).", check=_service_name_problem),
    "max_instruction_chars": ParamSpec(
        2000, "Longer instructions are refused (logged), not answered.", 1, 1_000_000, dynamic=True),
    "min_hints": ParamSpec(
        2, "Instructions with fewer usable hints are refused, with a reason naming what was understood.",
        1, 12, dynamic=True),
    "queue_size": ParamSpec(
        1, "Instructions waiting for inference; when full the oldest is dropped (counted, logged).", 1, 10000,
        dynamic=True),
    "service_wait_s": ParamSpec(
        1.0, "How long one activation waits for the map service, seconds; doubled after each failed "
             "autostart try, up to service_backoff_max_s.", 0.01, 3600.0),
    "service_backoff_max_s": ParamSpec(
        30.0, "Longest wait between autostart activation tries, seconds.", 0.01, 86400.0),
    "service_call_timeout_s": ParamSpec(
        60.0, "How long one get_map_cells call may take before it counts as failed, seconds.", 0.1, 3600.0),
    "covariance": ParamSpec(
        "mixture", "Covariance of the published pose: 'mixture' = the moment-matched Gaussian of the top_k "
                   "hypotheses (of the top cell's scene) weighted by their probabilities, so it covers the "
                   "retrieval ambiguity; 'top' = the top hypothesis's in-cell Gaussian alone.",
        check=lambda v: None if v in ("mixture", "top") else f"must be 'mixture' or 'top', got {v!r}",
        dynamic=True),
    "min_confidence": ParamSpec(
        0.0, "Publish `pose` only when the confidence (calibrated probability that the top cell is right) "
             "is at least this, 0..1; hypotheses and the confidence are published with every answer.",
        0.0, 1.0, dynamic=True),
    "embedding_cache_dir": ParamSpec(
        "", "Folder of the on-disk map-embedding cache ('' = none): a restart on the same map and model "
            "loads the embedding instead of recomputing it (keyed by their content; a stale or damaged "
            "file is rebuilt, logged)."),
    "index": ParamSpec(
        "auto", "Short-list back-end of retrieval on large maps: exact (torch top-k over every cell) | faiss "
                f"(inverted-file FAISS index) | auto (FAISS above {PRESELECT_ABOVE:,} cells when installed). The re-ranking "
                "of the short list on every level is exact either way.",
        check=lambda v: None if v in INDEX_KINDS else f"must be one of {', '.join(INDEX_KINDS)}, got {v!r}"),
    "inference_threads": ParamSpec(
        1, "CPU threads torch uses to answer one instruction (0 = torch's default, one per core). One is "
           "as fast per query with the shipped model and leaves no idle OpenMP thread spinning on the "
           "cores the executor needs for the next instruction (README, Latency). Map embedding always "
           "uses torch's default.", 0, 1024),
    "sentence_cache": ParamSpec(
        True, "Keep the language-model features of every distinct hint sentence (faster repeated hints; "
              "bounded LRU)."),
    "warm_sentence_cache": ParamSpec(
        True, "With sentence_cache: encode, at configure, all 840 hint sentences an instruction can be "
              "read into, so that no instruction waits for the language model (MiniLM: a few seconds "
              "once; far longer with a large model such as Flan-T5-large)."),
}


@dataclass(frozen=True)
class LocalizerConfig:
    """The node's parameters as read at configure (dynamic ones are updated when changed)."""

    autostart: bool
    coarse_checkpoint: str
    fine_checkpoint: str
    text_model: str
    device: str
    top_k: int
    frame_id: str
    map_service: str
    max_instruction_chars: int
    min_hints: int
    queue_size: int
    service_wait_s: float
    service_backoff_max_s: float
    service_call_timeout_s: float
    covariance: str
    min_confidence: float
    embedding_cache_dir: str
    index: str
    inference_threads: int
    sentence_cache: bool
    warm_sentence_cache: bool
    diagnostics_period_s: float


assert {f.name for f in fields(LocalizerConfig)} == set(PARAMETERS) | set(COMMON_PARAMETERS), \
    "LocalizerConfig and the parameter tables disagree"


class MapUnavailable(Exception):
    """No usable map could be fetched (the reason is the message)."""


@dataclass
class _Counters:
    received: int = 0
    answered: int = 0
    dropped: int = 0
    rejected: int = 0
    failed: int = 0
    pose_suppressed: int = 0


class LocalizerNode(SpatialocLifecycleNode):
    """See the module docstring."""

    def __init__(self, **kwargs) -> None:
        super().__init__(NODE_NAME, PARAMETERS, **kwargs)
        self.cfg = LocalizerConfig(**self.parameter_values())
        self._lock = threading.Condition()
        self._queue: collections.deque = collections.deque()
        self._reload_requests: list[dict] = []
        self._worker_stop = threading.Event()
        self._worker: Optional[threading.Thread] = None
        self._counts = _Counters()
        self._counts_lock = threading.Lock()
        self._num_cells = 0
        self._frame = ""
        self._device = "?"
        self._localizer = None  # spatialoc_ros.inference.Localizer, from configure to cleanup
        self._map_client = None
        self._pubs: dict[str, Any] = {}
        self._service_group = MutuallyExclusiveCallbackGroup()  # reload_map
        self._client_group = MutuallyExclusiveCallbackGroup()  # map-service responses
        # one mutually exclusive group: instructions are taken in arrival order, so that the bounded
        # queue really keeps the newest (a reentrant group let two callbacks overtake each other)
        self._instruction_group = MutuallyExclusiveCallbackGroup()
        self.create_subscription(String, "instruction", self._on_instruction, INSTRUCTION_QOS,
                                 callback_group=self._instruction_group)
        self.create_subscription(InstructionHints, "instruction_hints", self._on_instruction_hints,
                                 INSTRUCTION_QOS, callback_group=self._instruction_group)
        self.create_service(Trigger, "reload_map", self._on_reload_map, callback_group=self._service_group)
        self.set_phase("unconfigured")

    # ----------------------------------------------------------------- parameters
    def on_dynamic_parameters(self, changes: dict[str, Any]) -> None:
        self.cfg = LocalizerConfig(**{**self.cfg.__dict__, **changes})

    def retry_waits(self) -> tuple[float, float]:
        return self.cfg.service_wait_s, self.cfg.service_backoff_max_s

    # ----------------------------------------------------------------- lifecycle
    def configure_node(self) -> TransitionCallbackReturn:
        problem = self.parameter_problem()
        cfg = LocalizerConfig(**self.parameter_values())
        if problem is None and cfg.service_backoff_max_s < cfg.service_wait_s:
            problem = (f"service_backoff_max_s ({cfg.service_backoff_max_s:g}) must be >= service_wait_s "
                       f"({cfg.service_wait_s:g})")
        if problem is not None:
            return self.refuse_transition("configure", f"{problem}; set valid values and configure again")
        self.cfg = cfg
        self.set_phase("loading_model")
        try:
            from spatialoc_ros.inference import Localizer

            self._localizer = Localizer.from_checkpoints(
                coarse_path=self.cfg.coarse_checkpoint or None,
                fine_path=self.cfg.fine_checkpoint or None,
                text_model=self.cfg.text_model or None,
                device=self.cfg.device,
                fixed_embedding=self.cfg.sentence_cache,
                min_hints=1,  # the node checks its own (dynamic) min_hints first
                index=self.cfg.index,
            )
        except Exception as e:  # noqa: BLE001 - any failure to load is a failed configure, with its cause
            self._localizer = None
            return self.refuse_transition(
                "configure",
                f"cannot load the models: {type(e).__name__}: {e}; fix coarse_checkpoint / fine_checkpoint / "
                "text_model and configure again",
            )
        self._device = str(self._localizer.device)
        if self.cfg.sentence_cache and self.cfg.warm_sentence_cache:
            self.set_phase("loading_model", "encoding the hint sentences")
            t0 = time.perf_counter()
            try:
                count = self._localizer.warm_text_cache()
            except Exception as e:  # noqa: BLE001 - the language model failed on its own vocabulary
                self._localizer = None
                return self.refuse_transition("configure", f"cannot encode the hint sentences: {type(e).__name__}: {e}")
            self.get_logger().info(f"sentence cache: {count} hint sentences encoded in {time.perf_counter() - t0:.1f} s")
        note = getattr(self._localizer, "device_note", None)
        if note:
            self.get_logger().warning(f"device fallback: {note}")
        self._map_client = self.create_client(GetMapCells, self.cfg.map_service, callback_group=self._client_group)
        self._pubs = {
            "pose": self.create_lifecycle_publisher(PoseWithCovarianceStamped, "pose", POSE_QOS),
            "array": self.create_lifecycle_publisher(PoseArray, "hypotheses", OUTPUT_QOS),
            "detail": self.create_lifecycle_publisher(HypothesisArray, "hypotheses_detail", OUTPUT_QOS),
            "markers": self.create_lifecycle_publisher(MarkerArray, "markers", OUTPUT_QOS),
        }
        self.get_logger().info(
            f"configured: models loaded on {self._device} (device parameter {self.cfg.device!r}, "
            f"text model {self.cfg.text_model!r})"
        )
        self.set_phase("inactive")
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.set_phase("waiting_for_map", f"service {self._map_client.srv_name}")
        try:
            message = self._fetch_and_embed(reason="activate", wait_s=self.cfg.service_wait_s)
        except Exception as e:  # noqa: BLE001 - rclpy turns an escaping exception into a silent ERROR
            if not isinstance(e, MapUnavailable):
                e = MapUnavailable(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
            self.set_phase("waiting_for_map" if self.autostarting() else "inactive", str(e)[:300])
            if self.autostarting():
                self.get_logger().warning(f"activation failed, no map yet: {e}")
            else:
                self.get_logger().error(f"activation failed: {e}; the node stays inactive (activate again)")
            return TransitionCallbackReturn.FAILURE
        self._start_worker()
        result = super().on_activate(state)
        self.get_logger().info(f"active: {message}")
        self.set_phase("ready")
        return result

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_worker()
        self._drop_map()
        self.set_phase("inactive")
        return super().on_deactivate(state)

    def release(self) -> None:
        """Stop answering; free the models, publishers and client (and the CUDA cache on CUDA)."""
        self._stop_worker()
        for pub in self._pubs.values():
            self.destroy_lifecycle_publisher(pub)
        self._pubs = {}
        if self._map_client is not None:
            self.destroy_client(self._map_client)
            self._map_client = None
        on_cuda = self._localizer is not None and self._localizer.device.type == "cuda"
        self._localizer = None
        self._num_cells = 0
        if on_cuda:
            import torch

            torch.cuda.empty_cache()

    def _drop_map(self) -> None:
        if self._localizer is not None:
            self._localizer.clear_map()
        self._num_cells = 0

    # ----------------------------------------------------------------- status
    def _count(self, name: str) -> None:
        with self._counts_lock:
            setattr(self._counts, name, getattr(self._counts, name) + 1)

    def status_values(self) -> dict[str, str]:
        c = self._counts
        nonfinite = sum(self._localizer.nonfinite.values()) if self._localizer is not None else 0
        return {
            "cells": str(self._num_cells), "received": str(c.received), "answered": str(c.answered),
            "dropped": str(c.dropped), "rejected": str(c.rejected), "failed": str(c.failed),
            "nonfinite": str(nonfinite), "pose_suppressed": str(c.pose_suppressed), "device": self._device,
            "frame": self._frame or "?",
        }

    # ----------------------------------------------------------------- instruction input
    def _on_instruction(self, msg: String) -> None:
        received = self.get_clock().now()
        self._count("received")
        check = check_instruction(msg.data, self.cfg.max_instruction_chars)
        if not check.ok:
            self._refuse(check.reason)
            return
        self._accept(check.text, check.text, received)

    def _on_instruction_hints(self, msg: InstructionHints) -> None:
        """Structured hints (speech / LLM front-ends): invalid ones are dropped with a reason."""
        from spatialoc_ros.language import ParsedInstruction, render_hints

        received = self.get_clock().now()
        self._count("received")
        if len(msg.hints) > 10 * MAX_STRUCTURED_HINTS:
            self._refuse(f"{len(msg.hints)} hints in one message (more than {10 * MAX_STRUCTURED_HINTS})")
            return
        hints, problems = conversions.msg_to_hints(msg.hints)
        if problems:
            quoted = "; ".join(f"{f}: {r}" for f, r in problems[:3])
            self.get_logger().warning(f"instruction_hints: dropped {len(problems)} invalid hint(s): {quoted}")
        parsed = ParsedInstruction(tuple(hints), tuple(f for f, _ in problems), tuple(r for _, r in problems))
        self._accept(" ".join(render_hints(hints)), parsed, received)

    def _refuse(self, reason: str) -> None:
        self._count("rejected")
        self.get_logger().warning(f"instruction refused: {reason}")

    def _accept(self, text: str, query, received: Time) -> None:
        """Queue an instruction (text or parsed hints) when the node is ready and it says enough."""
        from spatialoc_ros.inference import InstructionRefused, understand

        cfg = self.cfg
        if self.phase != "ready":
            self._refuse(
                f"the map is not ready yet (state {self.phase}, lifecycle {self.lifecycle_state}"
                + (f": {self._detail}" if self._detail else "")
                + "); send it again once the status topic says state=ready"
            )
            return
        try:
            parsed = understand(query, cfg.min_hints)
        except InstructionRefused as e:
            self._refuse(f"{e} (instruction {text[:80]!r})")
            return
        self.get_logger().debug(f"understood {text[:80]!r} as: {parsed.describe()}")
        with self._lock:
            while len(self._queue) >= cfg.queue_size:
                self._queue.popleft()
                self._count("dropped")
                self.get_logger().warning(
                    f"instructions arrive faster than inference: dropped the oldest waiting one "
                    f"(queue_size={cfg.queue_size} keeps the newest; {self._counts.dropped} dropped so far)",
                    throttle_duration_sec=1.0,
                )
            self._queue.append((text, parsed, received, time.perf_counter()))
            self._lock.notify()

    def _on_reload_map(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        worker = self._worker
        if self.phase != "ready" or worker is None or not worker.is_alive():
            response.success = False
            response.message = (f"cannot reload: the node is not active (state {self.phase}, lifecycle "
                                f"{self.lifecycle_state}); activate it first")
            return response
        ticket = {"done": threading.Event(), "success": False, "message": ""}
        with self._lock:
            self._reload_requests.append(ticket)
            self._lock.notify()
        while not ticket["done"].wait(0.5):
            if self._worker_stop.is_set() or not rclpy.ok(context=self.context):
                response.success, response.message = False, "the node is deactivating or shutting down"
                return response
        response.success, response.message = ticket["success"], ticket["message"]
        return response

    # ----------------------------------------------------------------- worker thread
    def _start_worker(self) -> None:
        with self._lock:  # nothing accepted while inactive is answered later with a stale stamp
            self._queue.clear()
        self._worker_stop.clear()
        self._worker = threading.Thread(target=self._run_worker, name="localizer-inference", daemon=True)
        self._worker.start()

    def _stop_worker(self) -> None:
        self._worker_stop.set()
        with self._lock:
            self._lock.notify_all()
        if self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join(timeout=30.0)
        self._worker = None
        with self._lock:
            self._queue.clear()
            tickets, self._reload_requests = self._reload_requests, []
        for ticket in tickets:
            ticket["message"] = "the node stopped answering before the reload ran"
            ticket["done"].set()

    def _run_worker(self) -> None:
        """Answers instructions one by one, and reloads of the map, while active."""
        from spatialoc_ros.inference import intra_op_threads

        while not self._worker_stop.is_set():
            with self._lock:
                while not (self._queue or self._reload_requests or self._worker_stop.is_set()):
                    self._lock.wait(0.5)
                if self._worker_stop.is_set():
                    break
                reloads, self._reload_requests = self._reload_requests, []
                job = self._queue.popleft() if (self._queue and not reloads) else None
            for ticket in reloads:
                try:
                    ticket["message"] = self._fetch_and_embed(reason="reload_map")
                    ticket["success"] = True
                except MapUnavailable as e:
                    ticket["message"] = f"reload failed, the previous map ({self._num_cells} cells) stays: {e}"
                    self.get_logger().error(ticket["message"])
                ticket["done"].set()
            if job is not None:
                with intra_op_threads(self.cfg.inference_threads):
                    self._answer(*job)

    # ----------------------------------------------------------------- the map
    def _fetch_cells(self, wait_s: float):
        """(good cells, frame id) from the map service; MapUnavailable with the reason otherwise."""
        cfg = self.cfg
        service = self._map_client.srv_name
        if not self._map_client.wait_for_service(timeout_sec=wait_s):
            raise MapUnavailable(f"map service {service} is not available")
        future = self._map_client.call_async(GetMapCells.Request())
        done = threading.Event()
        future.add_done_callback(lambda _f: done.set())
        if not done.wait(cfg.service_call_timeout_s):
            self._map_client.remove_pending_request(future)
            raise MapUnavailable(f"map service {service} did not answer within {cfg.service_call_timeout_s:g} s")
        if future.exception() is not None:
            raise MapUnavailable(f"map service {service} failed: {future.exception()}")
        result = future.result()
        if not result.success:
            raise MapUnavailable(f"map service {service} refused: {result.message}")
        if not result.cells:
            raise MapUnavailable(f"map service {service} sent an empty map ({result.message})")
        cells = []
        malformed = 0
        for msg in result.cells:
            try:
                cells.append(conversions.msg_to_cell(msg))
            except ValueError as e:
                malformed += 1
                self.get_logger().warning(f"cell {msg.id!r} from {service} is malformed and dropped: {e}",
                                          throttle_duration_sec=1.0)
        checked = validate_cells(cells, log=self.get_logger().warning, what=f"cells from {service}")
        if not checked.good:
            raise MapUnavailable(f"none of the {len(result.cells)} cells from {service} is usable "
                                 f"({malformed} malformed; {checked.summary()})")
        return checked.good, str(result.frame_id)

    def _fetch_and_embed(self, reason: str, wait_s: Optional[float] = None) -> str:
        """Fetch, validate and embed the map; the current map stays on any failure."""
        cells, frame = self._fetch_cells(self.cfg.service_wait_s if wait_s is None else wait_s)
        if frame_problem(frame) is not None:
            raise MapUnavailable(f"the map service names no usable frame_id ({frame!r}); set the map_server's frame_id")
        if self.cfg.frame_id and self.cfg.frame_id != frame:
            raise MapUnavailable(
                f"frame mismatch: the map is in {frame!r} but frame_id is {self.cfg.frame_id!r}; "
                "set frame_id to '' (use the map's) or to the map server's frame_id"
            )
        if self._num_cells == 0:
            self.set_phase(self.phase, f"embedding {len(cells)} cells")
        t0 = time.perf_counter()
        try:
            kept = self._localizer.set_map(cells, progress=False, cache_dir=self.cfg.embedding_cache_dir or None)
        except (ValueError, RuntimeError) as e:
            raise MapUnavailable(f"cannot embed the map: {type(e).__name__}: {e}") from e
        self._num_cells = kept
        self._frame = frame
        message = f"map of {kept} cells embedded in {time.perf_counter() - t0:.1f} s ({reason}, frame {frame})"
        self.get_logger().info(message)
        if self.phase == "ready":
            self._publish_status()
        return message

    # ----------------------------------------------------------------- answering
    def _answer(self, text: str, parsed, received: Time, queued_at: float) -> None:
        from spatialoc_ros.inference import NonFiniteOutputError

        cfg = self.cfg
        t0 = time.perf_counter()
        try:
            hyps = self._localizer.localize(parsed, top_k=cfg.top_k)
        except NonFiniteOutputError as e:
            self._count("failed")
            self.get_logger().error(f"no answer for {text[:60]!r}: {e}; nothing published")
            return
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
        try:
            estimate = self._localizer.combine(hyps, cfg.covariance)
        except ValueError as e:
            self._count("failed")
            self.get_logger().error(f"no estimate for {text[:60]!r}: {e}; nothing published")
            return
        inference_ms = 1e3 * (time.perf_counter() - t0)
        stamp = received.to_msg()
        frame = self._frame
        publish_pose = estimate.confidence >= cfg.min_confidence
        try:  # what the robot waits for first: the pose, then the detail; rviz's markers last
            pose = conversions.gaussian_to_pose_stamped(estimate.mean_xy, estimate.cov_xy, frame, stamp)
        except ValueError as e:  # a non-finite value reached the conversions: refuse, never publish it
            self._count("failed")
            self.get_logger().error(f"answer for {text[:60]!r} not publishable: {e}")
            return
        if self.lifecycle_state != "active" or not self._pubs:
            return  # deactivated meanwhile
        if publish_pose:
            self.publish_safely(self._pubs["pose"], pose)
        try:
            detail = conversions.hypotheses_to_msg(hyps, frame, stamp, text, inference_ms, understood=parsed,
                                                   estimate=estimate, pose_published=publish_pose)
            array = conversions.hypotheses_to_pose_array(hyps, frame, stamp)
            markers = conversions.hypotheses_to_markers(hyps, frame, stamp, estimate=estimate)
        except ValueError as e:  # the hypotheses are finite (non-finite ones were left out): a bug
            self._count("failed")
            self.get_logger().error(f"hypotheses of {text[:60]!r} not publishable: {e}")
            return
        if not publish_pose:
            self._count("pose_suppressed")
            self.get_logger().info(f"confidence {estimate.confidence:.2f} < min_confidence {cfg.min_confidence:.2f}: "
                                   "pose not published (hypotheses are)")
        if self.lifecycle_state == "active" and self._pubs:
            self.publish_safely(self._pubs["detail"], detail)
            self.publish_safely(self._pubs["array"], array)
            self.publish_safely(self._pubs["markers"], markers)
        self._count("answered")
        top = hyps[0]
        self.get_logger().info(
            f"answered in {inference_ms:.0f} ms (queued {1e3 * (t0 - queued_at):.0f} ms): cell {top.cell_id} "
            f"({top.mean_xy[0]:.1f}, {top.mean_xy[1]:.1f}) score {top.score:.3f} confidence {estimate.confidence:.2f}"
        )

    # ----------------------------------------------------------------- shutdown
    def stop(self) -> None:
        """Stop every thread of the node (before the executor shuts down)."""
        super().stop()
        self._stop_worker()


def main(args=None) -> int:
    return spin(LocalizerNode, args, threads=4)


if __name__ == "__main__":
    raise SystemExit(main())
