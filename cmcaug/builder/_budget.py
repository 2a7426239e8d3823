"""`ByteBudget`: how many bytes a pool of threads may hold ahead of an in-order consumer.

`cmcaug.builder.images.decode_stream` decodes images in threads and yields them in input order; its
budget bounds the decoded pixels held ahead of the consumer in bytes, not in images, so peak memory does
not grow with image size. Claims are granted in input order, which keeps it free of deadlock: the next
item to yield only ever waits for the items before it, which the consumer has already released.
"""
from __future__ import annotations

import threading


class BudgetClosed(Exception):
    """Raised in a thread waiting for its claim when the budget is closed: nobody wants its item any more."""


class ByteBudget:
    """At most `limit` bytes held by items claimed and not yet released; item `index` claims after items
    0 .. index-1 have claimed, once its bytes fit, or alone when they exceed the whole `limit`."""

    def __init__(self, limit: int):
        self._limit, self._total, self._next, self._closed = limit, 0, 0, False
        self._held: dict[int, int] = {}
        self._changed = threading.Condition()

    def claim(self, index: int, nbytes: int) -> None:
        """Wait for the turn of item `index` and room for `nbytes`, then hold them. A second claim for the
        same item does nothing, so an item that fails before it knows its size claims 0 to pass its turn on."""
        with self._changed:
            if index < self._next:
                return
            self._changed.wait_for(lambda: self._closed or (
                self._next == index and (self._total == 0 or self._total + nbytes <= self._limit)))
            if self._closed:
                raise BudgetClosed
            self._held[index], self._total, self._next = nbytes, self._total + nbytes, index + 1
            self._changed.notify_all()

    def release(self, index: int) -> None:
        """Give back what item `index` (which has claimed) holds."""
        with self._changed:
            self._total -= self._held.pop(index)
            self._changed.notify_all()

    def close(self) -> None:
        """Wake every waiting claim with `BudgetClosed`; later claims raise it at once."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
