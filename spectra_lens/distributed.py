"""Several processes or machines on torch.distributed: who does which shard, and when to merge.

Launch any experiment command under `torchrun` (one process per GPU, or several CPU processes):

    torchrun --nproc-per-node 2 -m spectra_lens.cli observe --out results/obs ...

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; `Group.from_env()` reads them, initialises the
process group (gloo on CPU, NCCL on CUDA) and gives each rank its device (`cuda:LOCAL_RANK`
where CUDA exists). Work is split by shard: rank r takes shards r, r + W, r + 2W, ... Each rank
writes its shard outputs itself (atomic files), so a killed rank leaves exactly its unfinished
shards missing and a rerun of the same command (any number of processes) redoes only those.
Rank 0 prepares the run directory and the shards before the others start (a barrier) and merges
after every rank is done (a second barrier). Without torchrun (no WORLD_SIZE, or 1) nothing is
initialised and the group is one process: the same code path.

Across machines: `torchrun --nnodes N --node-rank i --rdzv-endpoint HOST:PORT ...` on each node
with the run directory on a shared file system; or, without a rendezvous, one job per share of
the shards (e.g. a SLURM array task) with `SPECTRA_SHARD_RANK=i SPECTRA_SHARD_WORLD=N` in its
environment: such a job is "detached" (no process group, no barriers), captures shards i, i + N,
... of prepared shards into its own run directory and analyses nothing; `spectra-lens merge
RUN_DIR ...` then reads every share's moments and computes the tables once.
"""

import datetime
import os
from dataclasses import dataclass

import torch

from spectra_lens.errors import SpectraError

__all__ = ["Group", "SHARD_RANK", "SHARD_WORLD", "shard_indices"]

SHARD_RANK, SHARD_WORLD = "SPECTRA_SHARD_RANK", "SPECTRA_SHARD_WORLD"  # detached shares


def shard_indices(n_shards: int, rank: int, world: int) -> list[int]:
    """The shards of `rank` among `world` processes: rank, rank + world, ... (round robin)."""
    if world < 1 or not 0 <= rank < world:
        raise SpectraError(f"rank must be in [0, world) with world >= 1, got rank={rank}, world={world}")
    return list(range(rank, n_shards, world))


@dataclass
class Group:
    """One process's place in a run: rank, world size, local rank, whether torch.distributed
    was initialised by us (so `close` tears it down), and whether it is a detached share
    (`SPECTRA_SHARD_RANK` / `SPECTRA_SHARD_WORLD`: its shards only, no process group)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialised: bool = False
    detached: bool = False

    @classmethod
    def from_env(cls, *, device: str | None = None, timeout_s: float = 3600.0) -> "Group":
        """The group torchrun describes in the environment; a single process without it.

        `device` "cpu" forces gloo; otherwise NCCL where CUDA is available, else gloo.
        """
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        share = os.environ.get(SHARD_WORLD)
        if share is not None:
            if world > 1:
                raise SpectraError(f"{SHARD_WORLD} (a detached share) and torchrun (WORLD_SIZE="
                                   f"{world}) exclude each other; use one of them")
            try:
                share_world, share_rank = int(share), int(os.environ.get(SHARD_RANK, ""))
            except ValueError:
                raise SpectraError(f"{SHARD_RANK} and {SHARD_WORLD} must be integers; got "
                                   f"{os.environ.get(SHARD_RANK)!r} and {share!r}") from None
            shard_indices(0, share_rank, share_world)  # checks 0 <= rank < world
            if share_world > 1:
                return cls(rank=share_rank, world=share_world, detached=True)
        if world <= 1:
            return cls()
        import torch.distributed as dist

        if dist.is_initialized():
            return cls(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local)
        use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            torch.cuda.set_device(local % torch.cuda.device_count())
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        return cls(rank=rank, world=world, local_rank=local, initialised=True)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Several processes in one torch.distributed group (not detached shares)."""
        return self.world > 1 and not self.detached

    def device(self, requested: str | None) -> str | None:
        """The device of this rank: `cuda:LOCAL_RANK` when several ranks share CUDA devices."""
        if self.distributed and torch.cuda.is_available() and (requested is None or requested == "cuda"):
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return requested

    def shards(self, n_shards: int) -> list[int]:
        return shard_indices(n_shards, self.rank, self.world)

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if dist.get_backend() == "nccl":
                dist.barrier(device_ids=[torch.cuda.current_device()])
            else:
                dist.barrier()

    def all_ok(self, ok: bool) -> bool:
        """True when every rank says ok (a failing rank makes the others stop cleanly)."""
        if not self.distributed:
            return ok
        import torch.distributed as dist

        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([0 if ok else 1], device=dev)
        dist.all_reduce(t)
        return int(t.item()) == 0

    def close(self) -> None:
        if self.initialised:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.initialised = False
