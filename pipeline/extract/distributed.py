"""Several extraction processes on one cache (launched by `torchrun` or `accelerate launch`):
process r of N takes the chunks k with (k // chunks_per_batch) % N == r (chunks_per_batch is 1
unless a forward batch spans chunks). Rank 0 takes the cache's writer lock and
creates (or checks) the cache, a barrier releases the others; once every rank has passed a
barrier at the end, rank 0 marks the cache complete (finalize) and only then lets the lock go, so
the ranks of one job never lock each other out and no other job can start in between. A killed
process leaves its chunks without records: the cache stays 'writing' and any later run resumes
it."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from pipeline.errors import PipelineError


@dataclass
class Workers:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    comm_device: str = "cpu"
    """Where the process group's tensors live (cuda for nccl)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mine(self, chunks: list[int], per_batch: int = 1) -> list[int]:
        """This process's chunks: groups of `per_batch` chunks (one forward batch) dealt round
        robin, so no batch is computed by two processes."""
        return [k for k in chunks if (k // per_batch) % self.world == self.rank]

    def from_main(self, text: str | None) -> str | None:
        """Rank 0's message (or None), on every process; a barrier too. Sent as bytes in
        tensors, not pickled objects."""
        if self.world == 1:
            return text
        data = (text or "").encode()
        size = torch.tensor([len(data) if text is not None else -1], device=self.comm_device)
        torch.distributed.broadcast(size, src=0)
        if int(size) < 0:
            return None
        buf = torch.tensor(list(data), dtype=torch.uint8, device=self.comm_device) \
            if self.is_main else torch.empty(int(size), dtype=torch.uint8,
                                             device=self.comm_device)
        torch.distributed.broadcast(buf, src=0)
        return bytes(buf.cpu().tolist()).decode()

    def leave(self) -> None:
        """Leave the process group before exiting on an error every rank shares."""
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def device(self, device: str) -> str:
        """One GPU per process: plain 'cuda' becomes cuda:LOCAL_RANK."""
        return f"cuda:{self.local_rank}" if self.world > 1 and device == "cuda" else device


def check_launch(device: str, device_map: str | None) -> None:
    """Refuse device settings that several launched processes cannot share: each process takes
    its own GPU (cuda:LOCAL_RANK), so a fixed cuda:N would put every rank on one GPU, and
    --device-map would spread every rank over all of them."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return
    if device.startswith("cuda:"):
        raise PipelineError(
            f"--device {device} with {world} processes would put every process on that one GPU: "
            "pass --device cuda (process r then uses cuda:LOCAL_RANK), or run one process")
    if device_map is not None:
        raise PipelineError(
            f"--device-map {device_map} spreads one process over every GPU; with {world} "
            "processes each would take all of them. Run one process with --device-map (a model "
            "larger than one GPU), or several without it (one GPU each)")


def workers(device: str) -> Workers:
    """This process's place among the launched ones (RANK/WORLD_SIZE from the launcher); joins
    the process group (gloo on CPU, nccl on CUDA) when there is more than one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Workers()
    backend = "nccl" if device.startswith("cuda") else "gloo"
    w = Workers(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")),
                f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if backend == "nccl" else "cpu")
    if not torch.distributed.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(w.local_rank)
        torch.distributed.init_process_group(backend)
    return w
