"""Scale-out on PyTorch's own engine: torchrun launches, DistributedDataParallel trains.

`torchrun --nproc-per-node N -m transferlab train ...` sets WORLD_SIZE/RANK/LOCAL_RANK; setup()
joins the process group (NCCL on CUDA, gloo on CPU). The ranks decode the images together, each
its share, into one cache (decoding.py) and read it all; the sampler gives rank r the r-th
stride of each global batch; only rank 0 writes files.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from .config import EveryRank, UserError


@dataclass(frozen=True)
class Dist:
    """This process's place in the job; a single process is rank 0 of 1."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        """Sum numbers over ranks (a no-op in a single process)."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu().tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any (e.g. one rank got SIGTERM)."""
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=_comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast(self, obj):
        """Rank 0's `obj` (any picklable value) on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def agreed(self, step):
        """`step()` in every process: a UserError any of them raised is raised in all, as
        EveryRank, so that rank 0 says it once and no process waits for one that stopped."""
        if self.world == 1:
            return step()
        try:
            result, said = step(), None
        except UserError as err:
            result, said = None, str(err)
        for rank, line in enumerate(self.all_objects(said)):
            if line is not None:
                raise EveryRank(line if rank == 0 else f"process {rank} of this torchrun job: {line}")  # fmt: skip
        return result

    def all_objects(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def global_batches(self, shares: list[list[int]]) -> list[list[int]]:
        """Each step's global batch from every rank's share of it (EpochSampler: rank r holds
        the r-th stride), for the record of the images a step trained on."""
        if self.world == 1:
            return shares
        out = []
        for parts in zip(*self.all_objects(shares), strict=True):
            batch = [0] * sum(map(len, parts))
            for r, part in enumerate(parts):
                batch[r :: self.world] = part
            out.append(batch)
        return out

    def shard(self, n: int) -> np.ndarray:
        """This rank's indices of 0..n-1, padded (like DistributedSampler) to equal length."""
        idx = np.arange(n)
        pad = (-n) % self.world
        return np.concatenate([idx, idx[:pad]])[self.rank :: self.world]

    def gather(self, part: np.ndarray, n: int) -> np.ndarray:
        """Undo shard(): gather every rank's rows in original order, padding dropped."""
        if self.world == 1:
            return part
        t = torch.from_numpy(np.ascontiguousarray(part)).to(_comm_device())
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t)
        return torch.stack(parts, dim=1).reshape(-1, *t.shape[1:])[:n].cpu().numpy()


def _comm_device() -> torch.device:
    backend = dist.get_backend() if dist.is_initialized() else "gloo"
    return torch.device("cuda") if backend == "nccl" else torch.device("cpu")


def current() -> Dist:
    """This process's place in the job it joined with setup(); Dist(0, 1) when it joined none."""
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size())
    return Dist()


def setup() -> Dist:
    """Join the torchrun job if there is one (idempotent); a plain process gets Dist(0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        rank = int(os.environ["RANK"])
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            world,
            is_master=False,
            timeout=timedelta(minutes=10),
        )
        # a fresh key space per torchrun restart: stale addresses of dead workers stay unread
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            "nccl" if torch.cuda.is_available() else "gloo",
            store=dist.PrefixStore(f"transferlab/restart{restart}", store),
            rank=rank,
            world_size=world,
        )
        atexit.register(_leave)
    return Dist(dist.get_rank(), dist.get_world_size())


def _leave() -> None:
    """Leave the process group at exit: a rank that finishes before the others would otherwise
    abort in the group's destructor ("terminate called without an active exception")."""
    if dist.is_initialized():
        dist.destroy_process_group()


def check(d: Dist, batch_size: int, n: int) -> None:
    """What a run that trains asks of its `n` training images: two at least, and in a job of
    several processes, each process two of every global batch, as one process has
    (`--batch-size` 2 over 3 processes: an empty share, a NaN loss)."""
    if d.world == 1 and n < 2:  # (--limit 1: BatchNorm's traceback and a half-made folder)
        raise UserError(f"the training split holds {n} image: a model needs at least 2 to train on (a larger --limit, or more images)")  # fmt: skip
    if d.world == 1:
        return
    if n < 2 * d.world:  # (one batch: no last batch to merge)
        raise EveryRank(f"the {n} training images cannot give each of the {d.world} processes of this torchrun job two of a batch, as BatchNorm needs: run it in {max(1, n // 2)} process(es) or fewer")  # fmt: skip
    if batch_size < 2 * d.world:
        raise EveryRank(f"--batch-size {batch_size} is the global batch, shared by the {d.world} processes of this torchrun job: each needs at least two images of it, as BatchNorm cannot train on one (--batch-size {2 * d.world} or more)")  # fmt: skip


def wrap(model: torch.nn.Module, d: Dist, some_frozen: bool = False) -> torch.nn.Module:
    """DistributedDataParallel around the model when there are several ranks.

    `some_frozen`: parameters it holds may have no gradient in a step (gradual unfreezing).
    """
    if d.world == 1:
        return model
    ids = [torch.cuda.current_device()] if torch.cuda.is_available() else None
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=ids, find_unused_parameters=some_frozen
    )
