"""Training on several processes (torchrun, DDP on gloo): the sharded sampler, the torchrun
environment checks, the global-batch collectives (BatchNorm statistics, the autograd-aware
gather), and both trainers run as 2 CPU processes against the same single-process run.

Equivalence measure. The 2-process run sees the same global batches as the single-process one,
so the two should end with the same weights up to float reduction order (sums over the batch
and DDP's gradient average split into per-process parts). Adam, however, turns a gradient that
is exactly zero in theory into a full +-lr step driven by round-off noise (|g| >> eps = 1e-8):
such weights (biases just before the coarse model's centring BatchNorm, attention key biases)
random-walk in both runs alike, do not change the loss, and dominate a plain max |difference|.
So the weights are compared with each element weighted by its gradient scale (the root of Adam's
second moment in the single-process run's last.state.pth), in units of the learning rate:

    drift = sum_i g_i |w2_i - w1_i| / (lr * sum_i g_i)

i.e. the first-order change of the loss caused by the difference, relative to that of one Adam
step. Measured on this fixture: coarse 4e-5, fine 4e-6; with per-process BatchNorm statistics
instead of global ones the coarse drift is ~4. Tolerance: DRIFT_TOLERANCE = 1e-2 (1 % of a step).
"""
from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DRIFT_TOLERANCE = 1e-2
#: The PointNet++ test's: its 1-process run takes the fused MLP + max, the 2-process run the module
#: path (BatchNorms switched to global-batch statistics), whose float32 round-off differs (in
#: float64 they agree to 1e-9, test_models_speed_equivalence). Measured: 0.05 lr-steps; with the
#: BatchNorms left on per-process statistics (the fault this guards against) 2.3.
POINTNET2_DRIFT_TOLERANCE = 0.25
#: the train loss logged in metrics.csv (6 significant digits) of the two runs
LOSS_RTOL = 1e-4
#: the same for the PointNet++, whose one-process form (fused MLP, BatchNorm's backward written in
#: place) and torchrun form (plain modules, global-batch BatchNorm) round differently over an
#: epoch: measured 9e-5 before the in-place backward and 2.4e-4 with it, whose own round-off is
#: no larger than torch's (float64 check: input gradient 8.5e-6 for both, weight 9e-6 vs 1.2e-5)
POINTNET2_LOSS_RTOL = 1e-3
TINY = ["--num_points", "8", "--max_objects", "12", "--pointnet_dim", "16", "--dropout", "0",
        "--device", "cpu", "--no_progress", "--threads", "1", "--shuffle", "--no_pc_augment",
        "--fixed_embedding", "--batch_size", "8", "--epochs", "1"]
COARSE = ["--coarse_embed_dim", "16", "--num_of_hidden_layer", "1", "--num_heads", "2", "--beose_dim", "8",
          "--bezier_samples", "2", "--learning_rate", "0.0001", *TINY]
FINE = ["--fine_embed_dim", "16", "--fine_num_layers", "1", "--fine_num_heads", "2", "--learning_rate", "0.0003",
        "--calibrate_sigma", "val", *TINY]
STAGES = {"coarse": (COARSE, 1e-4), "fine": (FINE, 3e-4)}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1")
    return env


