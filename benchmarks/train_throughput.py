"""Training throughput (samples/s) of the coarse and fine stages, as the training CLIs run them.

    python benchmarks/train_throughput.py [--size shipped|full] [--pointnet_arch mlp|pointnet2]
        [--base_path DATA] [--device cpu] [--batches 12] [--stages coarse fine]
        [--ref_tree /tmp/ref --rounds 3] [--profile]

Sizes. ``shipped`` builds each model from the configuration stored in a checkpoint (default: the
shipped ones, so the figures are those of the embedded default). ``full`` is the seed README's
recipe: the configs that the training CLIs make of the seed's flags (coarse ``--coarse_embed_dim 256
--num_of_hidden_layer 3``, fine ``--fine_embed_dim 128``, both with the seed's ``--pointnet_numpoints
256``); its PointNet is the release's PointNet++ (``--pointnet_arch pointnet2``, 256-d, what the seed
commands train when the release backbone sits at the seed's place) unless ``--pointnet_arch mlp``
(what they train without that file). The language model is the shipped config's (MiniLM: the seed's
Flan-T5-large is not bundled); its features are cached, as with ``--fixed_embedding``.

Every model has fresh weights; a timed batch is a full training step (data collation with
augmentation, cached text features, forward, loss, backward, Adam step) on the train split, and
the time of each phase is reported too. The first ``--warmup`` batches (text cache filling,
allocator warm-up) are not timed.

``--ref_tree DIR`` times another checkout (e.g. ``git worktree add /tmp/ref <commit>``) side by side:
rounds alternate between the trees (old, new, new, old, ...) so that a change in machine load hits
both, each round in a fresh worker process of one tree and stage with the same seeds (so the same
batches), so that only one tree's memory is in use at a time. Printed: both rates per stage and the
ratio new / old.

``--profile`` runs torch.profiler over ``--batches`` steps of each stage (in this process, this
tree) and prints the top operators by self time and the forward time of the model's submodules.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("coarse", "fine")
PHASES = ("collate", "text", "forward", "backward", "optimizer")
#: The seed README's flags that set the model sizes (batch sizes are --coarse/--fine_batch_size).
SEED_FLAGS = {
    "coarse": ["--coarse_embed_dim", "256", "--num_of_hidden_layer", "3", "--pointnet_numpoints", "256"],
    "fine": ["--fine_embed_dim", "128", "--pointnet_numpoints", "256"],
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="shipped", choices=("shipped", "full"),
                   help="shipped: the checkpoints' configs; full: the seed README's recipe")
    p.add_argument("--pointnet_arch", default="pointnet2", choices=("mlp", "pointnet2"),
                   help="PointNet of the full size (default: the release's PointNet++)")
    p.add_argument("--pointnet_dim", type=int, default=None,
                   help="PointNet width of the full size (default: the release's for pointnet2, the CLI's for mlp)")
    p.add_argument("--base_path", default=None, help="KITTI360Pose folder (default: the synthetic default city)")
    p.add_argument("--path_coarse", default=None, help="checkpoint whose config to use (default: shipped)")
    p.add_argument("--path_fine", default=None, help="checkpoint whose config to use (default: shipped)")
    p.add_argument("--device", default="auto", metavar="{auto,cpu,cuda,cuda:N}")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--coarse_batch_size", type=int, default=64)
    p.add_argument("--fine_batch_size", type=int, default=32)
    p.add_argument("--batches", type=int, default=12, help="timed batches per stage (per round with --ref_tree)")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--ref_tree", default=None, help="another checkout to time side by side")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per tree with --ref_tree")
    p.add_argument("--profile", action="store_true", help="torch.profiler tables instead of plain timing")
    p.add_argument("--code_root", default=HERE, help=argparse.SUPPRESS)  # worker: the tree to import
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # worker: read commands on stdin
    return p.parse_args(argv)


class Stage:
    """One stage's model, optimiser, loader and training step, built from the imported tree."""

    def __init__(self, name: str, args: argparse.Namespace, data, hint_encoder, device, text_cfg) -> None:
        import torch

        from spatialoc_ros.training.datasets import CellCollator, QueryDataset, UniqueCellBatchSampler

        self.name, self.device = name, device
        cfg = stage_config(name, args, text_cfg)
        self.cfg = cfg
        torch.manual_seed(0)
        if name == "coarse":
            from spatialoc_ros.models.builder import build_coarse_model
            from spatialoc_ros.training.coarse import ranking_terms

            model = build_coarse_model(cfg, cfg.text_dim, load_pointnet=False)
            ds = QueryDataset(data, augment=True, seed=0)
            batch_size = args.coarse_batch_size
            encode = model.encode_cells

            def loss(batch, hints, cells):
                return sum(ranking_terms(model, model.encode_text(hints), encode(cells), cfg).values())
        else:
            from spatialoc_ros.models.builder import build_fine_model
            from spatialoc_ros.training.fine import loss_terms

            model = build_fine_model(cfg, cfg.text_dim, load_pointnet=False)
            ds = QueryDataset(data, augment=True, pmc_prob=0.5, seed=0)
            batch_size = args.fine_batch_size
            forward = model.forward_with_matching

            def loss(batch, hints, cells):
                gaussian, matching = forward(hints, cells)
                return sum(loss_terms(gaussian, matching, batch.targets.to(device), cfg).values())
        self.model = model.to(device).train()
        self.loss = loss
        self.hint_encoder = hint_encoder
        self.optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        loader = torch.utils.data.DataLoader(
            ds, batch_sampler=UniqueCellBatchSampler(ds.cell_ids, batch_size, shuffle=True),
            collate_fn=CellCollator(cfg.max_objects, cfg.num_points, True, 0.005))
        self.batches = iter(loader)

    def step(self) -> tuple[int, dict]:
        """One training step -> (samples, {phase: seconds})."""
        import torch

        def now():
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            return time.perf_counter()

        t = [now()]
        with torch.profiler.record_function("collate"):
            batch = next(self.batches)
        t.append(now())
        with torch.profiler.record_function("text"):
            hints = self.hint_encoder.batch(batch.hints, self.device)
            cells = batch.cells.to(self.device)
        t.append(now())
        with torch.profiler.record_function("forward"):
            loss = self.loss(batch, hints, cells)
        t.append(now())
        with torch.profiler.record_function("backward"):
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        t.append(now())
        with torch.profiler.record_function("optimizer"):
            self.optimizer.step()
        t.append(now())
        return len(batch.hints), {ph: t[i + 1] - t[i] for i, ph in enumerate(PHASES)}

    def run(self, batches: int) -> dict:
        samples, phases = 0, defaultdict(float)
        for _ in range(batches):
            n, times = self.step()
            samples += n
            for ph, s in times.items():
                phases[ph] += s
        return {"samples": samples, "seconds": sum(phases.values()), "phases": dict(phases)}


