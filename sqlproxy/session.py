"""One client connection, from accept through the front door, admission and dial, to close."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import TYPE_CHECKING

from sqlproxy.config import Instance
from sqlproxy.dialer import DialError
from sqlproxy.frontdoor import negotiate
from sqlproxy.limits import Refused, Ticket
from sqlproxy.logs import fields
from sqlproxy.pgwire import CANCEL_REQUEST, FirstPacket, ProtocolError, error_response
from sqlproxy.relay import Leg, link, peer_name

if TYPE_CHECKING:
    from sqlproxy.server import ProxyServer

logger = logging.getLogger(__name__)

# SQLSTATEs sent to clients sqlproxy refuses.
PROTOCOL_VIOLATION = "08P01"
CANNOT_CONNECT = "08001"
TOO_MANY_CONNECTIONS = "53300"
INVALID_AUTHORIZATION = "28000"
IDLE_SESSION_TIMEOUT = "57P05"


class Session:
    """Session is one client connection relayed to one instance."""

    __slots__ = (
        "_server",
        "_task",
        "application",
        "client",
        "client_address",
        "database",
        "done",
        "ended_by",
        "id",
        "idle_mark",
        "idle_since",
        "instance",
        "reason",
        "started",
        "ticket",
        "tls",
        "upstream",
        "user",
    )

    def __init__(self, server: ProxyServer, session_id: int, instance: Instance) -> None:
        self._server = server
        self.id = session_id
        self.instance = instance
        self.started = time.monotonic()
        self.client = Leg("client", self._leg_lost, on_made=self._accepted)
        self.upstream: Leg | None = None
        self.client_address = "?"
        self.user = self.database = self.application = ""
        self.tls = False
        self.ended_by: str | None = None
        self.reason = ""
        self.done = False
        self.ticket: Ticket | None = None
        self._task: asyncio.Task[None] | None = None
        # Idle tracking without touching the hot path: the sweeper compares byte counts.
        self.idle_mark = -1
        self.idle_since = self.started

    @property
    def relaying(self) -> bool:
        """relaying is true once both legs are linked and bytes flow."""
        return self.upstream is not None and not self.done

    @property
    def bytes_total(self) -> int:
        """bytes_total is everything relayed so far, both ways."""
        return self.client.nbytes + (self.upstream.nbytes if self.upstream else 0)

    def _accepted(self, _leg: Leg) -> None:
        assert self.client.transport is not None
        self.client_address = peer_name(self.client.transport)
        self._task = self._server.spawn(self._run())

    async def _run(self) -> None:
        config = self._server.config
        try:
            async with asyncio.timeout(config.startup_timeout):
                opening = await negotiate(
                    self.client, self._server.client_tls, config.startup_timeout
                )
        except TimeoutError:
            self._count_refusal("startup-timeout")
            self._refuse(None, f"no startup packet within {config.startup_timeout:g}s")
            return
        except ProtocolError as exc:
            self._count_refusal("protocol-error")
            self._refuse(
                error_response(PROTOCOL_VIOLATION, f"sqlproxy: invalid startup packet: {exc}"),
                f"invalid startup packet: {exc}",
            )
            return
        except (ConnectionError, ssl.SSLError) as exc:
            self._end("client", f"gone during startup: {exc}")
            self.client.abort()
            return
        self.tls = opening.tls
        if opening.packet.code == CANCEL_REQUEST:
            await self._forward_cancel(opening.packet)
            return
        await self._open(opening.packet)

    async def _open(self, packet: FirstPacket) -> None:
        config = self._server.config
        name = self.instance.name
        self.user = packet.params.get("user", "")
        self.database = packet.params.get("database", self.user)
        self.application = packet.params.get("application_name", "")
        if logger.isEnabledFor(logging.INFO):
            logger.info(
                "[%s] conn %d opened from %s (user=%s database=%s application=%s tls=%s)",
                name,
                self.id,
                self.client_address,
                self.user,
                self.database,
                self.application or "-",
                "yes" if self.tls else "no",
                extra=self._fields(event="open"),
            )
        if config.client_tls_required and not self.tls:
            self._count_refusal("tls-required")
            self._refuse(
                error_response(
                    INVALID_AUTHORIZATION,
                    "sqlproxy: this proxy accepts TLS connections only",
                    hint="Connect with sslmode=require (or verify-full with the proxy's CA).",
                ),
                "plaintext refused (--client-tls-required)",
            )
            return
        metrics = self._server.metrics
        try:
            self.ticket = await self._server.admission.acquire(name)
        except Refused as refused:
            if metrics is not None:
                metrics.admission_wait.labels(name).observe(refused.waited)
            logger.warning(
                "[%s] conn %d refused: %s",
                name,
                self.id,
                refused.message,
                extra=self._fields(event="refused", reason=refused.reason),
            )
            self._refuse(
                error_response(TOO_MANY_CONNECTIONS, refused.message, hint=refused.hint),
                f"refused: {refused.reason}",
            )
            return
        if metrics is not None:
            metrics.admission_wait.labels(name).observe(self.ticket.waited)
        upstream = Leg("instance", self._leg_lost)
        dial_started = time.monotonic()
        try:
            await self._server.dialer.dial(self.instance, lambda: upstream)
        except DialError as err:
            self._server.stats[name].dial_failures[err.cause.value] += 1
            logger.error(
                "[%s] conn %d %s",
                name,
                self.id,
                err,
                extra=self._fields(event="dial-failed", cause=err.cause.value),
            )
            self._refuse(
                error_response(
                    CANNOT_CONNECT,
                    f"sqlproxy: cannot connect to instance {name}: {err.cause.value}: {err.detail}",
                    hint=err.hint,
                ),
                f"dial failed: {err.cause.value}",
            )
            return
        if metrics is not None:
            metrics.dial_latency.labels(name).observe(time.monotonic() - dial_started)
        if self.client.closed:
            upstream.close()
            return
        self.upstream = upstream
        upstream.write(packet.raw)
        dialer, instance, transport = self._server.dialer, self.instance, upstream.transport
        assert transport is not None
        link(self.client, upstream, lambda: dialer.remember_ticket(instance, transport))

    async def _forward_cancel(self, packet: FirstPacket) -> None:
        """_forward_cancel sends a CancelRequest over a fresh tunnel; it bypasses every limit."""
        name = self.instance.name
        self._server.stats[name].cancels += 1
        upstream = Leg("instance", lambda _leg, _exc: None)
        try:
            await self._server.dialer.dial(self.instance, lambda: upstream)
        except DialError as err:
            logger.error("[%s] conn %d cancel request not forwarded: %s", name, self.id, err)
            self._end("sqlproxy", f"cancel not forwarded: {err.cause.value}")
        else:
            upstream.write(packet.raw)
            upstream.close()
            logger.info(
                "[%s] conn %d cancel request from %s forwarded", name, self.id, self.client_address
            )
            self._end("sqlproxy", "cancel request forwarded")
        self.client.close()

    def _fields(self, **more: object) -> dict[str, object]:
        """_fields are this connection's structured log fields (JSON logs)."""
        return fields(
            connection_id=self.id,
            instance=self.instance.name,
            client_address=self.client_address,
            user=self.user or None,
            database=self.database or None,
            application_name=self.application or None,
            tls=self.tls,
            **more,
        )

    def _count_refusal(self, reason: str) -> None:
        self._server.stats[self.instance.name].refused[reason] += 1

    def _refuse(self, payload: bytes | None, reason: str) -> None:
        """_refuse answers the client (an ErrorResponse, when it can read one) and closes."""
        self._end("sqlproxy", reason)
        if payload:
            self.client.write(payload)
        self.client.close()

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
        if leg is self.client and self._task is not None and not self._task.done():
            self._task.cancel()
        if self.client.closed and (self.upstream is None or self.upstream.closed):
            self._finish()

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        self._task = None
        if self.ticket is not None:
            self.ticket.release()
        self._server.session_finished(self)
        if not logger.isEnabledFor(logging.INFO):
            return
        to_client = self.upstream.nbytes if self.upstream else 0
        duration = time.monotonic() - self.started
        logger.info(
            "[%s] conn %d closed by %s after %.3fs (%s): %d bytes from client, %d bytes to client",
            self.instance.name,
            self.id,
            self.ended_by or "sqlproxy",
            duration,
            self.reason or "closed",
            self.client.nbytes,
            to_client,
            extra=self._fields(
                event="close",
                closed_by=self.ended_by or "sqlproxy",
                close_reason=self.reason or "closed",
                bytes_from_client=self.client.nbytes,
                bytes_to_client=to_client,
                duration_seconds=round(duration, 6),
            ),
        )

    def end_idle(self, idle_for: float) -> None:
        """end_idle ends a session that moved no bytes for --idle-timeout (SQLSTATE 57P05)."""
        self._end("sqlproxy", f"idle for {idle_for:.1f}s")
        self.client.write(
            error_response(
                IDLE_SESSION_TIMEOUT,
                f"sqlproxy: terminating connection after {idle_for:.1f} s without traffic",
                hint="Raise --idle-timeout, or let the client pool close idle connections sooner.",
            )
        )
        self.client.close()
        if self.upstream is not None:
            self.upstream.close()

    def abort(self, reason: str) -> None:
        """abort ends the session at once from the proxy's side."""
        self._end("sqlproxy", reason)
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self.client.abort()
        if self.upstream is not None:
            self.upstream.abort()