def _train(stage: str, args: list[str], cwd: Path, processes: int) -> tuple[subprocess.CompletedProcess, float]:
    module = f"spatialoc_ros.training.{stage}"
    launcher = [] if processes == 1 else [
        "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port())]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *launcher, "-m", module, *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, f"{module} x{processes} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc, seconds


@pytest.fixture(scope="module")
def tiny_city(tmp_path_factory) -> str:
    """One train and one val scene of the small synthetic city: 60 train queries, whose batches
    of 8 end in tail batches of 5, 3 and 2 (uneven slices over 2 processes)."""
    from spatialoc_ros.data.constants import SPLITS
    from spatialoc_ros.data.synthetic import generate_city

    out = tmp_path_factory.mktemp("tiny_city")
    generate_city(str(out), seed=0, scale="small", scenes=[SPLITS["train"][0], SPLITS["val"][0]])
    return str(out)


@pytest.fixture(scope="module")
def runs(tiny_city, tmp_path_factory):
    """Both stages for one epoch as 1 process and as 2 (torchrun); -> {stage: (one, two)} folders."""
    work = tmp_path_factory.mktemp("dist")
    out = {}
    for stage, (flags, _) in STAGES.items():
        folders = []
        for processes in (1, 2):
            name = f"{stage}_x{processes}"
            proc, seconds = _train(stage, [*flags, "--base_path", tiny_city, "--folder_name", name], work, processes)
            print(f"{stage} x{processes}: {seconds:.1f} s")
            folders.append((work / "checkpoints" / name, proc))
        out[stage] = folders
    return out


def _drift(one: Path, two: Path, kind: str, lr: float) -> tuple[float, float]:
    """(gradient-weighted drift in units of lr (module docstring), plain max |difference|)."""
    from spatialoc_ros.models.checkpoint import load_checkpoint

    model, _, _ = load_checkpoint(str(one / "last.pth"), kind, "cpu")
    names = [n for n, p in model.named_parameters() if p.requires_grad]  # the optimiser's order
    adam = torch.load(one / "last.state.pth", weights_only=True)["optimizer"]["state"]
    w1 = torch.load(one / "last.pth", weights_only=True)["model"]
    w2 = torch.load(two / "last.pth", weights_only=True)["model"]
    assert set(w1) == set(w2)
    num = den = 0.0
    for i, name in enumerate(names):
        if i not in adam:  # never had a gradient (e.g. unused by the loss): must not have moved
            assert torch.equal(w1[name], w2[name]), name
            continue
        g = adam[i]["exp_avg_sq"].sqrt()
        num += float((g * (w1[name] - w2[name]).abs()).sum())
        den += float(g.sum())
    plain = max(float((w1[k].double() - w2[k].double()).abs().max()) for k in w1 if w1[k].is_floating_point())
    return num / (lr * den), plain


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_two_processes_train_like_one(runs, stage):
    from spatialoc_ros.models.checkpoint import load_checkpoint

    (one, _), (two, proc) = runs[stage]
    drift, plain = _drift(one, two, stage, STAGES[stage][1])
    print(f"{stage}: drift {drift:.2e} lr-steps, plain max |w2 - w1| {plain:.2e}")
    assert drift < DRIFT_TOLERANCE, f"{stage}: 2-process weights drift {drift:.3g} lr-steps from the 1-process run"
    loss1, loss2 = (float(_rows(f / "metrics.csv")[0]["train_loss"]) for f in (one, two))
    assert loss2 == pytest.approx(loss1, rel=LOSS_RTOL)
    # rank 0 alone wrote: the same files, one metrics row, one args.json entry, one log
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert len(_rows(two / "metrics.csv")) == 1
    entries = json.loads((two / "args.json").read_text())
    assert len(entries) == 1 and entries[0]["world_size"] == 2
    assert "world_size" not in json.loads((one / "args.json").read_text())[0]
    assert proc.stdout.count("[train] epoch 1:") == 1 and proc.stdout.count("[train] done") == 1
    assert "process 0 of 2, gloo" in proc.stdout
    # the unwrapped model was saved: no DDP prefix, and the strict loaders read it
    state = torch.load(two / "best.pth", weights_only=True)["model"]
    assert not any(k.startswith("module.") for k in state)
    model, _, extra = load_checkpoint(str(two / "best.pth"), stage, "cpu")
    assert extra["epoch"] == 1
    if stage == "coarse":  # rank 0 ran the end-of-training calibrations too
        assert extra["relation_weight"] >= 0 and extra["temperature"] > 0
    else:
        assert extra["sigma_scale"] > 0 and "val_calibrated" in extra


def test_two_processes_train_the_pointnet2_like_one(tiny_city, tmp_path):
    """The release's PointNet++ (its BatchNorms switched to global-batch statistics) under torchrun:
    the coarse stage's weights after one epoch as with one process."""
    flags = [*COARSE, "--pointnet_arch", "pointnet2", "--base_path", tiny_city]
    folders = []
    for processes in (1, 2):
        _train("coarse", [*flags, "--folder_name", f"pn2_x{processes}"], tmp_path, processes)
        folders.append(tmp_path / "checkpoints" / f"pn2_x{processes}")
    drift, plain = _drift(*folders, "coarse", STAGES["coarse"][1])
    print(f"pointnet2 coarse: drift {drift:.2e} lr-steps, plain max |w2 - w1| {plain:.2e}")
    assert drift < POINTNET2_DRIFT_TOLERANCE
    loss1, loss2 = (float(_rows(f / "metrics.csv")[0]["train_loss"]) for f in folders)
    assert loss2 == pytest.approx(loss1, rel=POINTNET2_LOSS_RTOL)


def test_rank_slices_rebuild_the_single_process_batches():
    from spatialoc_ros.training.datasets import RankSliceBatchSampler, UniqueCellBatchSampler, rank_slice

    assert [rank_slice(5, r, 2) for r in range(2)] == [(0, 3), (3, 5)]
    assert [rank_slice(7, r, 3) for r in range(3)] == [(0, 3), (3, 5), (5, 7)]
    ids = [c for c in "abcdefg" for _ in range(3)] + ["a", "a", "b"]  # 24 queries, 7 cells: batches 7, 7, 7, 2
    for world in (2, 3, 4):
        for epoch in (1, 2):
            single = UniqueCellBatchSampler(ids, batch_size=8, shuffle=True, seed=5)
            single.set_epoch(epoch)
            batches = list(single)
            ranks = []
            for rank in range(world):
                shard = RankSliceBatchSampler(UniqueCellBatchSampler(ids, batch_size=8, shuffle=True, seed=5),
                                              rank, world)
                shard.set_epoch(epoch)
                ranks.append(list(shard))
                assert len(ranks[-1]) == len(shard)
            kept = [b for b in batches if len(b) >= world]
            assert len({len(r) for r in ranks}) == 1 and len(ranks[0]) == len(kept)  # same steps everywhere
            for step, batch in enumerate(kept):
                parts = [r[step] for r in ranks]
                assert sum(parts, []) == batch  # rank order = the single-process batch
                assert max(map(len, parts)) - min(map(len, parts)) <= 1 and min(map(len, parts)) >= 1
            if world == 2:  # batches of 7: unequal slices are exercised
                assert any(len(b) % 2 for b in kept)
            else:  # the tail batch of 2 has fewer queries than processes: skipped by all
                assert len(kept) == len(batches) - 1
    with pytest.raises(ValueError, match="rank"):
        RankSliceBatchSampler(UniqueCellBatchSampler(ids, 8, False), rank=2, world_size=2)


def test_topology_from_env():
    from spatialoc_ros.training.distributed import Topology, TopologyError

    assert Topology.from_env({}) == Topology(1, 0, 0) and not Topology().distributed
    topo = Topology.from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert topo == Topology(4, 3, 1) and topo.distributed
    with pytest.raises(TopologyError, match="RANK is not"):
        Topology.from_env({"WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    with pytest.raises(TopologyError, match="0 <= RANK < WORLD_SIZE"):
        Topology.from_env({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"})
    with pytest.raises(TopologyError, match="not an integer"):
        Topology.from_env({"WORLD_SIZE": "two", "RANK": "0", "LOCAL_RANK": "0"})


@pytest.mark.parametrize("stage, extra, message", [
    ("coarse", ["--batch_size", "7"], "--batch_size 7 is the global batch, shared by the 2 processes"),
    ("fine", ["--device", "cuda:0"], "--device cuda:0 names one GPU"),
    ("fine", ["--matching_weight", "0.2"], "--matching_weight 0.2: the hint-object matching loss"),
])
def test_flags_a_torchrun_run_cannot_honour_are_refused(stage, extra, message, tiny_city, tmp_path,
                                                        monkeypatch, capsys):
    """Checked while parsing, before any process group exists (exit 2, one error line)."""
    import importlib

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.chdir(tmp_path)
    trainer = importlib.import_module(f"spatialoc_ros.training.{stage}")
    with pytest.raises(SystemExit) as exit_info:
        trainer.main([*STAGES[stage][0], "--base_path", tiny_city, *extra])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], errors


# --- the collectives, checked against one process on the concatenated batch -----------------
def _collectives_worker(rank: int, world: int, port: int) -> None:
    import weakref

    import torch.distributed as dist

    from spatialoc_ros.training.distributed import Distributed, Topology

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    group = weakref.ref(dist.group.WORLD)
    run = Distributed(Topology(world, rank, rank), torch.device("cpu"))
    try:
        _collectives_checks(run, rank, world)
    finally:
        run.shutdown()
    # Shut down, the group must be gone: one still held (the autograd-aware gather's default
    # argument did, when imported after init) keeps gloo's worker threads alive into the
    # interpreter's exit, where one of them can abort the process (SIGABRT after a passed run).
    assert group() is None, "the process group outlived Distributed.shutdown()"


def _collectives_checks(run, rank: int, world: int) -> None:
    """Each collective on this process's rows against torch on the whole batch."""
    import torch.distributed as dist

    from spatialoc_ros.models.layers import MaskedBatchNorm
    from spatialoc_ros.training.global_norm import use_global_batch_norm

    gen = torch.Generator().manual_seed(0)
    # BatchNorm1d (affine) with uneven rows per process, one process holding none
    for split in ((5, 2), (7, 0), (1, 0)):
        x_all = torch.randn(sum(split), 4, generator=gen) * 3 + 1
        coeff = torch.randn(sum(split), 4, generator=gen)
        ref = torch.nn.BatchNorm1d(4)
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5, generator=gen)
            ref.bias.uniform_(-1, 1, generator=gen)
        mine = torch.nn.BatchNorm1d(4)
        mine.load_state_dict(ref.state_dict())
        use_global_batch_norm(mine)
        lo = sum(split[:rank])
        x = x_all[lo:lo + split[rank]].clone().requires_grad_()
        if sum(split) >= 2:
            x_ref = x_all.clone().requires_grad_()
            out_ref = ref(x_ref)
            (out_ref * coeff).sum().backward()
        else:  # one row in the whole batch: the running statistics, as the project's layers do
            x_ref = x_all.clone().requires_grad_()
            out_ref = torch.nn.functional.batch_norm(x_ref, ref.running_mean, ref.running_var, ref.weight,
                                                     ref.bias, training=False)
            (out_ref * coeff).sum().backward()
        out = mine(x)
        (out * coeff[lo:lo + split[rank]]).sum().backward()
        torch.testing.assert_close(out, out_ref[lo:lo + split[rank]], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x.grad, x_ref.grad[lo:lo + split[rank]], atol=1e-5, rtol=1e-5)
        grads = torch.cat([mine.weight.grad, mine.bias.grad])
        dist.all_reduce(grads)  # what DDP does (then / world, with the loss shared the same way)
        torch.testing.assert_close(grads, torch.cat([ref.weight.grad, ref.bias.grad]), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(mine.running_mean, ref.running_mean)
        torch.testing.assert_close(mine.running_var, ref.running_var)
        assert int(mine.num_batches_tracked) == int(ref.num_batches_tracked)
    # MaskedBatchNorm: statistics of the real entries of every process
    x_all = torch.randn(6, 3, 5, generator=gen)
    mask_all = torch.rand(6, 3, generator=gen) > 0.4
    ref, mine = MaskedBatchNorm(5), MaskedBatchNorm(5)
    use_global_batch_norm(mine)
    rows = slice(0, 4) if rank == 0 else slice(4, 6)
    torch.testing.assert_close(mine(x_all[rows], mask_all[rows]), ref(x_all, mask_all)[rows], atol=1e-5, rtol=1e-5)
    # gather_rows: rank order, padding of the other dims, autograd back to the owner
    h = 2 + rank  # per-process width of dim 1, as hint counts differ
    local = torch.full((1 + rank, h, 2), float(rank + 1), requires_grad=True)
    gathered = run.gather_rows(local)
    assert gathered.shape == (1 + 2, 3, 2)
    expected = torch.zeros(3, 3, 2)
    expected[0, :2] = 1.0
    expected[1:, :3] = 2.0
    torch.testing.assert_close(gathered.detach(), expected)
    weights = torch.arange(gathered.numel(), dtype=torch.float32).view_as(gathered)
    (gathered * weights).sum().backward()  # every process computes the same loss ...
    own = weights[0:1, :2] if rank == 0 else weights[1:3, :3]
    torch.testing.assert_close(local.grad, world * own)  # ... so each owner gets world x its gradient
    masks = run.gather_rows(torch.ones(1 + rank, h, dtype=torch.bool))
    assert masks.dtype == torch.bool and masks.sum() == 2 + 6 and not masks[0, 2]
    assert run.sample_share(1 + rank) == pytest.approx(2 * (1 + rank) / 3)
    means = run.mean_over_ranks({"a": torch.tensor(float(rank)), "b": 2.0})
    assert {k: float(v) for k, v in means.items()} == {"a": 0.5, "b": 2.0}
    assert run.sum_over_ranks({"samples": 1 + rank}) == {"samples": 3}


def test_global_batch_collectives_match_one_process():
    import torch.multiprocessing as mp

    mp.start_processes(_collectives_worker, args=(2, _free_port()), nprocs=2, join=True, start_method="spawn")
