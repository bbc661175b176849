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
from typing import Any

from sqlproxy.config import Config, Instance
from sqlproxy.dialer import CloudSQLDialer, Dialer, DialError, load_credentials
from sqlproxy.relay import Leg, link, peer_name

logger = logging.getLogger(__name__)

LISTEN_BACKLOG = 4096


@dataclass(frozen=True, slots=True)
class BoundAddress:
    """BoundAddress is where one instance's listener accepts connections."""

    instance: str
    host: str
    port: int


class Session:
    """Session is one client connection relayed to one instance, from accept to close."""

    __slots__ = (
        "_dial_task",
        "_server",
        "client",
        "client_address",
        "done",
        "ended_by",
        "id",
        "instance",
        "reason",
        "started",
        "upstream",
    )

    def __init__(self, server: ProxyServer, session_id: int, instance: Instance) -> None:
        self._server = server
        self.id = session_id
        self.instance = instance
        self.started = time.monotonic()
        self.client = Leg("client", self._leg_lost, on_made=self._accepted)
        self.upstream: Leg | None = None
        self.client_address = "?"
        self.ended_by: str | None = None
        self.reason = ""
        self.done = False
        self._dial_task: asyncio.Task[None] | None = None

    def _accepted(self, _leg: Leg) -> None:
        """_accepted logs the new connection and starts dialling the instance."""
        assert self.client.transport is not None
        self.client_address = peer_name(self.client.transport)
        logger.info(
            "[%s] conn %d accepted from %s", self.instance.name, self.id, self.client_address
        )
        self._dial_task = self._server.spawn(self._connect())

    async def _connect(self) -> None:
        upstream = Leg("instance", self._leg_lost)
        try:
            await self._server.dialer.dial(self.instance, lambda: upstream)
        except DialError as err:
            logger.error("[%s] conn %d %s", self.instance.name, self.id, err)
            self._end("sqlproxy", f"dial failed: {err.cause.value}")
            self.client.abort()
            return
        if self.client.closed:
            # The client left while we were dialling.
            upstream.close()
            return
        self.upstream = upstream
        link(self.client, upstream)

    def _end(self, by: str, reason: str) -> None:
        if self.ended_by is None:
            self.ended_by = by
            self.reason = reason

    def _leg_lost(self, leg: Leg, exc: Exception | None) -> None:
        reason = f"{type(exc).__name__}: {exc}" if exc else "closed"
        self._end(leg.side, reason)
        other = self.upstream if leg is self.client else self.client
        if other is not None:
            other.close()
        if leg is self.client and self._dial_task is not None and not self._dial_task.done():
            self._dial_task.cancel()
        if self.client.closed and (self.upstream is None or self.upstream.closed):
            self._finish()

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        duration = time.monotonic() - self.started
        to_client = self.upstream.nbytes if self.upstream else 0
        logger.info(
            "[%s] conn %d closed by %s after %.3fs (%s): %d bytes from client, %d bytes to client",
            self.instance.name,
            self.id,
            self.ended_by or "sqlproxy",
            duration,
            self.reason or "closed",
            self.client.nbytes,
            to_client,
        )
        self._server.session_finished(self)

    def abort(self, reason: str) -> None:
        """abort ends the session at once from the proxy's side."""
        self._end("sqlproxy", reason)
        if self._dial_task is not None and not self._dial_task.done():
            self._dial_task.cancel()
        self.client.abort()
        if self.upstream is not None:
            self.upstream.abort()


class ProxyServer:
    """ProxyServer owns the listeners, the open sessions and the tasks that dial for them."""

    def __init__(self, config: Config, dialer: Dialer) -> None:
        self.config = config
        self.dialer = dialer
        self.sessions: dict[int, Session] = {}
        self.addresses: list[BoundAddress] = []
        self._servers: list[asyncio.Server] = []
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
        loop = asyncio.get_running_loop()
        try:
            for inst in self.config.instances:
                server = await loop.create_server(
                    lambda inst=inst: self._accept(inst),  # type: ignore[misc]
                    inst.address,
                    inst.port,
                    backlog=LISTEN_BACKLOG,
                    reuse_address=True,
                )
                self._servers.append(server)
                for sock in server.sockets:
                    host, port = sock.getsockname()[:2]
                    self.addresses.append(BoundAddress(inst.name, host, port))
                    logger.info("[%s] listening on %s", inst.name, _hostport(host, port))
        except OSError as exc:
            await self.close()
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise OSError(f"cannot listen on {inst.listen}: {reason}") from None
        logger.info("the proxy has started successfully and is ready for new connections")

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
