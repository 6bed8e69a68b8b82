"""Training on several processes with PyTorch's own distributed engine (``torchrun``).

    torchrun --nproc_per_node N -m spatialoc_ros.training.coarse ...   (the single-process flags)

torchrun starts N copies of a trainer and tells each one its place through the environment
(``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); :class:`Topology`
reads it. Without it (plain ``python -m ...``, or ``--nproc_per_node 1``) nothing here starts a
process group and every helper of :class:`Distributed` is the identity: the trainers run exactly
as a single process.

With N > 1 processes (:meth:`Distributed.start`):

* backend: gloo on the CPU, NCCL on CUDA, process LOCAL_RANK on ``cuda:LOCAL_RANK``;
* ``--batch_size`` stays the global batch: every process builds the same batches and keeps its
  contiguous slice (:class:`spatialoc_ros.training.datasets.RankSliceBatchSampler`);
* the model runs inside DistributedDataParallel (:meth:`Distributed.data_parallel`), whose
  gradient averaging over the processes the trainers' losses are scaled for, and its BatchNorm
  layers take their statistics over the global batch (:mod:`spatialoc_ros.training.global_norm`);
* logged values are averaged over the processes, counters summed (:meth:`mean_over_ranks`,
  :meth:`sum_over_ranks`), so every process takes the same decisions (e.g. a non-finite loss);
* rank 0 alone writes files and validates; the others wait at :meth:`barrier` (at most
  :data:`WAIT_TIMEOUT`).
"""
from __future__ import annotations

import contextlib
import datetime
import os
import random
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
# Imported here, before any process group exists, on purpose: its functions take
# ``group=group.WORLD`` as a default argument, evaluated at import. Imported after
# init_process_group, that default would hold the process group for the rest of the process, so
# destroy_process_group could not free it, its gloo worker threads would outlive the interpreter's
# shutdown and one of them could abort the process at exit (SIGABRT after a finished run).
# The calls below also pass the current group explicitly.
from torch.distributed.nn import functional as dist_nn

#: The variables torchrun sets for every process (MASTER_ADDR / MASTER_PORT are read by torch).
ENV_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
#: Longest a collective (a barrier included) waits for the other processes: rank 0 validates
#: and calibrates after the epochs while the others wait.
WAIT_TIMEOUT = datetime.timedelta(hours=2)


#: torch >= 2.10 marks torch.distributed.nn.functional deprecated; it is still the autograd-aware
#: form of the collectives (the gradient of every process's copy flows back), which is what the
#: trainers need, so its notice is silenced at the two call sites below.
_DEPRECATION_NOTICE = r"torch\.distributed\.nn\.functional\.\w+ is deprecated"


def autograd_all_gather(x: torch.Tensor) -> list[torch.Tensor]:
    """Every process's ``x`` (equal shapes), with autograd: backward sums, over the processes,
    the gradients of the copies of this process's ``x``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_DEPRECATION_NOTICE, category=FutureWarning)
        return list(dist_nn.all_gather(x, group=dist.group.WORLD))


def autograd_all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of every process's ``x``, with autograd (backward sums the gradients too)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_DEPRECATION_NOTICE, category=FutureWarning)
        return dist_nn.all_reduce(x, op=dist.ReduceOp.SUM, group=dist.group.WORLD)


class TopologyError(ValueError):
    """The torchrun environment variables are incomplete or inconsistent."""


@dataclass(frozen=True)
class Topology:
    """Where this process stands in the run: ``world_size`` processes, this one ``rank``
    (``local_rank`` on its machine). The default is a single process."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "Topology":
        """The topology torchrun set in ``environ`` (default os.environ); a single process when
        WORLD_SIZE is unset. Raises :class:`TopologyError` for a partial or inconsistent set."""
        env = os.environ if environ is None else environ
        if "WORLD_SIZE" not in env:
            return cls()
        values = {}
        for name in ENV_VARS:
            text = env.get(name)
            if text is None:
                raise TopologyError(f"WORLD_SIZE is set but {name} is not: start the trainer with "
                                    "torchrun --nproc_per_node N, or unset WORLD_SIZE for one process")
            try:
                values[name] = int(text)
            except ValueError:
                raise TopologyError(f"{name}={text!r} is not an integer (torchrun sets it)") from None
        world, rank, local = values["WORLD_SIZE"], values["RANK"], values["LOCAL_RANK"]
        if world < 1 or not 0 <= rank < world or local < 0:
            raise TopologyError(f"inconsistent torchrun environment WORLD_SIZE={world} RANK={rank} "
                                f"LOCAL_RANK={local}: need 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0")
        return cls(world, rank, local)


