"""An emulated Cloud SQL instance: its CA, addresses, mTLS listeners on 3307, and faults."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import logging
import random
import socket
import ssl
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509

from sqlproxy.certs import Authority, key_pem, pem, server_context
from sqlproxy.config import SERVER_PROXY_PORT
from sqlproxy.emulator.postgres import PostgresTarget
from sqlproxy.pgwire import (
    CANCEL_REQUEST,
    GSSENC_REQUEST,
    SSL_REQUEST,
    ProtocolError,
    packet_length,
    parse_first_packet,
)

logger = logging.getLogger(__name__)

PIPE_CHUNK = 256 * 1024
LISTENER_MODES = ("up", "refused", "blackhole")


@dataclass
class Faults:
    """Faults are the failure switches of one instance; all off means healthy."""

    # Admin API answers 403 ACCESS_TOKEN_SCOPE_INSUFFICIENT for this instance.
    insufficient_scopes: bool = False
    # Admin API answers 404: the instance does not exist.
    not_found: bool = False
    # connectSettings lists no PRIVATE address.
    no_private_ip: bool = False
    # "up", "refused" (nothing listens on 3307) or "blackhole" (accepts, never answers).
    listener: str = "up"
    # Admin API answers 503 for this instance.
    admin_5xx: bool = False
    # Admin API waits this many seconds before answering.
    admin_delay: float = 0.0
    # The listener presents a server certificate from a CA the Admin API does not report,
    # so the client's TLS handshake fails (as after a server CA rotation gone wrong).
    wrong_server_ca: bool = False

    def update(self, changes: dict[str, Any]) -> None:
        """update applies {"name": value} changes, checking names and types."""
        for raw_key, raw_value in changes.items():
            key = raw_key.replace("-", "_")
            if key not in self.__dataclass_fields__:
                raise ValueError(f"unknown fault {raw_key!r}")
            current = getattr(self, key)
            value: Any = raw_value
            if isinstance(current, bool):
                if not isinstance(value, bool):
                    raise ValueError(f"fault {raw_key!r} takes true or false")
            elif isinstance(current, float):
                value = float(value)
            elif key == "listener" and value not in LISTENER_MODES:
                raise ValueError(f"listener must be one of {', '.join(LISTENER_MODES)}")
            setattr(self, key, value)


@dataclass(frozen=True, slots=True)
class IssuedCert:
    """IssuedCert is an ephemeral client certificate the Admin API signed."""

    serial: int
    subject: str
    identity: str
    iam_user: str | None
    expires: float


@dataclass(frozen=True, slots=True)
class ConnectionRecord:
    """ConnectionRecord is one connection the instance's server side accepted on 3307."""

    instance: str
    ip_type: str
    address: str
    client_subject: str
    client_serial: int
    iam_user: str | None
    user: str | None
    database: str | None
    time: float
    accepted: bool = True
    error: str = ""
    # True when the client resumed an earlier TLS session (no certificate exchange).
    resumed: bool = False

    def to_json(self) -> dict[str, Any]:
        """to_json is the record as a JSON-ready dict (serials as strings)."""
        data = asdict(self)
        data["client_serial"] = str(self.client_serial)
        return data


def _random_loopback() -> str:
    # 127.0.0.0/8 all routes to loopback; stay clear of 127.0.0.x where most things live.
    return f"127.{random.randint(64, 254)}.{random.randint(0, 255)}.{random.randint(2, 254)}"  # noqa: S311


def _bind_3307(ip: str | None) -> tuple[str, socket.socket]:
    """_bind_3307 binds ip:3307, or a free random loopback address when ip is None."""
    for _ in range(200):
        addr = ip or _random_loopback()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Rebinding after a "refused" fault must work while old connections sit in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((addr, SERVER_PROXY_PORT))
            sock.listen(1024)
        except OSError:
            sock.close()
            if ip is not None:
                raise
            continue
        sock.setblocking(False)
        return addr, sock
    raise OSError(f"no free loopback address for port {SERVER_PROXY_PORT}")


