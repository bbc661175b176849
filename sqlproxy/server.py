"""The proxy server: one listener per instance, one relayed session per client connection."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlproxy import client_tls
from sqlproxy.config import Config, Instance
from sqlproxy.dialer import CloudSQLDialer, Dialer, load_credentials
from sqlproxy.limits import Admission
from sqlproxy.relay import Leg
from sqlproxy.session import Session

logger = logging.getLogger(__name__)

LISTEN_BACKLOG = 4096


@dataclass(frozen=True, slots=True)
class BoundAddress:
    """BoundAddress is where one instance's listener accepts connections."""

    instance: str
    host: str
    port: int


class ProxyServer:
    """ProxyServer owns the listeners, the open sessions and the tasks that dial for them."""

    def __init__(self, config: Config, dialer: Dialer) -> None:
        self.config = config
        self.dialer = dialer
        self.admission = Admission(
            max_connections=config.max_connections,
            per_instance={i.name: i.max_connections for i in config.instances},
            max_wait=config.max_wait,
            max_waiting=config.max_waiting,
        )
        self.client_tls = client_tls.server_context(config)
        self.cancels = 0
        self.sessions: dict[int, Session] = {}
        self.addresses: list[BoundAddress] = []
        self._servers: list[asyncio.AbstractServer] = []
        self._unix_paths: list[Path] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)
        self._idle = asyncio.Event()
        self._idle.set()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """spawn runs a coroutine as a task this server owns and cancels on close."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def start(self) -> None:
        """start binds every instance's listener; any failure closes those already bound."""
        try:
            for inst in self.config.instances:
                await self._listen(inst)
        except OSError as exc:
            await self.close()
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise OSError(f"cannot listen on {inst.listen}: {reason}") from None
        if self.config.idle_timeout:
            self.spawn(self._sweep_idle(self.config.idle_timeout))
        logger.info("the proxy has started successfully and is ready for new connections")

    async def _listen(self, inst: Instance) -> None:
        loop = asyncio.get_running_loop()

        def factory() -> Leg:
            return self._accept(inst)

        if inst.unix_path:
            path = Path(inst.unix_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_socket():
                path.unlink()  # left behind by a proxy that did not shut down cleanly
            server = await loop.create_unix_server(factory, str(path), backlog=LISTEN_BACKLOG)
            # As Google's proxy: any local user may connect; the database authenticates.
            path.chmod(0o777)
            self._unix_paths.append(path)
            self._servers.append(server)
            self.addresses.append(BoundAddress(inst.name, str(path), 0))
            logger.info("[%s] listening on %s", inst.name, path)
            return
        server = await loop.create_server(
            factory, inst.address, inst.port, backlog=LISTEN_BACKLOG, reuse_address=True
        )
        self._servers.append(server)
        for sock in server.sockets:
            host, port = sock.getsockname()[:2]
            self.addresses.append(BoundAddress(inst.name, host, port))
            logger.info("[%s] listening on %s", inst.name, _hostport(host, port))

    async def _sweep_idle(self, timeout: float) -> None:
        """_sweep_idle ends sessions that moved no bytes for --idle-timeout."""
        interval = min(max(timeout / 4, 0.05), 1.0)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for session in list(self.sessions.values()):
                if not session.relaying:
                    continue
                total = session.bytes_total
                if total != session.idle_mark:
                    session.idle_mark = total
                    session.idle_since = now
                elif now - session.idle_since >= timeout:
                    session.end_idle(now - session.idle_since)

    def _accept(self, instance: Instance) -> Leg:
        session = Session(self, next(self._ids), instance)
        self.sessions[session.id] = session
        self._idle.clear()
        return session.client

    def session_finished(self, session: Session) -> None:
        """session_finished drops a closed session from the registry."""
        self.sessions.pop(session.id, None)
        if not self.sessions:
            self._idle.set()

    async def wait_idle(self) -> None:
        """wait_idle returns once no session is open."""
        await self._idle.wait()

    async def close(self) -> None:
        """close stops listening, ends every session and stops the dialer."""
        for server in self._servers:
            server.close()
        for session in list(self.sessions.values()):
            session.abort("proxy shutting down")
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        for path in self._unix_paths:
            path.unlink(missing_ok=True)
        await self.dialer.close()


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@contextlib.asynccontextmanager
async def serve(config: Config, dialer: Dialer | None = None) -> AsyncIterator[ProxyServer]:
    """serve runs the proxy for the duration of an ``async with`` block.

    ``async with sqlproxy.serve(config) as proxy:`` binds every listener before the block
    starts (``proxy.addresses`` holds where) and closes everything when it ends.
    """
    if dialer is None:
        credentials = await asyncio.to_thread(load_credentials, config)
        cloud = CloudSQLDialer(config, credentials)
        await cloud.start(config.instances)
        dialer = cloud
    server = ProxyServer(config, dialer)
    try:
        await server.start()
        yield server
    finally:
        await server.close()
