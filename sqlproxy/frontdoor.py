"""The front door: a client's first packets, answered before any dial."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from sqlproxy.pgwire import (
    GSSENC_REQUEST,
    SSL_REQUEST,
    FirstPacket,
    ProtocolError,
    packet_length,
    parse_first_packet,
)
from sqlproxy.relay import Leg


@dataclass(frozen=True, slots=True)
class Opening:
    """Opening is what a client asked for: its StartupMessage or CancelRequest, and whether
    the session runs over TLS to sqlproxy."""

    packet: FirstPacket
    tls: bool


async def negotiate(client: Leg, tls: ssl.SSLContext | None, tls_timeout: float) -> Opening:
    """negotiate answers SSLRequest ('S' and TLS, or 'N') and GSSENCRequest ('N') as a
    PostgreSQL server does, and returns the client's StartupMessage or CancelRequest.

    Raises ProtocolError for anything that is not PostgreSQL, and ConnectionError when the
    client goes away.
    """
    encrypted = ssl_done = gss_done = False
    while True:
        header = await client.read_exactly(4)
        length = packet_length(header)
        packet = parse_first_packet(header + await client.read_exactly(length - 4))
        if packet.code == SSL_REQUEST:
            if ssl_done:
                raise ProtocolError("SSL request received twice")
            ssl_done = True
            if tls is None:
                client.write(b"N")
                continue
            if client.has_pending:
                # Bytes sent before our 'S' would be trusted as if encrypted (CVE-2021-23214).
                raise ProtocolError("received unencrypted data after SSL request")
            client.write(b"S")
            await client.start_tls(tls, tls_timeout)
            encrypted = True
            continue
        if packet.code == GSSENC_REQUEST:
            if gss_done:
                raise ProtocolError("GSSENC request received twice")
            gss_done = True
            client.write(b"N")
            continue
        return Opening(packet, encrypted)
