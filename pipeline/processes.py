"""The processes of one launched job (`torchrun` or `accelerate launch`, which both set RANK,
WORLD_SIZE and LOCAL_RANK): this process's place among them and the few collectives the stages
use, all of them the identity for a single process, so one code path serves both. Messages go as
bytes in tensors, never as pickled objects."""

from __future__ import annotations

import datetime
import functools
import json
import os
from dataclasses import dataclass, field

import torch

from pipeline import heartbeat
from pipeline.errors import PipelineError

# Seconds a collective waits for a peer before failing (a killed rank then stops the others
# with an error instead of a hang). Long enough for a checkpoint write or a slow first chunk.
TIMEOUT_VARIABLE = "PIPELINE_PEER_TIMEOUT"
DEFAULT_TIMEOUT_S = 600


@dataclass
class Workers:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    comm_device: str = "cpu"
    """Where the process group's tensors live (cuda for nccl)."""
    beat: heartbeat.Heartbeat | None = field(default=None, repr=False, compare=False)
    """This process's heartbeat, read by a peer whose collective fails (None for one process)."""
    lost: str | None = field(default=None, repr=False, compare=False)
    """Why a collective failed: the group is broken, so any later one fails with the same."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mine(self, chunks: list[int], per_batch: int = 1) -> list[int]:
        """This process's chunks: groups of `per_batch` chunks (one forward batch) dealt round
        robin, so no batch is computed by two processes."""
        return [k for k in chunks if (k // per_batch) % self.world == self.rank]

    def dealt(self, items: list) -> list:
        """This process's share of a list (a sweep's grid points), dealt round robin."""
        return items[self.rank::self.world]

    def from_main(self, text: str | None) -> str | None:
        """Rank 0's message (or None), on every process; a barrier too."""
        if self.world == 1:
            return text
        data = (text or "").encode()
        size = torch.tensor([len(data) if text is not None else -1], device=self.comm_device)
        self._collective(torch.distributed.broadcast, size, src=0)
        if int(size) < 0:
            return None
        buf = torch.tensor(list(data), dtype=torch.uint8, device=self.comm_device) \
            if self.is_main else torch.empty(int(size), dtype=torch.uint8,
                                             device=self.comm_device)
        self._collective(torch.distributed.broadcast, buf, src=0)
        return bytes(buf.cpu().tolist()).decode()

    def agree(self, problem: str | None) -> None:
        """Every process says what stops it (or None); all of them raise the first problem,
        naming its process, so no rank waits for a peer that has given up. A barrier too."""
        if self.world == 1:
            if problem is not None:
                raise PipelineError(problem)
            return
        data = (problem or "").encode()
        sizes = torch.zeros(self.world, dtype=torch.int64, device=self.comm_device)
        sizes[self.rank] = len(data) if problem is not None else -1
        self.sum_(sizes)  # every rank fills its own entry only
        longest = max(int(sizes.max()), 0)
        buf = torch.zeros(longest, dtype=torch.uint8, device=self.comm_device)
        buf[:len(data)] = torch.tensor(list(data), dtype=torch.uint8)
        bufs = [torch.empty_like(buf) for _ in range(self.world)]
        self._collective(torch.distributed.all_gather, bufs, buf)
        for r, (size, got) in enumerate(zip(sizes.tolist(), bufs, strict=True)):
            if size >= 0:
                text = bytes(got[:size].cpu().tolist()).decode()
                raise PipelineError(text if r == self.rank else f"process {r} of {self.world}: "
                                    f"{text}")

    def together(self, fn):
        """fn() on every process; if it fails on any (PipelineError), all of them raise."""
        if self.world == 1:
            return fn()
        try:
            result = fn()
        except PipelineError as e:
            self.agree(str(e))  # raises on every rank
        self.agree(None)
        return result

    def same(self, what: str, settings: dict) -> None:
        """Refuse to start unless every process was given rank 0's settings (a launch whose
        processes disagree would otherwise train on mixed data or hang on mismatched shapes)."""
        if self.world == 1:
            return
        mine = json.loads(json.dumps(settings, sort_keys=True, default=str))
        main = json.loads(self.from_main(json.dumps(mine, sort_keys=True)))
        differ = sorted(k for k in set(main) | set(mine) if main.get(k) != mine.get(k))
        self.agree(None if not differ else
                   f"the processes of this launch disagree on the {what}: "
                   + "; ".join(f"{k} is {mine.get(k)!r} here but {main.get(k)!r} on process 0"
                               for k in differ[:5])
                   + ". Launch every process with the same command and the same cache")

    def checked(self, work):
        """work(ready) on every process, where work calls ready() once its own checks have
        passed and before it writes anything: ready() waits for every process's checks, and a
        check that fails on one process stops them all (exit 2) before any of them writes."""
        if self.world == 1:
            return work(lambda: None)
        agreed = []

        def ready() -> None:
            agreed.append(True)
            self.agree(None)

        try:
            return work(ready)
        except PipelineError as e:
            if not agreed:  # failed in its checks: the others wait for it in ready()
                self.agree(str(e))
            raise

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """t summed over the processes, in place."""
        if self.world > 1:
            self._collective(torch.distributed.all_reduce, t)
        return t

    def mean_(self, t: torch.Tensor) -> torch.Tensor:
        """t averaged over the processes, in place (the identity for one process)."""
        if self.world > 1:
            self._collective(torch.distributed.all_reduce, t)
            t.div_(self.world)
        return t

    def min_(self, t: torch.Tensor) -> torch.Tensor:
        """t's elementwise minimum over the processes, in place."""
        if self.world > 1:
            self._collective(torch.distributed.all_reduce, t,
                             op=torch.distributed.ReduceOp.MIN)
        return t

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every process's t (all the same shape), concatenated in rank order."""
        if self.world == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        self._collective(torch.distributed.all_gather, parts, t.contiguous())
        return torch.cat(parts)

    def any_(self, t: torch.Tensor) -> torch.Tensor:
        """A bool tensor or-ed over the processes (a new tensor; t itself for one process)."""
        if self.world == 1:
            return t
        n = t.to(torch.int32)
        self._collective(torch.distributed.all_reduce, n, op=torch.distributed.ReduceOp.MAX)
        return n.bool()

    def _collective(self, collective, *args, **kwargs) -> None:
        if self.lost is not None:  # say it again at once rather than wait for a broken group
            raise PipelineError(self.lost)
        if self.beat is not None:
            self.beat.exchanges += 1
        try:
            collective(*args, **kwargs)
        except RuntimeError as e:  # a peer died or timed out: name it instead of a C++ trace
            named = heartbeat.explain(
                self.rank, self.world, self.beat.diagnose(),
                f"{peer_timeout()} s ({TIMEOUT_VARIABLE})") if self.beat is not None else None
            self.lost = (named or
                         f"process {self.rank} of {self.world} lost a peer: another process of "
                         f"this job stopped or did not answer within {peer_timeout()} s "
                         f"({TIMEOUT_VARIABLE}); the launcher's report names the process that "
                         "failed first") + f". ({str(e)[:300]})"
            raise PipelineError(self.lost) from e

    def leave(self) -> None:
        """Leave the process group before exiting on an error every rank shares."""
        if self.beat is not None:
            self.beat.stop()
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def device(self, device: str) -> str:
        """One GPU per process: plain 'cuda' becomes cuda:LOCAL_RANK."""
        return f"cuda:{self.local_rank}" if self.world > 1 and device == "cuda" else device


ALONE = Workers()
"""The single process: every collective is the identity."""


def peer_timeout() -> int:
    text = os.environ.get(TIMEOUT_VARIABLE, str(DEFAULT_TIMEOUT_S))
    if not text.isdigit() or int(text) < 1:
        raise PipelineError(f"{TIMEOUT_VARIABLE}={text!r}: expected a whole number of seconds "
                            "(at least 1) that a process waits for its peers")
    return int(text)


def check_launch(device: str, device_map: str | None = None) -> None:
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
        return ALONE
    timeout = peer_timeout()
    backend = "nccl" if device.startswith("cuda") else "gloo"
    w = Workers(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")),
                f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if backend == "nccl" else "cpu")
    if not torch.distributed.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(w.local_rank)
        torch.distributed.init_process_group(backend,
                                             timeout=datetime.timedelta(seconds=timeout))
    w.beat = _heartbeat(w.rank, world)
    return w


@functools.cache
def _heartbeat(rank: int, world: int) -> heartbeat.Heartbeat | None:
    """One heartbeat per process, however many times a process calls workers()."""
    return heartbeat.start(rank, world)
