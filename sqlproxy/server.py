"""The proxy server: one listener per instance, one relayed session per client connection."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlproxy import admin, client_tls
from sqlproxy.config import Config, ConfigError, Instance
from sqlproxy.dialer import CloudSQLDialer, Dialer, DialError, Generation, load_credentials
from sqlproxy.health import Health
from sqlproxy.limits import Admission, Counts
from sqlproxy.memory import HeapTrimmer
from sqlproxy.metrics import Metrics
from sqlproxy.relay import Leg, tune_socket
from sqlproxy.runner import EXIT_ERROR, Stop
from sqlproxy.session import Session
from sqlproxy.workers import notify_quit

logger = logging.getLogger(__name__)

LISTEN_BACKLOG = 4096


@dataclass(frozen=True, slots=True)
class BoundAddress:
    """BoundAddress is where one instance's listener accepts connections."""

    instance: str
    host: str
    port: int


@dataclass
class InstanceStats:
    """InstanceStats are one instance's running totals, read by metrics at scrape time."""

    accepted: int = 0
    # Front-door refusals by reason; admission refusals live in Admission.states.
    refused: collections.Counter[str] = field(default_factory=collections.Counter)
    dial_failures: collections.Counter[str] = field(default_factory=collections.Counter)
    cancels: int = 0
    # Bytes of sessions that have ended (live sessions are added at scrape time).
    bytes_to_instance: int = 0
    bytes_to_client: int = 0
    refresh_ok: int = 0
    refresh_failed: int = 0
    cert_expiry: float = 0.0


