"""Admission: global and per-instance connection caps with a fair FIFO wait queue."""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field
from typing import Protocol


class Refused(Exception):
    """Refused is a client that could not be admitted: why, and the numbers to show it."""

    def __init__(
        self,
        *,
        instance: str,
        reason: str,
        scope: str,
        in_use: int,
        limit: int,
        waited: float,
        waiting: int = 0,
    ) -> None:
        super().__init__(reason)
        self.instance = instance
        self.reason = reason  # "full" (waited max-wait) or "queue-full" (max-waiting reached)
        self.scope = scope  # "instance" or "global"
        self.in_use = in_use
        self.limit = limit
        self.waited = waited
        self.waiting = waiting

    @property
    def message(self) -> str:
        """message is the ErrorResponse text a refused client sees."""
        where = (
            f"for instance {self.instance}" if self.scope == "instance" else "across all instances"
        )
        text = (
            f"sqlproxy: too many connections {where} "
            f"({self.in_use} of {self.limit} in use, waited {self.waited:.1f} s)"
        )
        if self.reason == "queue-full":
            text += f"; {self.waiting} clients already waiting"
        return text

    @property
    def hint(self) -> str:
        """hint names the knob to turn."""
        knob = (
            f"raise ?max-connections= on {self.instance}"
            if self.scope == "instance"
            else "raise --max-connections"
        )
        text = (
            f"Lower the client pool size (Convex: POSTGRES_MAX_CONNECTIONS) or {knob}, "
            "keeping the total below the instance's max_connections."
        )
        if self.reason == "queue-full":
            text += " Or raise --max-waiting / --max-wait to queue more clients for longer."
        return text


@dataclass
class InstanceState:
    """InstanceState is one instance's admission counters, read by metrics and readiness."""

    open: int = 0
    waiting: int = 0
    admitted_total: int = 0
    refused_total: collections.Counter[str] = field(default_factory=collections.Counter)
    wait_seconds_total: float = 0.0


Blocker = tuple[str, int, int]


class Counts(Protocol):
    """Counts keep the open-session numbers the caps are checked against."""

    shared: bool

    def take(self, instance: str, global_max: int, instance_max: int) -> Blocker | None:
        """take reserves a slot unless a cap is reached, and then says which one."""
        ...

    def give_back(self, instance: str) -> None:
        """give_back frees a slot taken earlier."""
        ...

    @property
    def total(self) -> int:
        """total is how many sessions are open, across every instance."""
        ...


class LocalCounts:
    """LocalCounts are open-session counts for a single process."""

    shared = False

    def __init__(self) -> None:
        self._total = 0
        self._per: collections.Counter[str] = collections.Counter()

    def take(self, instance: str, global_max: int, instance_max: int) -> Blocker | None:
        """take reserves a slot unless a cap is reached, and then says which one."""
        if instance_max and self._per[instance] >= instance_max:
            return "instance", self._per[instance], instance_max
        if global_max and self._total >= global_max:
            return "global", self._total, global_max
        self._total += 1
        self._per[instance] += 1
        return None

    def give_back(self, instance: str) -> None:
        """give_back frees a slot taken earlier."""
        self._total -= 1
        self._per[instance] -= 1

    @property
    def total(self) -> int:
        """total is how many sessions are open, across every instance."""
        return self._total


@dataclass(eq=False)
class _Waiter:
    instance: str
    future: asyncio.Future[None]
    since: float


class Ticket:
    """Ticket is an admitted connection's slot; release it exactly once when the session ends."""

    __slots__ = ("_admission", "instance", "released", "waited")

    def __init__(self, admission: Admission, instance: str, waited: float) -> None:
        self._admission = admission
        self.instance = instance
        self.waited = waited
        self.released = False

    def release(self) -> None:
        """release frees the slot and lets the next fitting waiter in."""
        if not self.released:
            self.released = True
            self._admission._release(self.instance)


