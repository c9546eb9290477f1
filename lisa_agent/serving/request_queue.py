"""The ZeroMQ server's queue: the requests waiting for its model worker, bounded, with ``latest_only``
supersession and same-frame batching."""

from __future__ import annotations

import collections
import threading

from ..errors import InvalidArgumentError
from .execution import Job


class RequestQueue:
    """A bounded FIFO of jobs with "latest frame only" supersession and same-frame batching."""

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise InvalidArgumentError(f"max_queue must be at least 1; got {maxsize}")
        self.maxsize = maxsize
        self._items: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def put(self, job: Job) -> bool:
        """Append ``job``; False (nothing queued) when the queue is full."""
        with self._cond:
            if len(self._items) >= self.maxsize:
                return False
            self._items.append(job)
            self._cond.notify()
            return True

    def supersede(self, owner: str, stream: str, key: str) -> list[Job]:
        """Remove and return queued jobs of ``owner``'s ``stream`` for another frame than ``key``."""
        with self._cond:
            old = [j for j in self._items if j.owner == owner and j.request.stream == stream and j.key != key]
            for j in old:
                self._items.remove(j)
            return old

    def get(self, timeout: float, batch: bool) -> list[Job]:
        """Wait up to ``timeout`` s for a job; with ``batch``, also take the queued jobs that can run
        in one ``segment_batch`` call with it (same frame, fast mode). [] on timeout."""
        with self._cond:
            if not self._items and not self._cond.wait(timeout):
                return []
            if not self._items:
                return []
            first = self._items.popleft()
            jobs = [first]
            if batch and first.batchable():
                same = [j for j in self._items if j.batchable() and j.same_frame(first)]
                for j in same:
                    self._items.remove(j)
                jobs += same
            return jobs

    def drain(self) -> list[Job]:
        with self._cond:
            items = list(self._items)
            self._items.clear()
            return items