def stage_config(name: str, args: argparse.Namespace, text_cfg):
    """The stage's config: the checkpoint's (shipped size) or the training CLI's for the seed flags."""
    from spatialoc_ros.inference import shipped_checkpoint
    from spatialoc_ros.models.checkpoint import read_checkpoint
    from spatialoc_ros.models.config import CoarseConfig, FineConfig

    if args.size == "shipped":
        path = args.path_coarse if name == "coarse" else args.path_fine
        cls = CoarseConfig if name == "coarse" else FineConfig
        return cls(**read_checkpoint(path or shipped_checkpoint(name))["config"])
    if name == "coarse":
        from spatialoc_ros.training.coarse import build_parser, config_from_args
    else:
        from spatialoc_ros.training.fine import build_parser, config_from_args
    flags = SEED_FLAGS[name] + ["--text_model", text_cfg.text_model, "--pointnet_arch", args.pointnet_arch]
    if args.pointnet_dim is not None:
        flags += ["--pointnet_dim", str(args.pointnet_dim)]
    return config_from_args(build_parser().parse_args(flags), text_cfg.text_dim)


def setup(args: argparse.Namespace) -> dict:
    """Import the tree at ``args.code_root`` and build every requested stage."""
    sys.path.insert(0, args.code_root)
    try:  # what the tree's trainers do before their first big tensor (older trees lack it)
        from spatialoc_ros.training.memory import enable_huge_pages
    except ImportError:
        pass
    else:
        print(f"[memory] {enable_huge_pages()}", file=sys.stderr)
    import torch

    from spatialoc_ros.data.loading import load_split
    from spatialoc_ros.inference import resolve_device, shipped_checkpoint
    from spatialoc_ros.models.checkpoint import read_checkpoint
    from spatialoc_ros.models.config import CoarseConfig
    from spatialoc_ros.models.text_encoder import FrozenTextEncoder, HintEncoder

    if args.threads:
        torch.set_num_threads(args.threads)
    device, note = resolve_device(args.device)
    if note:
        print(f"[device] {note}", file=sys.stderr)
    base = args.base_path
    if base is None:
        from spatialoc_ros.data.synthetic import ensure_default_city

        base = ensure_default_city(log=lambda m: print(m, file=sys.stderr))
    text_cfg = CoarseConfig(**read_checkpoint(args.path_coarse or shipped_checkpoint("coarse"))["config"])
    data = load_split(base, "train")
    hint_encoder = HintEncoder(FrozenTextEncoder(text_cfg.text_model, device=str(device)), cache=True)
    stages = {name: Stage(name, args, data, hint_encoder, device, text_cfg) for name in args.stages}
    for stage in stages.values():
        stage.run(args.warmup)
    return {"stages": stages, "device": device, "queries": len(data.poses), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def describe(stage: Stage) -> str:
    c = stage.cfg
    params = sum(p.numel() for p in stage.model.parameters())
    return (f"embed {c.embed_dim}, {c.num_points} points, {c.max_objects} objects, {c.pointnet_arch} "
            f"PointNet {c.pointnet_dim}-d, {params:,} parameters")


def rate_line(label: str, result: dict) -> str:
    phases = " ".join(f"{ph} {1e3 * result['phases'][ph] / result['batches']:.0f}" for ph in PHASES)
    return (f"{label}: {result['samples'] / result['seconds']:8.2f} samples/s  "
            f"(ms per batch: {phases})")


def serve(args: argparse.Namespace) -> int:
    """Worker loop: one JSON line per command ('<stage> <batches>' on stdin) on stdout."""
    env = setup(args)
    out = sys.stdout
    print(json.dumps({"ready": True, "describe": {n: describe(s) for n, s in env["stages"].items()},
                      "torch": env["torch"], "threads": env["threads"], "device": str(env["device"]),
                      "queries": env["queries"]}), file=out, flush=True)
    for line in sys.stdin:
        name, batches = line.split()
        result = env["stages"][name].run(int(batches))
        result["batches"] = int(batches)
        print(json.dumps(result), file=out, flush=True)
    return 0


class Worker:
    def __init__(self, tree: str, argv: list[str]) -> None:
        self.tree = tree
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--serve", "--code_root", tree]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self.read()

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the worker for {self.tree} stopped (see its messages above)")
        return json.loads(line)

    def run(self, name: str, batches: int) -> dict:
        self.proc.stdin.write(f"{name} {batches}\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def without_stages(argv: list[str]) -> list[str]:
    """argv without its ``--stages`` flag and values."""
    out, skipping = [], False
    for a in argv:
        if a == "--stages":
            skipping = True
        elif skipping and a in STAGES:
            continue
        else:
            skipping = False
            out.append(a)
    return out


def side_by_side(args: argparse.Namespace, argv: list[str]) -> int:
    """Alternating rounds, each in a fresh worker process of one tree and one stage (loaded, warmed
    up, timed, closed): only one tree's model and batches are in memory at a time, so that one
    tree's memory use cannot slow the other's allocations."""
    trees = {"old": os.path.abspath(args.ref_tree), "new": args.code_root}
    base = without_stages(argv)
    print(f"old = {trees['old']}, new = {trees['new']}; {args.rounds} rounds of {args.batches} batches per "
          f"tree and stage (after {args.warmup} warm-up), alternating, a fresh process per round")
    for name in args.stages:
        totals = {k: {"samples": 0, "seconds": 0.0, "batches": 0, "phases": defaultdict(float)} for k in trees}
        for r in range(args.rounds):
            for key in (("old", "new") if r % 2 == 0 else ("new", "old")):
                worker = Worker(trees[key], base + ["--stages", name])
                try:
                    if r == 0 and key == "old":
                        info = worker.info
                        print(f"torch {info['torch']}, {info['threads']} CPU threads, device {info['device']}; "
                              f"train split: {info['queries']} queries; size {args.size}")
                        print(f"{name}: {info['describe'][name]}")
                    res = worker.run(name, args.batches)
                finally:
                    worker.close()
                print("  round", r + 1, rate_line(f"{key:3s}", res))
                tot = totals[key]
                tot["samples"] += res["samples"]
                tot["seconds"] += res["seconds"]
                tot["batches"] += res["batches"]
                for ph, sec in res["phases"].items():
                    tot["phases"][ph] += sec
        rates = {k: t["samples"] / t["seconds"] for k, t in totals.items()}
        for key in trees:
            print(f"  {name} {rate_line(f'{key:3s} total', totals[key])}")
        print(f"  {name}: new / old = {rates['new'] / rates['old']:.2f}x")
    return 0


def profile(args: argparse.Namespace) -> int:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    env = setup(args)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if env["device"].type == "cuda" else [])
    sort = "self_cuda_time_total" if env["device"].type == "cuda" else "self_cpu_time_total"
    for name, stage in env["stages"].items():
        print(f"\n=== {name}: {describe(stage)}")
        forward_times = defaultdict(float)
        handles = []
        for mod_name, module in stage.model.named_modules():
            if mod_name and mod_name.count(".") <= 1:
                handles += module_timer(module, mod_name, forward_times, env["device"])
        with torch_profile(activities=activities) as prof:
            result = stage.run(args.batches)
        for h in handles:
            h.remove()
        result["batches"] = args.batches
        print(rate_line(f"{name} (profiled)", result))
        events = {e.key: e for e in prof.key_averages()}
        phase_total = sum(events[ph].cpu_time_total for ph in PHASES if ph in events)
        print("phases (share of the step):",
              ", ".join(f"{ph} {100 * events[ph].cpu_time_total / phase_total:.1f} %" for ph in PHASES if ph in events))
        total = sum(t for k, t in forward_times.items() if "." not in k)
        print("forward time of the submodules (ms per batch, share of the modules' forward):")
        for mod_name, t in sorted(forward_times.items(), key=lambda kv: -kv[1])[:14]:
            print(f"  {mod_name:40s} {1e3 * t / args.batches:9.1f}  {100 * t / max(total, 1e-12):5.1f} %")
        print(prof.key_averages().table(sort_by=sort, row_limit=18))
    return 0


def module_timer(module, name: str, sink: dict, device) -> list:
    """Forward hooks adding the module's forward wall time to ``sink[name]``."""
    import torch

    starts = []

    def now():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def pre(_module, _inputs):
        starts.append(now())

    def post(_module, _inputs, _output):
        sink[name] += now() - starts.pop()

    return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if not args.serve and args.size == "full" and args.pointnet_arch == "pointnet2" and args.pointnet_dim is None:
        sys.path.insert(0, HERE)
        from spatialoc_ros.models.object_encoder import RELEASE_OUT_DIM

        argv += ["--pointnet_dim", str(RELEASE_OUT_DIM)]  # the workers of both trees get it spelt out
        args.pointnet_dim = RELEASE_OUT_DIM
    if args.serve:
        return serve(args)
    if args.profile:
        return profile(args)
    if args.ref_tree:
        child = [a for i, a in enumerate(argv) if a != "--ref_tree" and (i == 0 or argv[i - 1] != "--ref_tree")]
        return side_by_side(args, child)
    env = setup(args)
    print(f"torch {env['torch']}, {env['threads']} CPU threads, device {env['device']}; "
          f"train split: {env['queries']} queries; size {args.size}")
    for name, stage in env["stages"].items():
        result = stage.run(args.batches)
        result["batches"] = args.batches
        print(f"{name}: {describe(stage)}")
        print("  " + rate_line(name, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