@dataclass
class InstanceSettings:
    """InstanceSettings describe one emulated instance before it starts."""

    connection_name: str
    # None: the PostgreSQL server's own major version (POSTGRES_15 for a 15.x server).
    database_version: str | None = None
    primary_ip: str | None = None
    private_ip: str | None = None
    psc: bool = True
    psc_ip: str | None = None
    # Addresses clients are told to dial, when they differ from where we bind (containers).
    advertise: dict[str, str] = field(default_factory=dict)
    # False: something else (stunnel, a benchmark's echo server) serves the addresses with
    # this instance's certificates (see write_server_files); the emulator binds nothing.
    serve: bool = True


class EmulatedInstance:
    """EmulatedInstance is one Cloud SQL for PostgreSQL instance served on loopback."""

    def __init__(self, settings: InstanceSettings, postgres: PostgresTarget) -> None:
        project, region, name = settings.connection_name.rsplit(":", 2)
        self.connection_name = settings.connection_name
        self.project = project
        self.region = region
        self.name = name
        self.database_version = settings.database_version or "POSTGRES_15"
        self.settings = settings
        self.postgres = postgres
        self.faults = Faults()
        self.authority = Authority.create(f"Google Cloud SQL Server CA {name}")
        self._server_key, self._server_cert = self.authority.server_identity(f"{project}:{name}")
        self._ssl = server_context(
            self.authority, self._server_key, self._server_cert, require_client_cert=True
        )
        rogue = Authority.create("Unexpected CA")
        rogue_key, rogue_cert = rogue.server_identity(f"{project}:{name}")
        self._rogue_ssl = server_context(rogue, rogue_key, rogue_cert, require_client_cert=False)
        self.addresses: dict[str, str] = {}
        self._sockets: dict[str, socket.socket] = {}
        self._servers: dict[str, asyncio.Server] = {}
        self.records: list[ConnectionRecord] = []
        self.issued: dict[int, IssuedCert] = {}
        self._held: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def ca_pem(self) -> str:
        """ca_pem is the instance's server CA certificate."""
        return pem(self.authority.cert)

    def advertised(self, ip_type: str) -> str:
        """advertised is the address the Admin API reports for an address type."""
        return self.settings.advertise.get(ip_type, self.addresses[ip_type])

    def write_server_files(self, directory: Path) -> tuple[Path, Path, Path]:
        """write_server_files writes the server certificate chain, its key and the CA, for an
        external server standing in for this instance's listener."""
        directory.mkdir(parents=True, exist_ok=True)
        cert, key, ca = directory / "server.pem", directory / "server.key", directory / "ca.pem"
        cert.write_text(pem(self._server_cert) + pem(self.authority.cert))
        key.write_bytes(key_pem(self._server_key))
        key.chmod(0o600)
        ca.write_text(self.ca_pem)
        return cert, key, ca

    async def start(self) -> None:
        """start binds a 3307 listener on each of the instance's addresses."""
        wanted = {"PRIMARY": self.settings.primary_ip, "PRIVATE": self.settings.private_ip}
        if self.settings.psc:
            wanted["PSC"] = self.settings.psc_ip
        if not self.settings.serve:
            self.addresses = {t: ip for t, ip in wanted.items() if ip is not None}
            return
        for ip_type, ip in wanted.items():
            if ip is not None and ip in self._sockets:
                # Several address types on one address (e.g. a container's only IP).
                self.addresses[ip_type] = ip
                continue
            addr, sock = _bind_3307(ip)
            self.addresses[ip_type] = addr
            self._sockets[addr] = sock
        await self._listen()

    def _types_at(self, addr: str) -> str:
        return "/".join(t for t, a in self.addresses.items() if a == addr)

    async def _listen(self) -> None:
        for addr in dict.fromkeys(self.addresses.values()):
            if addr in self._servers:
                continue
            sock = self._sockets.pop(addr, None)
            if sock is None:
                _, sock = _bind_3307(addr)
            self._servers[addr] = await asyncio.start_server(
                functools.partial(self._handle, ip_type=self._types_at(addr)), sock=sock
            )

    async def set_faults(self, changes: dict[str, Any]) -> None:
        """set_faults switches faults; "refused" closes the listeners, "up" reopens them."""
        self.faults.update(changes)
        if self.faults.listener == "refused":
            for server in self._servers.values():
                server.close()
            for server in self._servers.values():
                await server.wait_closed()
            self._servers.clear()
        else:
            await self._listen()
        if self.faults.listener != "blackhole":
            for writer in list(self._held):
                writer.close()

    def issue_cert(
        self, public_key: Any, identity: str, iam_user: str | None, not_after: float
    ) -> x509.Certificate:
        """issue_cert signs an ephemeral client certificate and remembers who it is for."""
        cert = self.authority.issue(
            public_key,
            identity,
            not_after=datetime.datetime.fromtimestamp(not_after, datetime.UTC),
            server=False,
        )
        self.issued[cert.serial_number] = IssuedCert(
            serial=cert.serial_number,
            subject=cert.subject.rfc4514_string(),
            identity=identity,
            iam_user=iam_user,
            expires=not_after,
        )
        return cert

    async def _handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ip_type: str
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer, ip_type)
        except (OSError, asyncio.IncompleteReadError, ProtocolError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ip_type: str
    ) -> None:
        if self.faults.listener == "blackhole":
            # Accept the TCP connection, then never answer: the client's TLS handshake hangs.
            self._held.add(writer)
            try:
                await reader.read()
            finally:
                self._held.discard(writer)
            return
        address = writer.get_extra_info("sockname")[0]
        try:
            await writer.start_tls(self._rogue_ssl if self.faults.wrong_server_ca else self._ssl)
        except (ssl.SSLError, OSError) as exc:
            self._record(ip_type, address, None, None, accepted=False, error=str(exc))
            return
        sslobj = writer.get_extra_info("ssl_object")
        resumed = bool(sslobj.session_reused)
        der = sslobj.getpeercert(binary_form=True)
        cert = x509.load_der_x509_certificate(der)
        issued = self.issued.get(cert.serial_number)
        first = await self._first_startup(reader, writer)
        if first is None:
            return
        startup, code = first
        if code == CANCEL_REQUEST:
            self._record(ip_type, address, cert, issued, resumed=resumed)
            up_reader, up_writer = await asyncio.open_connection(
                self.postgres.host, self.postgres.port
            )
            up_writer.write(startup)
            await up_writer.drain()
            up_writer.close()
            return
        packet = parse_first_packet(startup)
        user = packet.params.get("user")
        self._record(
            ip_type,
            address,
            cert,
            issued,
            user=user,
            database=packet.params.get("database"),
            resumed=resumed,
        )
        iam = issued is not None and issued.iam_user is not None and issued.iam_user == user
        if iam and self.postgres.socket_dir:
            # Cloud SQL lets an IAM principal in on the token inside its certificate; the
            # emulator's stand-in is PostgreSQL's trusted local socket.
            up_reader, up_writer = await asyncio.open_unix_connection(
                f"{self.postgres.socket_dir}/.s.PGSQL.{self.postgres.port}"
            )
        else:
            up_reader, up_writer = await asyncio.open_connection(
                self.postgres.host, self.postgres.port
            )
        up_writer.write(startup)
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            up_writer.close()

    async def _first_startup(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[bytes, int] | None:
        """_first_startup answers SSL/GSSENC requests with 'N' and returns the next packet."""
        while True:
            header = await reader.readexactly(8)
            length = packet_length(header)
            raw = header + await reader.readexactly(length - 8)
            code = int.from_bytes(raw[4:8], "big")
            if code in (SSL_REQUEST, GSSENC_REQUEST):
                writer.write(b"N")
                await writer.drain()
                continue
            return raw, code

    def _record(
        self,
        ip_type: str,
        address: str,
        cert: x509.Certificate | None,
        issued: IssuedCert | None,
        *,
        user: str | None = None,
        database: str | None = None,
        accepted: bool = True,
        error: str = "",
        resumed: bool = False,
    ) -> None:
        self.records.append(
            ConnectionRecord(
                instance=self.connection_name,
                ip_type=ip_type,
                address=address,
                client_subject=cert.subject.rfc4514_string() if cert else "",
                client_serial=cert.serial_number if cert else 0,
                iam_user=issued.iam_user if issued else None,
                user=user,
                database=database,
                time=time.time(),
                accepted=accepted,
                error=error,
                resumed=resumed,
            )
        )

    async def stop(self) -> None:
        """stop closes the listeners and every open connection."""
        for server in self._servers.values():
            server.close()
        for writer in list(self._held):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for server in self._servers.values():
            await server.wait_closed()
        self._servers.clear()
        for sock in self._sockets.values():
            sock.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(PIPE_CHUNK):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()
