"""PostgreSQL wire-protocol facts used before a session is relayed: first packets, errors."""

from __future__ import annotations

import struct
from dataclasses import dataclass

SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
PROTOCOL_3 = 196608
# PostgreSQL refuses startup packets larger than this (MAX_STARTUP_PACKET_LENGTH).
MAX_STARTUP_PACKET = 10000


class ProtocolError(ValueError):
    """ProtocolError is a first packet that is not valid PostgreSQL."""


@dataclass(frozen=True, slots=True)
class FirstPacket:
    """FirstPacket is a client's first message: its code, raw bytes and startup parameters."""

    code: int
    raw: bytes
    params: dict[str, str]

    @property
    def is_startup(self) -> bool:
        """is_startup is true for a protocol 3.x StartupMessage."""
        return self.code >> 16 == 3


def packet_length(header: bytes) -> int:
    """packet_length reads and checks the Int32 length that starts an untyped first packet."""
    (length,) = struct.unpack("!i", header[:4])
    if length < 8 or length > MAX_STARTUP_PACKET:
        raise ProtocolError(f"invalid startup packet length {length}")
    return int(length)


def parse_first_packet(raw: bytes) -> FirstPacket:
    """parse_first_packet decodes a complete first packet (length included)."""
    length = packet_length(raw)
    if len(raw) != length:
        raise ProtocolError("truncated startup packet")
    (code,) = struct.unpack("!i", raw[4:8])
    params: dict[str, str] = {}
    if code in (SSL_REQUEST, GSSENC_REQUEST):
        if length != 8:
            raise ProtocolError("invalid SSL or GSSENC request length")
    elif code == CANCEL_REQUEST:
        if length != 16:
            raise ProtocolError("invalid cancel request length")
    elif code >> 16 == 3:
        params = _parse_params(raw[8:])
        if "user" not in params:
            raise ProtocolError("no PostgreSQL user name specified in startup packet")
    else:
        raise ProtocolError(
            f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: "
            "server supports 3.0 to 3.0"
        )
    return FirstPacket(code=code, raw=raw, params=params)


def _parse_params(body: bytes) -> dict[str, str]:
    if not body.endswith(b"\x00"):
        raise ProtocolError("invalid startup packet layout: expected terminator as last byte")
    fields = body[:-1].split(b"\x00")
    if fields and fields[-1] == b"":
        fields.pop()
    if len(fields) % 2:
        raise ProtocolError("invalid startup packet layout: odd number of fields")
    try:
        return {fields[i].decode(): fields[i + 1].decode() for i in range(0, len(fields), 2)}
    except UnicodeDecodeError:
        raise ProtocolError("invalid startup packet: parameters are not UTF-8") from None


def startup_message(params: dict[str, str]) -> bytes:
    """startup_message encodes a protocol 3.0 StartupMessage."""
    body = b"".join(k.encode() + b"\x00" + v.encode() + b"\x00" for k, v in params.items())
    body += b"\x00"
    return struct.pack("!ii", 8 + len(body), PROTOCOL_3) + body


def error_response(
    sqlstate: str, message: str, *, hint: str | None = None, severity: str = "FATAL"
) -> bytes:
    """error_response encodes an ErrorResponse ('E') message."""
    fields = [(b"S", severity), (b"V", severity), (b"C", sqlstate), (b"M", message)]
    if hint:
        fields.append((b"H", hint))
    body = b"".join(tag + value.encode() + b"\x00" for tag, value in fields) + b"\x00"
    return b"E" + struct.pack("!i", 4 + len(body)) + body
