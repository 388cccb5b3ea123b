"""Bounded work. A request whose body is still arriving holds no place: it only charges the bytes it
has sent to a budget shared by all requests. Once its body is in, it takes one of ``slots + queue``
places (scoring, or waiting for one of the ``slots``); a request beyond that, or one whose bytes would
overrun the budget, is refused at once as busy."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from .uploads import human_bytes


class Busy(Exception):
    """Every place is taken, or the bytes being received are at the server's limit."""


class Slots:
    """Admission and compute slots of one server (one event loop)."""

    def __init__(self, slots: int, queue: int, byte_budget: int) -> None:
        if slots < 1 or queue < 0 or byte_budget < 1:
            raise ValueError(f"slots must be >= 1, queue >= 0 and byte_budget >= 1, got {slots}, {queue} and "
                             f"{byte_budget}")
        self.slots, self.queue, self.byte_budget = slots, queue, byte_budget
        self.admitted = 0  # requests whose body has arrived: scoring or waiting for a slot
        self.scoring = 0  # of those, the ones holding a compute slot
        self.requests = 0  # requests being received or answered
        self.held_bytes = 0  # body bytes of every request received or being received, not yet answered
        self._compute = asyncio.Semaphore(slots)

    @property
    def receiving(self) -> int:
        """Requests whose body is still arriving (every request is inside ``receive``, the admitted too)."""
        return self.requests - self.admitted

    def check_room(self) -> None:
        """Busy when every place is taken now (a quick refusal before a body is read)."""
        if self.admitted >= self.slots + self.queue:
            raise Busy(f"busy: {self.scoring} request(s) scoring and {self.admitted - self.scoring} waiting, the "
                       f"server's limit (serve.py --slots, --queue); try again in a moment")

    @contextlib.asynccontextmanager
    async def receive(self) -> AsyncIterator[Callable[[int], None]]:
        """A request from its first byte to its answer: yields ``charge(n)``, which counts ``n`` more
        bytes of its body (Busy beyond the budget); they are given back when the block ends."""
        held = 0

        def charge(n: int) -> None:
            nonlocal held
            if self.held_bytes + n > self.byte_budget:
                raise Busy(f"busy: the uploads in progress hold {human_bytes(self.held_bytes)}, the server's limit "
                           f"((--slots + --queue) requests of --max_files files); try again in a moment")
            self.held_bytes += n
            held += n

        self.requests += 1
        try:
            yield charge
        finally:
            self.requests -= 1
            self.held_bytes -= held

    @contextlib.asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """A place, inside ``receive``, for a request whose body has arrived (Busy when there is none), held
        until the block ends."""
        self.check_room()
        self.admitted += 1
        try:
            yield
        finally:
            self.admitted -= 1

    @contextlib.asynccontextmanager
    async def compute(self) -> AsyncIterator[None]:
        """One of the compute slots, waited for in arrival order."""
        async with self._compute:
            self.scoring += 1
            try:
                yield
            finally:
                self.scoring -= 1
