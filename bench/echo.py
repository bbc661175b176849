"""A TLS echo server standing in for an instance's server side (no PostgreSQL behind it).

``python -m bench.echo HOST PORT CERT KEY CA`` requires a client certificate signed by CA (as
Cloud SQL does) and echoes every byte back; without CERT it is a plaintext echo server.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import sys

import uvloop


class Echo(asyncio.Protocol):
    """Echo writes back what it reads, pausing while its write buffer is full."""

    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.set_write_buffer_limits(high=1 << 20)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()


async def serve(host: str, port: int, files: list[str]) -> None:
    """serve runs the echo server until killed."""
    context = None
    if files:
        cert, key, ca = files
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.load_cert_chain(cert, key)
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(ca)
        if os.environ.get("ECHO_NUM_TICKETS"):
            context.num_tickets = int(os.environ["ECHO_NUM_TICKETS"])
    server = await asyncio.get_running_loop().create_server(
        Echo, host, port, ssl=context, backlog=8192, reuse_address=True
    )
    print("ready", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve(sys.argv[1], int(sys.argv[2]), sys.argv[3:]))