class ProxyServer:
    """ProxyServer owns the listeners, the open sessions and the tasks that dial for them."""

    def __init__(
        self,
        config: Config,
        dialer: Dialer,
        metrics: Metrics | None = None,
        *,
        counts: Counts | None = None,
        worker: int = 0,
    ) -> None:
        self.config = config
        self.worker = worker
        self.dialer = dialer
        self.metrics = metrics
        self.stats: collections.defaultdict[str, InstanceStats] = collections.defaultdict(
            InstanceStats
        )
        self.admission = Admission(
            max_connections=config.max_connections,
            per_instance={i.name: i.max_connections for i in config.instances},
            max_wait=config.max_wait,
            max_waiting=config.max_waiting,
            counts=counts,
        )
        self.client_tls = client_tls.server_context(config)
        self.heap = HeapTrimmer()
        self.sessions: dict[int, Session] = {}
        self.addresses: list[BoundAddress] = []
        self._servers: list[asyncio.AbstractServer] = []
        self._unix_paths: list[Path] = []
        self._tasks: set[asyncio.Task[None]] = set()
        # Connection ids stay unique across worker processes: 1, 1+N, 1+2N ... for worker 0.
        self._ids = itertools.count(1 + worker, config.workers)
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
            factory,
            inst.address,
            inst.port,
            backlog=LISTEN_BACKLOG,
            reuse_address=True,
            reuse_port=self.config.workers > 1,
        )
        self._servers.append(server)
        for sock in server.sockets:
            tune_socket(sock)
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
        self.stats[instance.name].accepted += 1
        session = Session(self, next(self._ids), instance)
        self.sessions[session.id] = session
        self._idle.clear()
        return session.client

    def on_refresh(self, name: str, gen: Generation | None, err: DialError | None) -> None:
        """on_refresh counts certificate refreshes and keeps the current expiry."""
        stats = self.stats[name]
        if gen is not None:
            stats.refresh_ok += 1
            stats.cert_expiry = gen.expires
        if err is not None:
            stats.refresh_failed += 1

    def live_bytes(self) -> dict[str, tuple[int, int]]:
        """live_bytes sums, per instance, what open sessions have relayed each way so far."""
        totals: dict[str, tuple[int, int]] = {}
        for session in self.sessions.values():
            up, down = totals.get(session.instance.name, (0, 0))
            totals[session.instance.name] = (
                up + session.client.nbytes,
                down + (session.upstream.nbytes if session.upstream else 0),
            )
        return totals

    def session_finished(self, session: Session) -> None:
        """session_finished drops a closed session from the registry and keeps its totals."""
        stats = self.stats[session.instance.name]
        stats.bytes_to_instance += session.client.nbytes
        stats.bytes_to_client += session.upstream.nbytes if session.upstream else 0
        self.sessions.pop(session.id, None)
        self.heap.session_closed()
        if not self.sessions:
            self._idle.set()

    async def wait_idle(self) -> None:
        """wait_idle returns once no session is open."""
        await self._idle.wait()

    async def stop_accepting(self) -> None:
        """stop_accepting closes the listeners; open sessions carry on."""
        for server in self._servers:
            server.close()
        for path in self._unix_paths:
            path.unlink(missing_ok=True)

    async def drain(self, timeout: float) -> int:
        """drain waits up to timeout for open sessions to end; returns how many remain."""
        if timeout > 0 and self.sessions:
            logger.info(
                "waiting up to %gs for %d open connection(s) to close", timeout, len(self.sessions)
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self.wait_idle()
        return len(self.sessions)

    async def connection_test(self) -> None:
        """connection_test dials every instance once (TLS handshake); raises ConfigError."""
        for inst in self.config.instances:
            leg = Leg("instance", lambda _leg, _exc: None)
            try:
                await self.dialer.dial(inst, lambda leg=leg: leg)  # type: ignore[misc]
            except DialError as err:
                raise ConfigError(f"connection test failed: [{inst.name}] {err}") from None
            leg.close()
            logger.info("[%s] connection test passed", inst.name)

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
        self.heap.close()
        self.admission.close()
        await self.dialer.close()


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@contextlib.asynccontextmanager
async def serve(
    config: Config,
    dialer: Dialer | None = None,
    metrics: Metrics | None = None,
    *,
    counts: Counts | None = None,
    worker: int = 0,
) -> AsyncIterator[ProxyServer]:
    """serve runs the proxy for the duration of an ``async with`` block.

    ``async with sqlproxy.serve(config) as proxy:`` binds every listener before the block
    starts (``proxy.addresses`` holds where) and closes everything when it ends.
    """
    cloud: CloudSQLDialer | None = None
    if dialer is None:
        credentials = await asyncio.to_thread(load_credentials, config)
        dialer = cloud = CloudSQLDialer(config, credentials)
    server = ProxyServer(config, dialer, metrics, counts=counts, worker=worker)
    if metrics is not None:
        metrics.bind(server)
    try:
        if cloud is not None:
            cloud.refresh_listener = server.on_refresh
            await cloud.start(config.instances)
        await server.start()
        yield server
    finally:
        await server.close()


def running_in_container() -> bool:
    """running_in_container guesses whether this process runs inside a container."""
    return (
        bool(os.environ.get("container"))  # noqa: SIM112 - podman and systemd-nspawn set it
        or bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
        or Path("/.dockerenv").exists()
        or Path("/run/.containerenv").exists()
    )


def _loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def warn_if_unreachable(config: Config) -> None:
    """warn_if_unreachable warns when, inside a container, listeners bind loopback only."""
    loopback = [i for i in config.instances if not i.unix_path and _loopback(i.address)]
    if loopback and running_in_container():
        logger.warning(
            "sqlproxy listens on %s inside a container: other containers (e.g. a Convex backend) "
            'cannot reach it and get "Connection refused (os error 111)"; use --address 0.0.0.0',
            ", ".join(i.listen for i in loopback),
        )


async def run(config: Config, stop: Stop, *, worker: int = 0, counts: Counts | None = None) -> int:
    """run serves until asked to stop, then shuts down in order; returns the exit code.

    1. keep accepting for --min-sigterm-delay; 2. report not ready and stop accepting;
    3. let open sessions finish for up to --max-sigterm-delay; 4. close what remains.
    With several workers, only worker 0 serves the HTTP endpoints.
    """
    metrics = Metrics(config.prometheus_namespace) if config.prometheus and worker == 0 else None
    async with serve(config, metrics=metrics, counts=counts, worker=worker) as proxy:
        health = Health(proxy.admission)
        endpoints = (
            await admin.start_endpoints(config, health, metrics, stop) if worker == 0 else []
        )
        try:
            if config.run_connection_test:
                await proxy.connection_test()
            health.started = True
            warn_if_unreachable(config)
            await stop.requested.wait()
            logger.info("received %s, shutting down", stop.reason)
            if config.workers > 1 and stop.reason == "quitquitquit":
                notify_quit()
            if config.min_sigterm_delay:
                logger.info("still accepting connections for %gs", config.min_sigterm_delay)
                await asyncio.sleep(config.min_sigterm_delay)
            health.shutting_down = True
            await proxy.stop_accepting()
            remaining = await proxy.drain(config.max_sigterm_delay)
        finally:
            for runner in endpoints:
                await runner.cleanup()
    if remaining and config.max_sigterm_delay > 0:
        logger.error(
            "%d connection(s) still open after waiting %gs; closed them",
            remaining,
            config.max_sigterm_delay,
        )
        return EXIT_ERROR
    return stop.exit_code(exit_zero_on_sigterm=config.exit_zero_on_sigterm)
