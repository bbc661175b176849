"""Several worker processes sharing the listening ports (SO_REUSEPORT), limits kept global.

One Python process relays on one core. With ``--workers N`` the CLI forks N workers before any
event loop exists; each binds every listener with SO_REUSEPORT, so the kernel spreads new
connections across them, and all of them count open sessions in one shared memory block, so
``--max-connections`` and ``?max-connections=`` hold across workers. Worker 0 serves the
health, metrics and admin endpoints. The parent forwards signals and waits.
"""

from __future__ import annotations

import contextlib
import mmap
import multiprocessing
import os
import signal
import socket
import struct
import sys
from collections.abc import Callable
from dataclasses import replace

from sqlproxy.config import Config, Instance
from sqlproxy.limits import Blocker

_SLOT = struct.Struct("q")


class SharedCounts:
    """SharedCounts are open-session counts in memory shared by the worker processes."""

    shared = True

    def __init__(self, instances: tuple[Instance, ...]) -> None:
        self._index = {
            name: i + 1 for i, name in enumerate(dict.fromkeys(inst.name for inst in instances))
        }
        # An anonymous MAP_SHARED mapping survives fork(): every worker sees the same bytes.
        self._memory = mmap.mmap(-1, _SLOT.size * (len(self._index) + 1))
        self._lock = multiprocessing.get_context("fork").Lock()

    def _get(self, slot: int) -> int:
        return int(_SLOT.unpack_from(self._memory, slot * _SLOT.size)[0])

    def _add(self, slot: int, delta: int) -> None:
        _SLOT.pack_into(self._memory, slot * _SLOT.size, self._get(slot) + delta)

    def take(self, instance: str, global_max: int, instance_max: int) -> Blocker | None:
        """take reserves a slot in every worker's view unless a cap is reached."""
        slot = self._index[instance]
        with self._lock:
            in_use, total = self._get(slot), self._get(0)
            if instance_max and in_use >= instance_max:
                return "instance", in_use, instance_max
            if global_max and total >= global_max:
                return "global", total, global_max
            self._add(slot, 1)
            self._add(0, 1)
        return None

    def give_back(self, instance: str) -> None:
        """give_back frees a slot taken by this worker."""
        slot = self._index[instance]
        with self._lock:
            self._add(slot, -1)
            self._add(0, -1)

    @property
    def total(self) -> int:
        """total is how many sessions are open across all workers."""
        return self._get(0)


def reserve_ports(config: Config) -> tuple[Config, list[socket.socket]]:
    """reserve_ports turns port 0 into concrete ports that every worker can bind.

    The returned sockets are bound with SO_REUSEPORT but never listen, so they hold the port
    without taking connections; close them once the workers listen.
    """
    held: list[socket.socket] = []
    instances = []
    for inst in config.instances:
        if inst.port == 0 and not inst.unix_path:
            family = socket.AF_INET6 if ":" in inst.address else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((inst.address, 0))
            held.append(sock)
            instances.append(replace(inst, port=sock.getsockname()[1]))
        else:
            instances.append(inst)
    return replace(config, instances=tuple(instances)), held


def supervise(workers: int, run_worker: Callable[[int], int]) -> int:
    """supervise forks the workers, forwards SIGTERM/SIGINT to them and returns an exit code.

    A worker that exits 1 (sessions still open at the deadline, or a startup error) makes the
    whole proxy exit 1; otherwise the code follows the signal, as with one process. SIGUSR1
    (sent by worker 0 on /quitquitquit) stops every worker and exits 0.
    """
    children: dict[int, int] = {}
    for index in range(workers):
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                code = run_worker(index)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = index
    reasons: list[int] = []

    def stop_all(signum: int) -> None:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def forward(signum: int, _frame: object) -> None:
        reasons.append(signum)
        stop_all(signal.SIGTERM if signum == signal.SIGUSR1 else signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(signum, forward)
    codes: list[int] = []
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if children.pop(pid, None) is None:
            continue
        codes.append(os.waitstatus_to_exitcode(status))
        if not reasons:
            # A worker stopped on its own (e.g. it cannot listen): stop the others too.
            reasons.append(0)
            stop_all(signal.SIGTERM)
    if 1 in codes or any(c < 0 for c in codes):
        return 1
    if reasons and reasons[0] == signal.SIGUSR1:
        return 0
    return max(codes, default=0)


def notify_quit() -> None:
    """notify_quit tells the supervising parent that /quitquitquit was called."""
    os.kill(os.getppid(), signal.SIGUSR1)
