"""What the project's lifecycle nodes share: checked parameters, a human-readable phase with
``status`` and ``/diagnostics``, and ``autostart``.

- Parameters come from a table of :class:`spatialoc_ros.ros.params.ParamSpec`; an invalid
  start-up value makes ``configure`` fail with the reason (it is never replaced silently).
- The phase (``unconfigured``, ``loading_model``, ``waiting_for_map``, ``ready``, ``error``, ...)
  says where the node stands inside its lifecycle state; both are published on ``status``
  (std_msgs/String, transient local) and on ``/diagnostics`` (diagnostic_msgs/DiagnosticArray;
  OK when ready, ERROR after a failed transition, WARN otherwise) every
  ``diagnostics_period_s`` and on each change.
- ``autostart`` (default true): once the executor spins, configure, then activate; a failed
  activation is tried again with a growing wait (``retry_wait_s`` doubling up to
  ``retry_max_s``), so that a node started before its dependency comes up by itself. A failed
  configure is final until someone configures again. Under nav2's lifecycle_manager set it false.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Optional

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.lifecycle import Node as LifecycleNode
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from std_msgs.msg import Header, String

from spatialoc_ros.ros.params import ParamSpec, declare_all, refusal

def reliable_qos(depth: int, latched: bool = False) -> QoSProfile:
    """Reliable, keep-last ``depth``; ``latched``: transient local (a late subscriber gets the last)."""
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST, depth=depth, reliability=ReliabilityPolicy.RELIABLE,
        durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE,
    )


STATUS_QOS = reliable_qos(1, latched=True)
DIAGNOSTICS_QOS = reliable_qos(10)
#: Topic of the diagnostics (absolute, as diagnostic_aggregator and rqt_robot_monitor expect).
DIAGNOSTICS_TOPIC = "/diagnostics"

#: Parameters every lifecycle node of the package has.
COMMON_PARAMETERS: dict[str, ParamSpec] = {
    "autostart": ParamSpec(
        True, "Come up to active by itself (configure, then activate; a failed activation is retried with "
              "back-off). Set false when nav2's lifecycle_manager drives the node."),
    "diagnostics_period_s": ParamSpec(
        1.0, "Period of the /diagnostics and status messages, seconds.", 0.1, 60.0),
}


class _RosLogHandler(logging.Handler):
    """Python ``logging`` records of the ROS-free core (logger ``spatialoc_ros``) into the node's
    ROS logger, so that they carry the node's name and level like its own lines."""

    def __init__(self, ros_logger) -> None:
        super().__init__(level=logging.INFO)
        self.ros_logger = ros_logger

    def emit(self, record: logging.LogRecord) -> None:
        message = f"{record.name}: {record.getMessage()}"
        if record.levelno >= logging.ERROR:
            self.ros_logger.error(message)
        elif record.levelno >= logging.WARNING:
            self.ros_logger.warning(message)
        else:
            self.ros_logger.info(message)