def check_args(args, parser, topology: Topology) -> None:
    """Refuse flags that cannot run on ``topology``'s processes; exits via parser.error."""
    if not topology.distributed:
        return
    n = topology.world_size
    if args.batch_size % n:
        parser.error(f"--batch_size {args.batch_size} is the global batch, shared by the {n} processes "
                     f"of torchrun: make it a multiple of {n} (e.g. --batch_size {-(-args.batch_size // n) * n})")
    if args.device.startswith("cuda:"):
        parser.error(f"--device {args.device} names one GPU, but under torchrun process LOCAL_RANK uses "
                     "cuda:LOCAL_RANK: pass --device cuda (or auto)")
    if args.device in ("cuda", "auto") and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if topology.local_rank >= count:
            parser.error(f"process LOCAL_RANK {topology.local_rank} has no GPU (this machine has {count}): "
                         f"start at most {count} processes per machine (torchrun --nproc_per_node {count})")


def process_device(device: torch.device, topology: Topology) -> torch.device:
    """The device of this process: ``cuda:LOCAL_RANK`` when a distributed run trains on CUDA."""
    if topology.distributed and device.type == "cuda":
        return torch.device("cuda", topology.local_rank)
    return device


def process_note(topology: Topology, device: torch.device) -> str:
    """'' for a single process, else ' (process RANK of WORLD_SIZE, BACKEND)' for the logs."""
    if not topology.distributed:
        return ""
    backend = "nccl" if device.type == "cuda" else "gloo"
    return f" (process {topology.rank} of {topology.world_size}, {backend})"


def rank_seed(seed: int, rank: int) -> int:
    """``seed`` for rank 0 (so a single process keeps its random streams), an independent seed
    derived from (seed, rank) for the other ranks."""
    if rank == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(rank)]).generate_state(1)[0])


@contextlib.contextmanager
def quiet_unless_main(topology: Topology) -> Iterator[None]:
    """Silence stdout (the trainers' log lines) on ranks other than 0; stderr stays."""
    if topology.rank == 0:
        yield
        return
    with open(os.devnull, "w", encoding="utf-8") as sink, contextlib.redirect_stdout(sink):
        yield


