"""Each launched process's heartbeat in the job's rendezvous store (the TCPStore that torchrun or
accelerate's launcher hosts on the first machine, or process 0 without one), so a process whose
collective fails can name the peer that is gone, or the one that is stuck, instead of 'a peer'.

A beat is a counter, not a clock time: a survivor watches which counters stop moving, so the
machines' clocks never need to agree."""

from __future__ import annotations

import atexit
import datetime
import os
import threading
import time
from dataclasses import dataclass

import torch

INTERVAL_S = 1.0
# A process that has not beaten for this long is gone: a live one beats every second even on a
# busy CPU (the beat is a sleeping thread), so 5 missed beats are no scheduling hiccup.
STALE_S = 5.0
# The beat's own store calls give up quickly: a heartbeat must never hold a process up.
STORE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Verdict:
    """What a survivor learned about its peers after a failed collective."""
    gone: list[int]
    """No beat for STALE_S: killed or crashed."""
    behind: list[int]
    """Still beating, but it has entered fewer collectives than this process: stuck or slow."""
    waiting: list[int]
    """Not decided yet: no new beat, but not silent for STALE_S either."""


Beats = dict[int, tuple[int, int]]
"""rank -> (beat counter, collectives entered), for the peers that have beaten at all."""


def judge(peers: list[int], first: Beats, last: Beats, waited_s: float,
          exchanges: int) -> Verdict:
    """Sort the peers by two reads of their beats `waited_s` seconds apart, the first taken
    when this process's collective (its `exchanges`-th) failed. Pure: no store, no clock."""
    gone, behind, waiting = [], [], []
    for r in peers:
        now, then = last.get(r), first.get(r)
        if now is not None and (then is None or now[0] != then[0]):  # it beat since: alive
            if now[1] < exchanges:
                behind.append(r)
        elif waited_s >= STALE_S:
            gone.append(r)
        else:
            waiting.append(r)
    return Verdict(gone, behind, waiting)


def _ranks(ranks: list[int]) -> str:
    return ("process " if len(ranks) == 1 else "processes ") + ", ".join(map(str, ranks))


def explain(rank: int, world: int, verdict: Verdict | None, timeout: str) -> str | None:
    """The survivor's sentence naming the lost or stuck peer(s) (None: nothing to name); a
    verdict of None means the store itself could not be read. `timeout`: how long a collective
    waits, and the setting that says so."""
    me = f"process {rank} of {world}"
    if verdict is None:
        host = ("the launcher on the first machine (torchrun or accelerate launch): that launcher "
                "is gone" if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" else
                "process 0: process 0 is gone")
        return f"{me} lost the rendezvous store, hosted by {host}"
    if verdict.gone:
        return (f"{me} lost {_ranks(verdict.gone)} (no heartbeat for {STALE_S:g} s: it was "
                "killed or crashed; see its own output or its launcher's report for why)")
    if verdict.behind:
        return (f"{me} got no answer from {_ranks(verdict.behind)} within {timeout}: it is "
                "still running but has not reached this exchange (stuck, or slower than the "
                "timeout allows)")
    return None


class Heartbeat:
    """A daemon thread that bumps `heartbeat/<rank>` in the store every INTERVAL_S, with the
    number of collectives this process has entered (the main thread counts them in
    `exchanges`). It stops at exit, or for good at its first store error (the store's
    connection is then gone, and the collectives report the failure)."""

    def __init__(self, store, rank: int, world: int):
        self.rank, self.world, self.exchanges = rank, world, 0
        # one client per thread (a store client is not thread-safe), each with a short timeout
        self._writer, self._reader = store.clone(), store.clone()
        for s in (self._writer, self._reader):
            s.set_timeout(datetime.timedelta(seconds=STORE_TIMEOUT_S))
        # a restarted job (torchrun --max-restarts) must not read the last attempt's beats
        self._prefix = f"pipeline-heartbeat/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        self._count, self._stop = 0, threading.Event()
        self._beat()  # before any collective: a peer that fails at once can read it
        self._thread = threading.Thread(target=self._run, name="pipeline-heartbeat", daemon=True)
        self._thread.start()
        atexit.register(self.stop)

    def _beat(self) -> None:
        self._count += 1
        self._writer.set(f"{self._prefix}{self.rank}", f"{self._count} {self.exchanges}")

    def _run(self) -> None:
        while not self._stop.wait(INTERVAL_S):
            try:
                self._beat()
            except Exception:  # never let the heartbeat fail a run; its silence says enough
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=INTERVAL_S)

    def read(self) -> Beats:
        peers = [r for r in range(self.world) if r != self.rank]
        keys = [f"{self._prefix}{r}" for r in peers]
        # two requests when every peer has beaten (the usual case: a job's survivors all poll
        # the one store at once), one per peer otherwise (a get waits for a missing key)
        if self._reader.check(keys):
            values = dict(zip(peers, self._reader.multi_get(keys), strict=True))
        else:
            values = {r: self._reader.get(k) for r, k in zip(peers, keys, strict=True)
                      if self._reader.check([k])}
        return {r: tuple(int(x) for x in v.decode().split()) for r, v in values.items()}

    def diagnose(self) -> Verdict | None:
        """After a failed collective: watch the peers' beats until each is alive or STALE_S
        silent (at most STALE_S and a beat); None if the store cannot be read for STALE_S (a
        read that fails once on a busy machine is retried: only a store that stays silent is
        lost)."""
        peers = [r for r in range(self.world) if r != self.rank]
        first, start = None, time.monotonic()
        while True:
            try:
                beats = self.read()
            except RuntimeError:  # torch's store errors (connection refused, reset, timeout)
                if time.monotonic() - start >= STALE_S:
                    return None
                time.sleep(INTERVAL_S)
                continue
            if first is None:
                first, start = beats, time.monotonic()
            else:
                verdict = judge(peers, first, beats, time.monotonic() - start, self.exchanges)
                if not verdict.waiting:
                    return verdict
            time.sleep(INTERVAL_S)


def start(rank: int, world: int) -> Heartbeat | None:
    """This process's heartbeat in the default process group's store, or None where that store
    cannot give it one (the errors then say 'a peer', as before)."""
    try:
        return Heartbeat(torch.distributed.distributed_c10d._get_default_store(), rank, world)
    except Exception:
        return None
