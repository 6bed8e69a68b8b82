"""Instruction -> pose latency over real ROS 2, next to the bare inference call, and a load test.

    python benchmarks/ros_latency.py [--device cpu] [--queries 100] [--load_seconds 60] [--rate 20]

1. Starts the installed ``map_server`` and ``localizer`` as separate processes (namespace
   /spatialoc, localhost discovery, a private ROS_DOMAIN_ID, inside ``unshare -n`` when possible).
2. Latency: publishes held-out test instructions one at a time and times publish -> the matching
   ``pose`` message arriving in this process (p50 / p99 / mean).
3. Bare: the same texts through :meth:`Localizer.estimate` (what the node publishes: localize +
   combine) in this process, same checkpoints, device, map (fetched from the map server) and
   sentence-cache setting, interleaved with step 2 text by text so both see the same machine load.
   The node's own inference time (``inference_ms`` of each answer) is reported next to both.
4. Load: ``--rate`` instructions/s for ``--load_seconds`` s; counts answers, drops (the node's
   status counters) and samples the localizer's resident memory (RSS) from start to end.

Results are printed and written as JSON (``--out``, default out/ros_latency.json).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from spatialoc_ros import demo  # noqa: E402  (install lookup, netns helpers)
from spatialoc_ros.cli import device_name  # noqa: E402

NAMESPACE = "/spatialoc"
_NETNS_FLAG = "SPATIALOC_BENCH_IN_NETNS"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    m = p.add_argument_group("model")
    m.add_argument("--device", default="auto", type=device_name, metavar="{auto,cpu,cuda,cuda:N}")
    m.add_argument("--coarse_checkpoint", default="", help="'' = shipped")
    m.add_argument("--fine_checkpoint", default="", help="'' = shipped")
    m.add_argument("--text_model", default="minilm")
    m.add_argument("--top_k", type=int, default=5)
    d = p.add_argument_group("data")
    d.add_argument("--base_path", default="", help="KITTI360Pose folder; '' = the embedded synthetic city")
    d.add_argument("--scenes", nargs="*", default=[],
                   help="scenes the map server serves (default: the test split); e.g. the test scenes plus "
                        "2013_05_28_drive_0000_sync, _0002_, _0004_ and _0006_ give a 2,127-cell map of the default city")
    d.add_argument("--queries", type=int, default=100, help="timed instructions (one at a time)")
    d.add_argument("--warmup", type=int, default=3, help="untimed instructions first")
    d.add_argument("--settle_ms", type=float, default=20.0,
                   help="pause of at least this after each ROS answer and each bare call, so that neither "
                        "is timed while the other's process still works (the node publishes its detail and "
                        "markers after the pose)")
    d.add_argument("--seed", type=int, default=0)
    lo = p.add_argument_group("load")
    lo.add_argument("--load_seconds", type=float, default=60.0, help="duration of the load test (0 = skip)")
    lo.add_argument("--rate", type=float, default=20.0, help="instructions per second during the load test")
    lo.add_argument("--queue_size", type=int, default=1, help="localizer queue_size parameter")
    r = p.add_argument_group("run")
    r.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the nodes")
    r.add_argument("--no_netns", action="store_true", help="do not re-run inside unshare -n")
    r.add_argument("--out", default=os.path.join("out", "ros_latency.json"))
    args = p.parse_args(argv)
    if not (np.isfinite(args.settle_ms) and args.settle_ms >= 0):
        p.error(f"--settle_ms must be a finite number >= 0, got {args.settle_ms}")
    return args


class Probe:
    """Publisher of instructions; records the arrival time of every pose and detail."""

    def __init__(self, domain_id: int) -> None:
        import rclpy
        from geometry_msgs.msg import PoseWithCovarianceStamped
        from rclpy.executors import SingleThreadedExecutor
        from std_msgs.msg import String

        from spatialoc_ros.msg import HypothesisArray
        from spatialoc_ros.ros.localizer_node import INSTRUCTION_QOS, OUTPUT_QOS, STATUS_QOS
        from spatialoc_ros.srv import GetMapCells

        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node("latency_probe", namespace=NAMESPACE, context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.poses: list[tuple[float, object]] = []
        self.details: dict[str, object] = {}
        self.status = ""
        n = self.node
        n.create_subscription(PoseWithCovarianceStamped, "pose",
                              lambda m: self.poses.append((time.perf_counter(), m)), OUTPUT_QOS)
        n.create_subscription(HypothesisArray, "hypotheses_detail",
                              lambda m: self.details.__setitem__(m.instruction, m), OUTPUT_QOS)
        n.create_subscription(String, "status", lambda m: setattr(self, "status", m.data), STATUS_QOS)
        self.pub = n.create_publisher(String, "instruction", INSTRUCTION_QOS)
        self.cells_client = n.create_client(GetMapCells, "get_map_cells")
        self._String, self._GetMapCells = String, GetMapCells

    def spin_until(self, done, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() > deadline:
                return False
            self.executor.spin_once(timeout_sec=0.05)  # returns as soon as something arrives
        return True

    def counter(self, key: str) -> int:
        m = re.search(rf"\b{key}=(\d+)", self.status)
        return int(m.group(1)) if m else 0

    def send(self, text: str) -> float:
        t0 = time.perf_counter()
        self.pub.publish(self._String(data=text))
        return t0

    def ask(self, text: str, timeout_s: float = 60.0) -> tuple[float, object]:
        """(latency in ms from publishing ``text`` to receiving its pose, its HypothesisArray);
        (nan, None) on timeout."""
        key = " ".join(text.split())
        self.details.pop(key, None)
        t0 = self.send(text)

        def arrived():
            d = self.details.get(key)
            return d is not None and any(m.header.stamp == d.header.stamp for _, m in self.poses[-5:])

        if not self.spin_until(arrived, timeout_s):
            return float("nan"), None
        stamp = self.details[key].header.stamp
        t1 = next(t for t, m in reversed(self.poses) if m.header.stamp == stamp)
        return 1e3 * (t1 - t0), self.details[key]

    def cells(self):
        from spatialoc_ros.ros.conversions import msgs_to_cells

        self.cells_client.wait_for_service(timeout_sec=30)
        future = self.cells_client.call_async(self._GetMapCells.Request())
        self.spin_until(future.done, 60)
        return msgs_to_cells(future.result().cells)

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()
        self.context.try_shutdown()


def stats(ms: list[float]) -> dict:
    a = np.asarray([v for v in ms if np.isfinite(v)], dtype=np.float64)
    if len(a) == 0:
        return {"n": 0}
    return {"n": int(len(a)), "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean()), "max_ms": float(a.max()), "lost": int(len(ms) - len(a))}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if not args.no_netns and os.environ.get(_NETNS_FLAG) != "1" and demo._netns_usable():
        env = dict(os.environ, **{_NETNS_FLAG: "1"})
        cmd = ["unshare", "-n", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
               sys.executable, os.path.abspath(__file__), *argv]
        return subprocess.call(cmd, env=env)

    import psutil

    from spatialoc_ros.data.loading import load_split, query_text

    base = args.base_path
    if not base:
        from spatialoc_ros.data.synthetic import ensure_default_city

        base = ensure_default_city(log=print)
    poses = load_split(base, "test", with_direction=False).poses
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(poses))
    texts = [query_text(poses[i]) for i in order[: args.warmup + args.queries]]
    load_texts = [query_text(poses[i]) for i in order]

    env = dict(os.environ, ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST", PYTHONUNBUFFERED="1",
               ROS_DOMAIN_ID=str(1 + os.getpid() % 100))
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    out_dir = Path(os.path.dirname(os.path.abspath(args.out)))
    out_dir.mkdir(parents=True, exist_ok=True)
    config = demo.install_prefix() / "share" / "spatialoc_ros" / "config"
    loc_params = {"device": args.device, "text_model": args.text_model, "top_k": args.top_k,
                  "queue_size": args.queue_size, "coarse_checkpoint": args.coarse_checkpoint,
                  "fine_checkpoint": args.fine_checkpoint}
    procs = {}
    map_params = {"base_path": os.path.abspath(base)}
    if args.scenes:
        map_params["scenes"] = "[" + ", ".join(f"'{name}'" for name in args.scenes) + "]"
    for name, params, yaml_file in (("map_server", map_params, "map_server.yaml"),
                                    ("localizer", loc_params, "localizer.yaml")):
        cmd = [str(demo.executable(name)), "--ros-args", "-r", f"__ns:={NAMESPACE}",
               "--params-file", str(config / yaml_file)]
        for k, v in params.items():
            if v != "":
                cmd += ["-p", f"{k}:={v}"]
        log = open(out_dir / f"ros_latency_{name}.log", "w")
        procs[name] = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    probe = Probe(int(env["ROS_DOMAIN_ID"]))
    result: dict = {"device_param": args.device, "queries": args.queries, "top_k": args.top_k}
    try:
        t_start = time.monotonic()
        ready = probe.spin_until(lambda: probe.status.startswith("state=error")
                                 or (probe.status.startswith("state=ready")
                                     and probe.pub.get_subscription_count() > 0), args.timeout)
        if not ready or probe.status.startswith("state=error"):
            print(f"localizer not ready: {probe.status!r}", file=sys.stderr)
            return 1
        result["startup_s"] = time.monotonic() - t_start
        result["node_status_at_ready"] = probe.status
        loc_proc = psutil.Process(procs["localizer"].pid)
        print(f"ready after {result['startup_s']:.1f} s: {probe.status}", flush=True)

        # 1. + 2. latency over ROS next to the bare call, interleaved text by text so that both see
        # the same machine load; same texts, map (fetched from the map server), checkpoints, device
        from spatialoc_ros.inference import Localizer

        cells = probe.cells()
        loc = Localizer.from_checkpoints(args.coarse_checkpoint or None, args.fine_checkpoint or None,
                                         text_model=args.text_model or None, device=args.device)
        loc.set_map(cells, progress=False)
        loc.warm_text_cache()  # as the node does at configure (warm_sentence_cache, default true)
        result["device"] = str(loc.device)
        result["map_cells"] = len(cells)
        for t in texts[: args.warmup]:
            probe.ask(t)
            loc.estimate(t, top_k=args.top_k)
        ros_ms, bare_ms, node_ms = [], [], []
        settle_s = args.settle_ms / 1e3
        for t in texts[args.warmup:]:
            ms, detail = probe.ask(t)
            ros_ms.append(ms)
            node_ms.append(float(detail.inference_ms) if detail is not None else float("nan"))
            probe.spin_until(lambda: False, settle_s)
            t0 = time.perf_counter()
            loc.estimate(t, top_k=args.top_k)  # what the node publishes as `pose`: localize + combine
            bare_ms.append(1e3 * (time.perf_counter() - t0))
            time.sleep(settle_s)
        result["ros"] = stats(ros_ms)
        result["bare"] = stats(bare_ms)
        result["node_inference"] = stats(node_ms)  # the node's own inference_ms (detail message)
        print(f"ROS instruction->pose: {result['ros']}", flush=True)
        print(f"bare Localizer.estimate: {result['bare']}", flush=True)
        print(f"node's own inference time: {result['node_inference']}", flush=True)
        if result["ros"]["n"] and result["bare"]["n"]:
            result["p50_ratio"] = result["ros"]["p50_ms"] / result["bare"]["p50_ms"]
            print(f"p50 ratio ROS / bare: {result['p50_ratio']:.3f}", flush=True)
        del loc

        # 3. load: rate instructions/s for load_seconds
        if args.load_seconds > 0:
            probe.spin_until(lambda: False, 1.5)  # let the status catch up
            received0, answered0, dropped0 = (probe.counter(k) for k in ("received", "answered", "dropped"))
            poses0 = len(probe.poses)
            rss_start = loc_proc.memory_info().rss
            rss_samples = [rss_start]
            n_total = int(round(args.rate * args.load_seconds))
            t0 = time.perf_counter()
            next_sample = t0 + 1.0
            for i in range(n_total):
                due = t0 + i / args.rate
                while time.perf_counter() < due:
                    probe.executor.spin_once(timeout_sec=max(0.0, min(0.005, due - time.perf_counter())))
                probe.send(load_texts[i % len(load_texts)])
                if time.perf_counter() >= next_sample:
                    rss_samples.append(loc_proc.memory_info().rss)
                    next_sample += 1.0
            sent_s = time.perf_counter() - t0
            probe.spin_until(lambda: probe.counter("received") >= received0 + n_total
                             and probe.counter("answered") + probe.counter("dropped")
                             >= answered0 + dropped0 + n_total, 30.0)
            probe.spin_until(lambda: False, 1.5)
            rss_end = loc_proc.memory_info().rss
            rss_samples.append(rss_end)
            result["load"] = {
                "rate_per_s": args.rate, "seconds": args.load_seconds, "sent": n_total,
                "send_duration_s": sent_s, "queue_size": args.queue_size,
                "received_by_node": probe.counter("received") - received0,
                "answered": probe.counter("answered") - answered0,
                "dropped": probe.counter("dropped") - dropped0,
                "poses_received_here": len(probe.poses) - poses0,
                "rss_start_mb": rss_start / 2**20, "rss_end_mb": rss_end / 2**20,
                "rss_max_mb": max(rss_samples) / 2**20,
            }
            print(f"load: {result['load']}", flush=True)
    finally:
        probe.close()
        codes = {n: demo._stop(p, n) for n, p in procs.items()}
        result["exit_codes"] = codes
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"written {os.path.abspath(args.out)}")
    return 0 if all(c == 0 for c in codes.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