class _Apply(nn.Module):
    """``forward(fn)`` = ``fn(model)``: lets a whole training step (encoders, gathers, loss) run
    inside DistributedDataParallel's forward, which prepares the gradient reduction."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[[nn.Module], Any]) -> Any:
        return fn(self.model)


class Distributed:
    """The process group of a torchrun run, or nothing for a single process (every helper is
    then the identity). Build it with :meth:`start`; end it with :meth:`shutdown`."""

    def __init__(self, topology: Topology, device: torch.device) -> None:
        self.topology = topology
        self.device = device
        self.enabled = topology.distributed

    @classmethod
    def start(cls, topology: Topology, device: torch.device) -> "Distributed":
        """Join the process group of ``topology`` (gloo on the CPU, NCCL on CUDA ``device``)."""
        run = cls(topology, device)
        if run.enabled:
            if device.type == "cuda":
                torch.cuda.set_device(device)
                dist.init_process_group("nccl", timeout=WAIT_TIMEOUT, device_id=device)
            else:
                dist.init_process_group("gloo", timeout=WAIT_TIMEOUT)
        return run

    @property
    def rank(self) -> int:
        return self.topology.rank

    @property
    def world_size(self) -> int:
        return self.topology.world_size

    @property
    def is_main(self) -> bool:
        """True on rank 0 (and for a single process): the process that writes files."""
        return self.topology.rank == 0

    def barrier(self) -> None:
        """Wait until every process arrives here."""
        if not self.enabled:
            return
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def main_first(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on rank 0, then on the others (e.g. rank 0 generates a missing data set that
        the others then find)."""
        if self.is_main:
            result = fn()
            self.barrier()
            return result
        self.barrier()
        return fn()

    def shutdown(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    def reseed_process(self, seed: int) -> None:
        """Give ranks other than 0 global random streams of their own (python, numpy, torch:
        dropout, DataLoader workers), once the model is built identically everywhere."""
        if self.enabled and not self.is_main:
            s = rank_seed(seed, self.rank)
            random.seed(s)
            np.random.seed(s)
            torch.manual_seed(s)

    def rank_seed(self, seed: int) -> int:
        """See :func:`rank_seed`: ``seed`` itself on rank 0 and for a single process."""
        return rank_seed(seed, self.rank) if self.enabled else int(seed)

    def batch_note(self, batch_size: int) -> str:
        """'' for a single process, else how the global batch is split, for the logs."""
        if not self.enabled:
            return ""
        return (f"; global batch {batch_size} = {self.world_size} processes x {batch_size // self.world_size} "
                "(tail batches split unevenly)")

    # --- data and model ----------------------------------------------------------------------
    def shard_batches(self, batches):
        """``batches`` (a batch sampler) for a single process; with several, this process's
        slice of each of its batches (:class:`~spatialoc_ros.training.datasets.RankSliceBatchSampler`)."""
        if not self.enabled:
            return batches
        from spatialoc_ros.training.datasets import RankSliceBatchSampler

        return RankSliceBatchSampler(batches, self.rank, self.world_size)

    def data_parallel(self, model: nn.Module) -> Callable[[Callable[[nn.Module], Any]], Any]:
        """``run`` with ``run(fn)`` = ``fn(model)``. With several processes ``fn`` runs inside
        DistributedDataParallel (gradients averaged over the processes; ``static_graph``: every
        step uses the same parameters, and those no loss term reaches, e.g. the covariance head
        under an MSE loss, are found in the first step) and the model's BatchNorm layers are
        switched, in place, to global-batch statistics; the model keeps its parameters, buffers
        and state_dict keys (save ``model``, never the wrapper)."""
        if not self.enabled:
            return lambda fn: fn(model)
        from torch.nn.parallel import DistributedDataParallel

        from spatialoc_ros.training.global_norm import use_global_batch_norm

        use_global_batch_norm(model)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(_Apply(model), device_ids=device_ids, static_graph=True)

    # --- collectives -------------------------------------------------------------------------
    def mean_over_ranks(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """{name: 0-d tensor or float} -> the same names, averaged over the processes (detached
        0-d float64 tensors); unchanged for a single process."""
        if not self.enabled:
            return dict(values)
        names = list(values)
        stacked = torch.stack([torch.as_tensor(values[k].detach() if isinstance(values[k], torch.Tensor)
                                               else values[k], dtype=torch.float64, device=self.device)
                               .reshape(()) for k in names])
        dist.all_reduce(stacked)
        stacked = (stacked / self.world_size).cpu()
        return {k: stacked[i] for i, k in enumerate(names)}

    def sum_over_ranks(self, counts: Mapping[str, int]) -> dict[str, int]:
        """{name: int} -> the sums over the processes (every process must pass the same names)."""
        if not self.enabled:
            return dict(counts)
        names = sorted(counts)
        totals = torch.tensor([int(counts[k]) for k in names], dtype=torch.int64, device=self.device)
        dist.all_reduce(totals)
        return {k: int(v) for k, v in zip(names, totals.tolist())}

    def sample_share(self, local_samples: int) -> Optional[float]:
        """world_size * local_samples / global samples: the factor that turns a mean over this
        process's samples into its share of the global-batch mean once DDP averages the
        processes' gradients (and :meth:`mean_over_ranks` their logged values). None for a
        single process (nothing to scale)."""
        if not self.enabled:
            return None
        total = self.sum_over_ranks({"samples": local_samples})["samples"]
        return self.world_size * local_samples / total

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Every process's ``x`` concatenated along dim 0 in rank order: (sum of the dim-0 sizes,
        largest size of every other dim), the padding zeros (False). Autograd-aware: the gradient
        of each process's rows, summed over the processes that used them, flows back to their
        owner. The identity for a single process."""
        if not self.enabled:
            return x
        shape = torch.tensor(x.shape, dtype=torch.int64, device=x.device)
        shapes = [torch.empty_like(shape) for _ in range(self.world_size)]
        dist.all_gather(shapes, shape)
        sizes = torch.stack(shapes).cpu()
        largest = sizes.max(dim=0).values.tolist()
        is_bool = x.dtype == torch.bool
        padded = x.to(torch.uint8) if is_bool else x
        pad: list[int] = []
        for d in reversed(range(x.dim())):
            pad += [0, int(largest[d]) - x.shape[d]]
        if any(pad):
            padded = F.pad(padded, pad)
        if padded.requires_grad:
            parts = autograd_all_gather(padded)
        else:
            parts = [torch.empty_like(padded) for _ in range(self.world_size)]
            dist.all_gather(parts, padded.contiguous())
        out = torch.cat([p[:int(n)] for p, n in zip(parts, sizes[:, 0].tolist())], dim=0)
        return out.to(torch.bool) if is_bool else out

