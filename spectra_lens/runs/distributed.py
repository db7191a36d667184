"""Several processes or machines on torch.distributed: who does which unit of work, and when to merge.

Launch the observational run (`observe`) or the gain sweep (`gain`) under `torchrun` (one
process per GPU, or several CPU processes):

    torchrun --nproc-per-node 2 -m spectra_lens.experiments.cli observe --out results/obs ...
    torchrun --nproc-per-node 2 -m spectra_lens.experiments.cli gain --out results/gain ...

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; `Group.from_env()` reads them, initialises the
process group (gloo on CPU, NCCL on CUDA) and gives each rank its device (`cuda:LOCAL_RANK`
where CUDA exists). Work is split into numbered units, round robin: rank r takes units r,
r + W, r + 2W, ... (`shard_indices`). The unit of `observe` is a token shard; the unit of `gain`
is a part, one fast-path batch of `--batch-size` measured sequences (experiments/gain.py says
why). Each rank writes its units' outputs itself (atomic files, listed in the run's manifest by
rank 0 before any is written), so a killed rank leaves exactly its unfinished units missing and
a rerun of the same command (any number of processes) redoes only those. Rank 0 owns the run
directory and starts the run before the others begin (a barrier) and merges after every rank
is done (a second barrier); `Steps` makes these barriers report a failed rank, so the others
stop instead of waiting for the timeout. Without torchrun (no WORLD_SIZE, or 1) nothing is
initialised and the group is one process: the same code path. `intervene` and `qk-control`
run in one process.

Across machines: `torchrun --nnodes N --node-rank i --rdzv-endpoint HOST:PORT ...` on each node
with the run directory on a shared file system; or, without a rendezvous, one job per share of
the units (e.g. a SLURM array task) with `SPECTRA_SHARD_RANK=i SPECTRA_SHARD_WORLD=N` in its
environment: such a job is "detached" (no process group, no barriers), computes units i, i + N,
... into its own run directory (observe: of prepared shards) and makes no tables; `spectra-lens
merge RUN_DIR ...` then reads every share's files and computes the tables once.
"""

import datetime
import os
from dataclasses import dataclass

import torch

from spectra_lens.errors import SpectraError

__all__ = ["Group", "SHARD_RANK", "SHARD_WORLD", "Steps", "shard_indices"]

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
                # Every rank tears down together: a rank that destroyed its group while another
                # still held its connections could abort at exit ("terminate called without an
                # active exception"). A broken group (a rank died) skips the wait.
                try:
                    dist.barrier()
                except Exception:
                    pass
                dist.destroy_process_group()
            self.initialised = False


class Steps:
    """`n` collective checkpoints that every rank of a group passes in the same order.

    `step()` is a barrier that also says whether every rank got there without failing
    (`Group.all_ok`). A rank that fails calls `abort()`, which passes its remaining checkpoints
    with "failed", so the other ranks learn of it at their next checkpoint and stop instead of
    waiting for the group's timeout. Without a process group every step is True at once.
    """

    def __init__(self, group: Group, n: int):
        self.group, self.n, self.done = group, n, 0

    def step(self) -> bool:
        if self.done >= self.n:
            raise SpectraError(f"more checkpoints than the {self.n} declared")
        self.done += 1
        return self.group.all_ok(True)

    def abort(self) -> None:
        while self.done < self.n:
            self.done += 1
            try:
                self.group.all_ok(False)
            except Exception:  # the group itself is broken (a rank died): nobody to tell
                return
