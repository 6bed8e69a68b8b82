"""The end-to-end demo over real ROS 2: ``python -m spatialoc_ros.demo`` (run by scripts/demo.sh).

1. Makes sure the embedded synthetic city exists (generated on first use, a few seconds).
2. Starts the installed ``map_server`` and ``localizer`` executables as separate processes in the
   namespace /spatialoc, with localhost-only discovery, a private ROS_DOMAIN_ID and, where the
   kernel allows it, inside a private network namespace (``unshare -n``, loopback only).
3. Runs ``demo_client``: it waits until the localizer is ready, publishes held-out test
   instructions and prints, for each, the true position, the predicted pose, the error and the
   2-sigma radius; it writes out/demo.png and prints the matching ``ros2 topic pub`` line.
4. Stops both nodes (SIGINT, then SIGKILL after a grace period). Exit code 0 when everything
   worked, non-zero otherwise. The nodes' logs go to out/demo_logs/.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

PACKAGE = "spatialoc_ros"
NAMESPACE = "/spatialoc"
_NETNS_FLAG = "SPATIALOC_DEMO_IN_NETNS"


def install_prefix() -> Path:
    """Install prefix of the built package (colcon install space)."""
    for entry in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep):
        if entry and Path(entry, "share/ament_index/resource_index/packages", PACKAGE).is_file():
            return Path(entry)
    root = Path(os.environ.get("SPATIALOC_ROOT", Path(__file__).resolve().parents[1]))
    return root / "install" / PACKAGE


def executable(name: str) -> Path:
    path = install_prefix() / "lib" / PACKAGE / name
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(
            f"{path} is missing: build the package first (`bash scripts/setup.sh`, then `source scripts/env.sh`)"
        )
    return path


def _netns_usable() -> bool:
    if not (shutil.which("unshare") and shutil.which("ip")):
        return False
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    return probe.returncode == 0


def _reexec_in_netns(argv: list[str]) -> int:
    """Run this demo again inside a private network namespace whose only interface is loopback."""
    env = dict(os.environ, **{_NETNS_FLAG: "1"})
    cmd = ["unshare", "-n", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
           sys.executable, "-m", "spatialoc_ros.demo", *argv]
    return subprocess.call(cmd, env=env)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"(cannot read {path}: {e})"


def _stop(proc: subprocess.Popen, name: str, grace_s: float = 10.0) -> Optional[int]:
    """SIGINT, wait, then SIGKILL. Returns the exit code (None if it had to be killed)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            print(f"[demo] {name} did not stop within {grace_s:g} s after SIGINT; killing it", file=sys.stderr)
            proc.kill()
            proc.wait()
            return None
    return proc.returncode


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m spatialoc_ros.demo",
        description="Start map_server + localizer over ROS 2 and localise held-out test instructions.",
    )
    m = p.add_argument_group("model")
    from spatialoc_ros.cli import device_name

    m.add_argument("--device", default="auto", type=device_name, metavar="{auto,cpu,cuda,cuda:N}",
                   help="localizer device (auto = CUDA when present)")
    m.add_argument("--coarse_checkpoint", "--coarse-checkpoint", default="",
                   help="coarse checkpoint; '' = the shipped one")
    m.add_argument("--fine_checkpoint", "--fine-checkpoint", default="",
                   help="fine checkpoint; '' = the shipped one")
    m.add_argument("--text_model", "--text-model", default="minilm", help="language model (default minilm)")
    d = p.add_argument_group("data")
    d.add_argument("--base_path", "--base-path", default="",
                   help="KITTI360Pose folder; '' = the embedded synthetic city (generated if missing)")
    d.add_argument("--count", type=int, default=5, help="instructions to send (default 5)")
    d.add_argument("--seed", type=int, default=0, help="seed of the choice of test positions")
    r = p.add_argument_group("run")
    r.add_argument("--timeout", type=float, default=600.0,
                   help="seconds to wait for the nodes to become ready (and per answer)")
    r.add_argument("--domain_id", "--domain-id", type=int, default=None,
                   help="ROS_DOMAIN_ID of the demo graph (default: a private one from the process id)")
    r.add_argument("--no_netns", "--no-netns", action="store_true",
                   help="do not run inside a private network namespace (localhost discovery still applies)")
    r.add_argument("--out", default=os.path.join("out", "demo.png"), help="PNG to write (default out/demo.png)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)

    if not args.no_netns and os.environ.get(_NETNS_FLAG) != "1":
        if _netns_usable():
            print("[demo] running inside a private network namespace (loopback only)", flush=True)
            return _reexec_in_netns(argv)
        print("[demo] 'unshare -n' is not available here; ROS discovery is limited to localhost", flush=True)

    for ckpt, name in ((args.coarse_checkpoint, "coarse"), (args.fine_checkpoint, "fine")):
        if not ckpt:
            from spatialoc_ros.inference import shipped_checkpoint

            ckpt = shipped_checkpoint(name)
        if not os.path.isfile(ckpt):
            print(f"[demo] the {name} checkpoint {ckpt} does not exist; pass --{name}_checkpoint", file=sys.stderr)
            return 2

    base_path = args.base_path
    if not base_path:
        from spatialoc_ros.data.synthetic import ensure_default_city

        base_path = ensure_default_city(log=lambda m: print(f"[demo] {m}", flush=True))
    base_path = os.path.abspath(base_path)

    try:
        exe = {n: executable(n) for n in ("map_server", "localizer", "demo_client")}
    except FileNotFoundError as e:
        print(f"[demo] {e}", file=sys.stderr)
        return 2

    env = dict(os.environ)
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    env["ROS_DOMAIN_ID"] = str(args.domain_id if args.domain_id is not None else 1 + os.getpid() % 100)
    env["PYTHONUNBUFFERED"] = "1"
    share = install_prefix() / "share" / PACKAGE / "config"
    log_dir = Path(os.path.dirname(os.path.abspath(args.out))) / "demo_logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"[demo] ROS_DOMAIN_ID={env['ROS_DOMAIN_ID']} discovery=LOCALHOST namespace={NAMESPACE}; "
          f"node logs in {log_dir}", flush=True)

    def ros_args(params_file: Path, params: dict) -> list[str]:
        out = ["--ros-args", "-r", f"__ns:={NAMESPACE}"]
        if params_file.is_file():
            out += ["--params-file", str(params_file)]
        for k, v in params.items():
            if v != "":  # '' = keep the default ('-p name:=' would not be read as an empty string)
                out += ["-p", f"{k}:={v}"]
        return out

    nodes: dict[str, subprocess.Popen] = {}
    logs: dict[str, Path] = {}
    client_rc = 1
    t0 = time.monotonic()
    try:
        commands = {
            "map_server": [str(exe["map_server"]), *ros_args(share / "map_server.yaml", {"base_path": base_path})],
            "localizer": [str(exe["localizer"]), *ros_args(share / "localizer.yaml", {
                "device": args.device,
                "text_model": args.text_model,
                "coarse_checkpoint": args.coarse_checkpoint,
                "fine_checkpoint": args.fine_checkpoint,
            })],
        }
        for name, cmd in commands.items():
            logs[name] = log_dir / f"{name}.log"
            with open(logs[name], "w") as log:
                nodes[name] = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
            print(f"[demo] started {name} (pid {nodes[name].pid})", flush=True)

        client_cmd = [str(exe["demo_client"]), "--namespace", NAMESPACE, "--count", str(args.count),
                      "--base_path", base_path, "--timeout", str(args.timeout), "--seed", str(args.seed),
                      "--out", args.out]
        client = subprocess.Popen(client_cmd, env=env)
        while client.poll() is None:
            dead = [n for n, p in nodes.items() if p.poll() is not None]
            if dead:
                print(f"[demo] {dead[0]} exited early (code {nodes[dead[0]].returncode}); last lines of its log:\n"
                      f"{_tail(logs[dead[0]])}", file=sys.stderr)
                _stop(client, "demo_client", 5.0)
                break
            time.sleep(0.2)
        client_rc = client.returncode if client.returncode is not None else 1
    finally:
        codes = {name: _stop(proc, name) for name, proc in nodes.items()}
    unclean = {n: c for n, c in codes.items() if c != 0}
    if unclean:
        print(f"[demo] nodes did not exit cleanly: {unclean}", file=sys.stderr)
        for n in unclean:
            print(f"[demo] last lines of {logs[n]}:\n{_tail(logs[n])}", file=sys.stderr)
    if client_rc != 0:
        print(f"[demo] demo_client failed (exit {client_rc}); node logs: {log_dir}", file=sys.stderr)
        for n in nodes:
            print(f"[demo] last lines of {logs[n]}:\n{_tail(logs[n], 8)}", file=sys.stderr)
    ok = client_rc == 0 and not unclean
    print(f"[demo] {'done' if ok else 'FAILED'} in {time.monotonic() - t0:.0f} s; nodes stopped", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