class SpatialocLifecycleNode(LifecycleNode):
    """Base of ``localizer`` and ``map_server`` (see the module docstring)."""

    def __init__(self, name: str, parameters: dict[str, ParamSpec], status_topic: str = "status", **kwargs) -> None:
        super().__init__(name, **kwargs)  # lifecycle services: the default (mutually exclusive) group
        self._specs = {**COMMON_PARAMETERS, **parameters}
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self._problems = declare_all(self, self._specs)
        self.add_post_set_parameters_callback(self._after_set_parameters)
        core = logging.getLogger("spatialoc_ros")
        if not any(isinstance(h, _RosLogHandler) for h in core.handlers):
            core.addHandler(_RosLogHandler(self.get_logger()))
        core.setLevel(logging.INFO)
        core.propagate = False
        self._stop = threading.Event()  # the node is shutting down
        self._phase, self._detail = "unconfigured", ""
        self._status_sent = ""
        self._autostart_thread: Optional[threading.Thread] = None
        self._io_group = ReentrantCallbackGroup()
        self._status_pub = self.create_publisher(String, status_topic, STATUS_QOS)
        self._diagnostics_pub = self.create_publisher(DiagnosticArray, DIAGNOSTICS_TOPIC, DIAGNOSTICS_QOS)
        self.create_timer(float(self.get_parameter("diagnostics_period_s").value), self._publish_status,
                          callback_group=self._io_group)
        self._autostart_timer = None
        if self.get_parameter("autostart").value:
            # a timer, so that the transitions start once the executor spins (activation may need it)
            self._autostart_timer = self.create_timer(0.01, self._start_autostart, callback_group=self._io_group)

    # ----------------------------------------------------------------- parameters
    def parameter_values(self) -> dict[str, Any]:
        return {name: self.get_parameter(name).value for name in self._specs}

    def _on_set_parameters(self, params) -> SetParametersResult:
        why = refusal(self._specs, params)
        if why is not None:
            self.get_logger().warning(f"parameter change refused: {why}")
            return SetParametersResult(successful=False, reason=why)
        return SetParametersResult(successful=True)

    def _after_set_parameters(self, params) -> None:
        changes = {p.name: p.value for p in params if p.name in self._specs}
        for name in changes:
            self._problems.pop(name, None)
        if changes:
            dynamic = {k: v for k, v in changes.items() if self._specs[k].dynamic}
            self.on_dynamic_parameters(dynamic)
            later = sorted(set(changes) - set(dynamic))
            self.get_logger().info(
                f"parameters changed: {changes}" + (f" ({', '.join(later)}: at the next configure)" if later else "")
            )

    def on_dynamic_parameters(self, changes: dict[str, Any]) -> None:
        """Hook: parameters that take effect at once were changed (already checked)."""

    def parameter_problem(self) -> Optional[str]:
        """Why the current parameters cannot be configured with, or None."""
        if self._problems:
            return "invalid parameter(s): " + "; ".join(self._problems.values())
        return None

    # ----------------------------------------------------------------- lifecycle helpers
    @property
    def lifecycle_state(self) -> str:
        """Label of the current lifecycle state ('unconfigured', 'inactive', 'active', ...)."""
        return self._state_machine.current_state[1]

    def refuse_transition(self, transition: str, reason: str) -> TransitionCallbackReturn:
        """One ERROR line with the reason; the phase says 'error' until the next transition."""
        self.get_logger().error(f"{transition} failed: {reason}")
        self.set_phase("error", reason[:300])
        return TransitionCallbackReturn.FAILURE

    def autostarting(self) -> bool:
        """True on the autostart thread (a failed activation there will be tried again)."""
        return self._autostart_thread is not None and threading.current_thread() is self._autostart_thread

    def _start_autostart(self) -> None:
        self._autostart_timer.cancel()
        self.destroy_timer(self._autostart_timer)
        self._autostart_thread = threading.Thread(target=self._autostart, name=f"{self.get_name()}-autostart",
                                                  daemon=True)
        self._autostart_thread.start()

    def retry_waits(self) -> tuple[float, float]:
        """(first wait, longest wait) in seconds between autostart activation tries."""
        return 1.0, 30.0

    def _autostart(self) -> None:
        if self.lifecycle_state == "unconfigured" and self.trigger_configure() != TransitionCallbackReturn.SUCCESS:
            return  # the reason is logged; a manual configure can follow
        delay, longest = self.retry_waits()
        attempt = 0
        while not self._stop.is_set() and self.lifecycle_state == "inactive":
            attempt += 1
            if self.trigger_activate() == TransitionCallbackReturn.SUCCESS:
                self._publish_status()  # now 'ready' and 'active' together
                return
            wait = min(delay, longest)
            self.get_logger().warning(f"not active yet (try {attempt}): {self._detail}; activating again in {wait:.1f} s")
            if self._stop.wait(wait):
                return
            delay = min(delay * 2.0, longest)

    # ----------------------------------------------------------------- phase, status, diagnostics
    def set_phase(self, phase: str, detail: str = "") -> None:
        self._phase, self._detail = phase, detail
        self._publish_status()

    @property
    def phase(self) -> str:
        return self._phase

    def status_values(self) -> dict[str, str]:
        """Hook: the node's own key=value pairs for status and diagnostics."""
        return {}

    def _values(self) -> dict[str, str]:
        return {"state": self._phase, "lifecycle": self.lifecycle_state, **self.status_values()}

    def publish_safely(self, publisher, msg) -> None:
        """Publish unless the node is shutting down (a thread may outlive the context by a moment)."""
        if self._stop.is_set() or not self.context.ok():
            return
        try:
            publisher.publish(msg)
        except _rclpy.RCLError:
            if self.context.ok():
                raise

    def _publish_status(self) -> None:
        values = self._values()
        if self._phase == "ready" and values["lifecycle"] != "active":
            return  # activation is finishing: say ready once the lifecycle state is active
        text = " ".join(f"{k}={v}" for k, v in values.items()) + (f" detail={self._detail}" if self._detail else "")
        if text != self._status_sent:
            self._status_sent = text
            self.publish_safely(self._status_pub, String(data=text))
        level = {"ready": DiagnosticStatus.OK, "error": DiagnosticStatus.ERROR}.get(self._phase, DiagnosticStatus.WARN)
        status = DiagnosticStatus(
            level=level, name=f"spatialoc: {self.get_fully_qualified_name()}",
            message=self._phase + (f": {self._detail}" if self._detail else ""),
            hardware_id=values.get("device", ""),
            values=[KeyValue(key=k, value=v) for k, v in values.items()],
        )
        header = Header(stamp=self.get_clock().now().to_msg())
        self.publish_safely(self._diagnostics_pub, DiagnosticArray(header=header, status=[status]))

    # ----------------------------------------------------------------- transitions shared by the nodes
    def configure_node(self) -> TransitionCallbackReturn:
        """Hook: the node's configure (check parameters, load what it needs)."""
        return TransitionCallbackReturn.SUCCESS

    def on_configure(self, state) -> TransitionCallbackReturn:
        try:
            return self.configure_node()
        except Exception as e:  # noqa: BLE001 - rclpy turns an escaping exception into a silent ERROR
            self.release()
            return self.refuse_transition("configure", f"{type(e).__name__}: {e}")

    def release(self) -> None:
        """Hook: free what configure and activate made (threads, models, publishers)."""

    def on_cleanup(self, state) -> TransitionCallbackReturn:
        self.release()
        self.set_phase("unconfigured")
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state) -> TransitionCallbackReturn:
        self.release()
        self.set_phase("finalized")
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state) -> TransitionCallbackReturn:
        self.get_logger().error(f"error while {state.label}: releasing everything (back to unconfigured)")
        self.release()
        self.set_phase("unconfigured", "after an error")
        return TransitionCallbackReturn.SUCCESS

    # ----------------------------------------------------------------- shutdown
    def stop(self) -> None:
        """Stop the node's threads (before the executor shuts down)."""
        self._stop.set()
        if self._autostart_thread is not None and self._autostart_thread is not threading.current_thread():
            # a transition may be busy in numpy or torch; the thread is a daemon: wait a little only
            self._autostart_thread.join(timeout=2.0)


def spin(node_type, args=None, threads: int = 2) -> int:
    """``main`` of a node executable: init, spin ``node_type()`` on a multi-threaded executor,
    stop its threads, shut down; Ctrl-C / SIGTERM is a normal way to stop (exit code 0)."""
    import rclpy
    from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor

    try:
        with rclpy.init(args=args):
            node = node_type()
            executor = MultiThreadedExecutor(num_threads=threads)
            executor.add_node(node)
            try:
                executor.spin()
            finally:
                node.stop()
                executor.shutdown(timeout_sec=1.0)
    except (KeyboardInterrupt, ExternalShutdownException):
        return 0
    return 0