class Admission:
    """Admission decides who may open a session now, who waits, and who is refused.

    Waiters are served in arrival order among those that fit: a client waiting for a full
    instance does not hold back a client of another instance while the global cap has room.
    """

    def __init__(
        self,
        *,
        max_connections: int = 0,
        per_instance: dict[str, int] | None = None,
        max_wait: float = 15.0,
        max_waiting: int = 0,
        counts: Counts | None = None,
        poll_interval: float = 0.02,
    ) -> None:
        self.max_connections = max_connections
        self.per_instance = dict(per_instance or {})
        self.max_wait = max_wait
        self.max_waiting = max_waiting
        # Local, or shared by worker processes (sqlproxy.workers.SharedCounts).
        self.counts: Counts = counts or LocalCounts()
        self.states: dict[str, InstanceState] = collections.defaultdict(InstanceState)
        self._queue: collections.deque[_Waiter] = collections.deque()
        self._poll_interval = poll_interval
        self._poll: asyncio.TimerHandle | None = None

    @property
    def open(self) -> int:
        """open is how many sessions are admitted now (across workers when they share counts)."""
        return self.counts.total

    @property
    def waiting(self) -> int:
        """waiting is how many clients are queued now."""
        return len(self._queue)

    @property
    def saturated(self) -> bool:
        """saturated is true while the global cap is reached (readiness reports 503)."""
        return self.max_connections > 0 and self.open >= self.max_connections

    def _admit(self, instance: str) -> Blocker | None:
        """_admit takes a slot for instance if the caps allow; else says which cap stops it."""
        blocker = self.counts.take(
            instance, self.max_connections, self.per_instance.get(instance, 0)
        )
        if blocker is None:
            state = self.states[instance]
            state.open += 1
            state.admitted_total += 1
        return blocker

    async def acquire(self, instance: str) -> Ticket:
        """acquire admits now, or waits in line up to max_wait, or raises Refused."""
        blocker = self._admit(instance)
        if blocker is None:
            # Nobody queued could use this slot: _dispatch hands out every slot that frees.
            return Ticket(self, instance, 0.0)
        state = self.states[instance]
        if blocker is not None and (
            self.max_wait <= 0 or (self.max_waiting and len(self._queue) >= self.max_waiting)
        ):
            scope, in_use, limit = blocker
            reason = "full" if self.max_wait <= 0 else "queue-full"
            state.refused_total[reason] += 1
            raise Refused(
                instance=instance,
                reason=reason,
                scope=scope,
                in_use=in_use,
                limit=limit,
                waited=0.0,
                waiting=len(self._queue),
            )
        waiter = _Waiter(instance, asyncio.get_running_loop().create_future(), time.monotonic())
        self._queue.append(waiter)
        state.waiting += 1
        if self.counts.shared:
            self._schedule_poll()
        try:
            async with asyncio.timeout(self.max_wait):
                await waiter.future
        except TimeoutError:
            waited = time.monotonic() - waiter.since
            state.refused_total["full"] += 1
            state.wait_seconds_total += waited
            scope, in_use, limit = self._current_blocker(instance)
            raise Refused(
                instance=instance,
                reason="full",
                scope=scope,
                in_use=in_use,
                limit=limit,
                waited=waited,
            ) from None
        except asyncio.CancelledError:
            # The client left while waiting. If it was admitted in the same instant, give
            # the slot straight back.
            if waiter.future.done() and not waiter.future.cancelled():
                self._release(instance)
            raise
        finally:
            state.waiting -= 1
            if waiter in self._queue:
                self._queue.remove(waiter)
        waited = time.monotonic() - waiter.since
        state.wait_seconds_total += waited
        return Ticket(self, instance, waited)

    def _current_blocker(self, instance: str) -> Blocker:
        """_current_blocker describes the cap that is full now, for a refusal message."""
        limit = self.per_instance.get(instance, 0)
        if limit and self.states[instance].open >= limit:
            return "instance", self.states[instance].open, limit
        return "global", self.open, self.max_connections

    def _release(self, instance: str) -> None:
        self.counts.give_back(instance)
        self.states[instance].open -= 1
        self._dispatch()

    def _dispatch(self) -> None:
        """_dispatch hands free slots to the earliest waiters that fit."""
        blocked: set[str] = set()
        for waiter in list(self._queue):
            if waiter.future.done() or waiter.instance in blocked:
                continue
            if self._admit(waiter.instance) is not None:
                # Keep FIFO within an instance: later waiters for it stay behind this one.
                blocked.add(waiter.instance)
                continue
            self._queue.remove(waiter)
            waiter.future.set_result(None)

    def _schedule_poll(self) -> None:
        """_schedule_poll re-checks shared caps while clients wait: another worker process
        may free a slot, and only this process can hand it to its own waiters."""
        if self._poll is None:
            self._poll = asyncio.get_running_loop().call_later(self._poll_interval, self._polled)

    def _polled(self) -> None:
        self._poll = None
        self._dispatch()
        if self._queue:
            self._schedule_poll()

    def close(self) -> None:
        """close stops polling."""
        if self._poll is not None:
            self._poll.cancel()
            self._poll = None
