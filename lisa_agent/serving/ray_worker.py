"""A Ray Serve replica's model side: the ``segment`` requests it holds, and the one thread that runs the model.

:class:`ReplicaRequests` keeps the requests by caller and stream (``latest_only`` supersedes only a request
that has not started) and counts those still waiting. :class:`ModelWorker` runs the requests Serve's dynamic
batching collected on the replica's model thread, so the replica's event loop stays free for ``info``,
``health`` and ``superseded``: requests past their deadline are answered ``deadline_exceeded``, queries on the
same frame run as one ``segment_batch`` call, the rest one by one, in arrival order. It also keeps what the
replica's health checks read: how long the current model call has run, the model's consecutive failures
(a caller's mistake counts neither way), and the calls that grouped several queries.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
import time

from ..backend import SegmentBackend
from .execution import (
    TRACK_BUDGET_BYTES,
    TRACK_IDLE_S,
    Job,
    TrackSessions,
    batch_call,
    expired,
    run_on_one_frame,
)
from .framing import Limits, encode_reply

#: A reply's frames (header JSON first).
Reply = list[bytes]


class Item:
    """One ``segment`` request inside a replica: queued (in Serve's batch queue), started, superseded,
    abandoned (its client hung up) or done. State changes happen under :class:`ReplicaRequests`' lock."""

    __slots__ = ("job", "state", "superseded")

    def __init__(self, job: Job) -> None:
        self.job = job
        self.state = "queued"
        self.superseded = asyncio.Event()


class ReplicaRequests:
    """The ``segment`` requests a replica holds, by (caller, stream); :attr:`queued` counts those not started."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._streams: dict[tuple[str, str], list[Item]] = collections.defaultdict(list)
        self.queued = 0

    @staticmethod
    def _stream(item: Item) -> tuple[str, str]:
        return item.job.owner, item.job.request.stream or ""

    def add(self, item: Item, latest_only: bool) -> list[Item]:
        """Hold ``item``; with ``latest_only``, the queued items of its stream for another frame are marked
        superseded and returned (their requests answer ``superseded``; the model thread skips them)."""
        stream = self._stream(item)
        superseded: list[Item] = []
        with self._lock:
            if latest_only:
                for old in self._streams[stream]:
                    if old.job.key != item.job.key and old.state == "queued":
                        old.state = "superseded"
                        superseded.append(old)
            self._streams[stream].append(item)
            self.queued += 1
        return superseded

    def abandon(self, item: Item) -> None:
        """Its client hung up: not run if it has not started."""
        with self._lock:
            if item.state == "queued":
                item.state = "abandoned"

    def remove(self, item: Item) -> None:
        """``item`` is answered (or abandoned): the replica holds it no more."""
        stream = self._stream(item)
        with self._lock:
            self._streams[stream].remove(item)
            if not self._streams[stream]:
                del self._streams[stream]
            if item.state in ("queued", "superseded", "abandoned"):
                self.queued -= 1

    def start(self, items: list[Item]) -> list[Item]:
        """The ``items`` still queued, now started (the others were superseded or abandoned meanwhile)."""
        started = []
        with self._lock:
            for item in items:
                if item.state == "queued":
                    item.state = "started"
                    self.queued -= 1
                    started.append(item)
        return started


class ModelWorker:
    """The replica's model thread and what its health checks read (see the module docstring).

    Args:
        backend: the replica's model.
        requests: the replica's requests (:meth:`ReplicaRequests.start` marks those the thread takes).
        limits: the protocol's limits (decoding images).
        batch: run queries on one frame as one ``segment_batch`` call (when the backend has it).
        track_idle_s / max_track_bytes: the tracked sessions' bounds (:class:`~lisa_agent.serving.execution.TrackSessions`).
    """

    def __init__(self, backend: SegmentBackend, requests: ReplicaRequests, *, limits: Limits, batch: bool,
                 track_idle_s: float = TRACK_IDLE_S, max_track_bytes: int = TRACK_BUDGET_BYTES) -> None:
        self.backend = backend
        self.requests = requests
        self.limits = limits
        self.segment_batch = batch_call(backend, batch)
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="lisa-model")
        self.sessions = TrackSessions(backend, idle_s=track_idle_s, max_bytes=max_track_bytes)  # model thread only
        #: when the running model call began (``time.monotonic()``), None while idle
        self.busy_since: float | None = None
        self.failures = 0
        self.last_failure = ""
        self._lock = threading.Lock()
        #: ``segment_batch`` calls with more than one query, and the requests they answered
        self._batches: collections.Counter[str] = collections.Counter()

    async def run(self, items: list[Item]) -> list[Reply | None]:
        """Reply frames for each item, computed on the model thread (None for an item superseded or abandoned
        before it started)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self._run_items, items)

    def batches(self) -> dict[str, int]:
        """``{"calls", "requests"}``: the ``segment_batch`` calls that grouped queries on one frame."""
        with self._lock:
            return {"calls": self._batches["calls"], "requests": self._batches["requests"]}

    def sweep(self) -> None:
        """Drop idle tracked sessions, on the model thread between model calls."""
        try:
            self.executor.submit(self.sessions.sweep)
        except RuntimeError:  # shutting down
            pass

    def check(self, stuck_after_s: float, max_consecutive_failures: int) -> None:
        """Raise when a model call has run for more than ``stuck_after_s`` or the last
        ``max_consecutive_failures`` model calls failed (the replica is then to be replaced)."""
        since = self.busy_since
        if since is not None and time.monotonic() - since > stuck_after_s:
            raise RuntimeError(f"a model call has run for {time.monotonic() - since:.0f} s (stuck_after_s "
                               f"{stuck_after_s:g}); replace this replica")
        if self.failures >= max_consecutive_failures:
            raise RuntimeError(f"the last {self.failures} model calls failed (last: {self.last_failure}); "
                               "replace this replica")

    def close(self) -> None:
        """Wait for the model thread to finish its work and end it."""
        self.executor.shutdown(wait=True)

    # ---------------------------------------------------------------------------- model thread

    def _run_items(self, items: list[Item]) -> list[Reply | None]:
        """Deadlines first, then groups of queries on one frame (one ``segment_batch`` call), in arrival order."""
        now = time.monotonic()
        replies: dict[int, Reply | None] = {id(item): None for item in items}
        live: list[Item] = []
        for item in self.requests.start(items):
            late = expired(item.job, now, "the replica")
            if late is not None:
                replies[id(item)] = encode_reply(item.job.request.id, error=late)
            else:
                live.append(item)
        while live:
            first = live.pop(0)
            group = [first]
            if self.segment_batch is not None and first.job.batchable():
                group += [i for i in live if i.job.batchable() and i.job.same_frame(first.job)]
                live = [i for i in live if all(i is not g for g in group)]
            for item, reply in zip(group, self._run_group([i.job for i in group], now), strict=True):
                replies[id(item)] = reply
        return [replies[id(item)] for item in items]

    def _run_group(self, jobs: list[Job], now: float) -> list[Reply]:
        """Replies for requests on one frame (several only when they can run as one batch)."""
        self.busy_since = time.monotonic()
        try:
            run = run_on_one_frame(jobs, backend=self.backend, segment_batch=self.segment_batch,
                                   sessions=self.sessions, limits=self.limits, now=now)
        finally:
            self.busy_since = None
        if run.batched:
            with self._lock:
                self._batches["calls"] += 1
                self._batches["requests"] += run.batched
        replies = []
        for outcome in run.outcomes:
            # only the model's own faults count toward health; a caller's mistake (a typed error) neither
            # counts nor clears the count
            if outcome.model_failed:
                self.failures += 1
                self.last_failure = str(outcome.error)[:300]
            elif outcome.payload is not None:
                self.failures = 0
            if outcome.error is not None:
                replies.append(encode_reply(outcome.job.request.id, error=outcome.error))
            else:
                replies.append(encode_reply(outcome.job.request.id, outcome.payload, extra_frames=outcome.extra))
        return replies
