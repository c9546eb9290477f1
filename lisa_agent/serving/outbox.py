"""Replies the ZeroMQ server holds for peers that do not take them, bounded in bytes per peer.

The server's ROUTER socket keeps a small pipe per peer (``SNDHWM`` 4) and fails a send instead of dropping it
(``ROUTER_MANDATORY``). A reply the peer's pipe cannot take waits here, behind that peer's earlier ones, until
the socket loop flushes it; beyond ``max_bytes`` for one peer, the peer's oldest replies are dropped (counted
``replies_dropped`` and logged). A reply to a peer that is gone is counted ``replies_unroutable``. Used by the
socket thread only; it never blocks.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from typing import Any

from ..errors import InvalidArgumentError

log = logging.getLogger("lisa_agent.serving")


class Outbox:
    """Per-peer queues of reply messages (identity frame first) that wait for their peer.

    Args:
        max_bytes: bytes held for one peer at most; beyond, its oldest replies are dropped (its newest is kept).
        count: ``count(key, n)`` adds ``n`` to the server's ``replies`` counter ``key``.
    """

    def __init__(self, max_bytes: int, count: Callable[[str, int], None]) -> None:
        if max_bytes < 1:
            raise InvalidArgumentError(f"max_pending_reply_bytes must be positive; got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._count = count
        self._boxes: dict[bytes, collections.deque[tuple[list[bytes], int]]] = {}
        self._bytes: collections.Counter[bytes] = collections.Counter()

    def __bool__(self) -> bool:
        """True while some reply waits."""
        return bool(self._boxes)

    @property
    def nbytes(self) -> int:
        """Bytes waiting, all peers together."""
        return int(sum(self._bytes.values()))

    def deliver(self, router: Any, frames: list[bytes]) -> None:
        """Send a reply (identity first) now, or keep it for its peer when the peer is not taking replies."""
        import zmq

        peer = frames[0]
        if peer in self._boxes:  # keep the order: behind what is already waiting
            self._hold(peer, frames)
            return
        try:
            router.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            self._hold(peer, frames)
        except zmq.ZMQError:  # the peer is gone (EHOSTUNREACH): nobody to answer
            self._count("replies_unroutable", 1)

    def flush(self, router: Any) -> None:
        """Send what waits, as far as each peer takes it."""
        import zmq

        for peer in list(self._boxes):
            box = self._boxes[peer]
            while box:
                frames, size = box[0]
                try:
                    router.send_multipart(frames, zmq.NOBLOCK)
                except zmq.Again:
                    break
                except zmq.ZMQError:
                    self._count("replies_unroutable", 1)
                box.popleft()
                self._bytes[peer] -= size
            if not box:
                del self._boxes[peer]
                del self._bytes[peer]

    def _hold(self, peer: bytes, frames: list[bytes]) -> None:
        box = self._boxes.setdefault(peer, collections.deque())
        size = sum(len(f) for f in frames)
        box.append((frames, size))
        self._bytes[peer] += size
        dropped = 0
        while self._bytes[peer] > self.max_bytes and len(box) > 1:
            _, old = box.popleft()
            self._bytes[peer] -= old
            dropped += 1
        if dropped:
            self._count("replies_dropped", dropped)
            log.warning("peer %s does not read its replies: dropped its %d oldest (%d bytes still waiting, limit %d)",
                        peer.hex(), dropped, self._bytes[peer], self.max_bytes)
