"""Bounded work: at most ``slots`` requests compute at once and at most ``queue`` more wait (reading
their upload or waiting for a slot); a request beyond that is refused at once as busy."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class Busy(Exception):
    """Every slot and queue place is taken."""


class Slots:
    """Admission and compute slots of one server (one event loop)."""

    def __init__(self, slots: int, queue: int) -> None:
        if slots < 1 or queue < 0:
            raise ValueError(f"slots must be >= 1 and queue >= 0, got {slots} and {queue}")
        self.slots, self.queue = slots, queue
        self.admitted = 0  # requests holding a slot or a queue place
        self._compute = asyncio.Semaphore(slots)

    @contextlib.asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """A place for one request (Busy when there is none), held until the block ends."""
        if self.admitted >= self.slots + self.queue:
            raise Busy(f"busy: {self.slots} request(s) scoring and {self.queue} waiting, the server's limit "
                       f"(serve.py --slots, --queue); try again in a moment")
        self.admitted += 1
        try:
            yield
        finally:
            self.admitted -= 1

    @contextlib.asynccontextmanager
    async def compute(self) -> AsyncIterator[None]:
        """One of the compute slots, waited for in arrival order."""
        async with self._compute:
            yield
