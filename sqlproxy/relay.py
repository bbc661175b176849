"""The relay: a pair of asyncio Protocols that move bytes both ways with back-pressure."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from typing import Any, cast

# Bytes a leg buffers from its own side before its peer is connected (the client's startup
# packet, typically a few hundred bytes); above this it stops reading until the link is up.
PENDING_LIMIT = 64 * 1024
# Write buffer high-water mark: above it the *other* side stops reading until this drains.
WRITE_HIGH_WATER = 512 * 1024
KEEPALIVE_SECONDS = 30


def tune_socket(sock: Any) -> None:
    """tune_socket turns on TCP_NODELAY and 30 s keepalive, as Google's proxy does.

    Applied to listening sockets (accepted ones inherit the options, saving four system
    calls per connection) and to each instance socket before it connects.
    """
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_SECONDS)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_SECONDS)
    except OSError:
        # The peer may already be gone; the relay notices that on its own.
        pass


def _ignore_lost(_leg: Leg, _exc: Exception | None) -> None:
    return None


class Leg(asyncio.Protocol):
    """Leg is one side of a relayed connection: what it reads is written to its peer.

    Back-pressure runs across the pair: when this leg's transport reports that its write
    buffer is full (``pause_writing``), the peer stops reading, and resumes when it drains.
    """

    __slots__ = (
        "_forward",
        "_on_lost",
        "_on_made",
        "_pending",
        "_waiter",
        "closed",
        "nbytes",
        "peer",
        "side",
        "transport",
    )

    def __init__(
        self,
        side: str,
        on_lost: Callable[[Leg, Exception | None], None],
        on_made: Callable[[Leg], None] | None = None,
    ) -> None:
        self.side = side
        self.transport: asyncio.Transport | None = None
        self.peer: Leg | None = None
        self.nbytes = 0
        self.closed = False
        self._on_lost = on_lost
        self._on_made = on_made
        self._pending = bytearray()
        self._forward: Callable[[bytes], None] | None = None
        self._waiter: asyncio.Future[None] | None = None

    # -- asyncio callbacks --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but implement it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        if self._on_made is not None:
            self._on_made(self)

    def data_received(self, data: bytes) -> None:
        self.nbytes += len(data)
        forward = self._forward
        if forward is not None:
            forward(data)
            return
        self._pending += data
        self._wake()
        if len(self._pending) > PENDING_LIMIT and self.transport is not None:
            self.transport.pause_reading()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def eof_received(self) -> bool:
        # No half-close (as Google's proxy): an EOF from either side ends the session.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._forward = None
        self._wake()
        on_lost, self._on_lost = self._on_lost, _ignore_lost
        on_lost(self, exc)
        # Break the cycles (leg <-> transport, leg <-> peer, leg <-> session) so reference
        # counting frees the TLS state now: objects of long-lived connections sit in the
        # oldest GC generation, which CPython collects rarely.
        self._on_made = None
        self.peer = None
        self.transport = None

    def pause_writing(self) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.pause_reading()

    def resume_writing(self) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.closed:
            peer.transport.resume_reading()

    # -- used by the front door, before the link ---------------------------------------

    async def read_exactly(self, n: int) -> bytes:
        """read_exactly returns the next n bytes the peer sent, or raises ConnectionError."""
        while len(self._pending) < n:
            if self.closed:
                raise ConnectionResetError("the client closed the connection")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = bytes(self._pending[:n])
        del self._pending[:n]
        return data

    @property
    def has_pending(self) -> bool:
        """has_pending is true when bytes arrived that nothing has read yet."""
        return bool(self._pending)

    def write(self, data: bytes) -> None:
        """write sends bytes to this leg's peer (front-door answers and errors)."""
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    async def start_tls(self, context: ssl.SSLContext, timeout: float) -> None:
        """start_tls upgrades this (server-side) leg to TLS; later reads are decrypted."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        transport = await loop.start_tls(
            self.transport, self, context, server_side=True, ssl_handshake_timeout=timeout
        )
        if transport is None:
            raise ConnectionResetError("the client closed the connection during TLS")
        self.transport = transport
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    # -- used by the session ------------------------------------------------------------

    def take_pending(self) -> bytes:
        """take_pending returns and clears what arrived before the link was made."""
        data = bytes(self._pending)
        self._pending.clear()
        return data

    def close(self) -> None:
        """close closes this leg after its buffered writes are flushed."""
        if self.transport is not None and not self.closed:
            self.transport.close()

    def abort(self) -> None:
        """abort closes this leg at once, dropping buffered writes."""
        if self.transport is not None and not self.closed:
            self.transport.abort()


def link(a: Leg, b: Leg, on_first_from_b: Callable[[], None] | None = None) -> None:
    """link joins two connected legs so bytes flow both ways; pending bytes go first.

    on_first_from_b runs once, when b first delivers data (so the hot path pays nothing).
    """
    assert a.transport is not None
    assert b.transport is not None
    a.peer, b.peer = b, a
    for src, dst in ((a, b), (b, a)):
        assert dst.transport is not None
        early = src.take_pending()
        if early:
            dst.transport.write(early)
        src._forward = dst.transport.write
    if on_first_from_b is not None:
        write = b._forward
        assert write is not None

        def first(data: bytes) -> None:
            b._forward = write
            write(data)
            on_first_from_b()

        b._forward = first
    for leg in (a, b):
        assert leg.transport is not None
        if not leg.closed and not leg.transport.is_closing():
            leg.transport.resume_reading()


def peer_name(transport: asyncio.BaseTransport) -> str:
    """peer_name formats the remote address of a transport for log lines."""
    peer: Any = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = f"[{peer[0]}]" if ":" in str(peer[0]) else str(peer[0])
        return f"{host}:{peer[1]}"
    return str(peer) if peer else "unix-socket"
