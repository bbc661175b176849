"""The dialer: the only user of the Cloud SQL connector; it opens mutual-TLS tunnels.

For each instance it keeps the current certificate generation (connection info from the
Admin API plus one SSL context built from it), refreshes it ahead of expiry (or lazily with
``--lazy-refresh``), forces a refresh after a failed dial with backoff, and turns every
failure into a :class:`DialError` whose cause names what went wrong and how to fix it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import json
import logging
import socket
import ssl
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import aiohttp
import google.auth
import google.auth.exceptions
import google.oauth2.credentials
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.auth.credentials import Credentials, TokenState
from google.auth.transport.requests import Request
from google.cloud.sql.connector.client import CloudSQLClient
from google.cloud.sql.connector.connection_info import ConnectionInfo
from google.cloud.sql.connector.connection_name import _parse_connection_name
from google.cloud.sql.connector.enums import IPTypes
from google.cloud.sql.connector.exceptions import CloudSQLIPTypeError
from google.oauth2 import service_account

from sqlproxy import __version__
from sqlproxy.config import SERVER_PROXY_PORT, Config, ConfigError, Instance, IPType
from sqlproxy.relay import tune_socket

logger = logging.getLogger(__name__)

SQLADMIN_SCOPE = "https://www.googleapis.com/auth/sqlservice.admin"
# A token with any one of these may call the Admin API.
ADMIN_API_SCOPES = frozenset(
    {
        "https://www.googleapis.com/auth/cloud-platform",
        SQLADMIN_SCOPE,
        "https://www.googleapis.com/auth/sqlservice",
    }
)
# A refresh that gets no answer at all is abandoned after this long (the connector's HTTP
# client would otherwise wait 300 s).
REFRESH_TIMEOUT = 60.0
# Backoff after failed refreshes and failed dials: 1 s, 2 s, 4 s ... up to 60 s, so a dead
# instance or a wrong permission cannot hammer the Admin API.
BACKOFF_BASE = 1.0
BACKOFF_MAX = 60.0
# Lazy mode refreshes this long before expiry (the connector's buffer), or at half the
# lifetime for short-lived certificates.
LAZY_REFRESH_BUFFER = 240.0

P = TypeVar("P", bound=asyncio.BaseProtocol)


class DialCause(enum.Enum):
    """DialCause is why a dial failed; its value is the short name used in logs and metrics."""

    INSUFFICIENT_SCOPES = "insufficient-scopes"
    PERMISSION_DENIED = "permission-denied"
    INVALID_CREDENTIALS = "invalid-credentials"
    INSTANCE_NOT_FOUND = "instance-not-found"
    REGION_MISMATCH = "region-mismatch"
    NO_ADDRESS = "no-address-of-type"
    NOT_POSTGRES = "not-postgres"
    ADMIN_API = "admin-api-error"
    REFUSED = "connection-refused"
    TIMEOUT = "timeout"
    UNREACHABLE = "unreachable"
    TLS = "tls-error"


class DialError(Exception):
    """DialError is a failed dial: the instance, the cause, and a message safe to show anyone."""

    def __init__(self, instance: str, cause: DialCause, detail: str, hint: str) -> None:
        super().__init__(f"failed to connect to instance: {cause.value}: {detail}")
        self.instance = instance
        self.cause = cause
        self.detail = detail
        self.hint = hint


class Dialer(Protocol):
    """Dialer opens one TLS connection to an instance's server-side proxy per call."""

    async def dial(self, instance: Instance, protocol_factory: Callable[[], P]) -> P:
        """dial connects protocol_factory() to the instance or raises DialError."""
        ...

    def remember_ticket(self, instance: Instance, transport: asyncio.BaseTransport) -> None:
        """remember_ticket keeps a tunnel's TLS session ticket for resumption (once the tunnel
        has received data, which carries the ticket)."""
        ...

    async def close(self) -> None:
        """close stops background refreshes and releases HTTP sessions."""
        ...


def load_credentials(config: Config) -> Credentials:
    """load_credentials finds credentials as Google's proxy does: token, file, or ADC.

    It may block (Application Default Credentials probe the metadata server): call it from
    a worker thread.
    """
    scopes = [SQLADMIN_SCOPE]
    creds: Any
    try:
        if config.token:
            creds = google.oauth2.credentials.Credentials(token=config.token)  # type: ignore[no-untyped-call]
        elif config.credentials_file:
            creds = _credentials_from_file(config.credentials_file, scopes)
        else:
            creds, _ = google.auth.default(scopes=scopes)
    except google.auth.exceptions.DefaultCredentialsError as exc:
        raise ConfigError(
            f"no application default credentials: {_first_line(exc)} "
            "(on a VM, check its service account; elsewhere run "
            "`gcloud auth application-default login` or pass --credentials-file)"
        ) from None
    if config.universe_domain and creds.universe_domain != config.universe_domain:
        raise ConfigError(
            f"--universe-domain {config.universe_domain} does not match the credentials' "
            f"universe domain {creds.universe_domain}"
        )
    assert isinstance(creds, Credentials)
    return creds


def _credentials_from_file(path: str, scopes: list[str]) -> Any:
    """_credentials_from_file loads a key file the operator named explicitly."""
    try:
        info = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read --credentials-file {path}: {exc.strerror}") from None
    except ValueError:
        raise ConfigError(f"--credentials-file {path} is not a JSON key file") from None
    kind = info.get("type") if isinstance(info, dict) else None
    try:
        if kind == "service_account":
            return service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
                info, scopes=scopes
            )
        if kind == "authorized_user":
            return google.oauth2.credentials.Credentials.from_authorized_user_info(  # type: ignore[no-untyped-call]
                info, scopes=scopes
            )
        with warnings.catch_warnings():
            # The file was named by the operator on the command line, so it is trusted; the
            # warning is about files from untrusted sources.
            warnings.simplefilter("ignore", DeprecationWarning)
            creds, _ = google.auth.load_credentials_from_file(  # type: ignore[no-untyped-call]
                path, scopes=scopes
            )
    except (ValueError, KeyError, google.auth.exceptions.GoogleAuthError) as exc:
        raise ConfigError(f"--credentials-file {path}: {_first_line(exc)}") from None
    return creds


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _generate_keys() -> tuple[bytes, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private, public


def backoff(failures: int) -> float:
    """backoff is the wait after the given number of consecutive failures."""
    if failures <= 0:
        return 0.0
    return float(min(BACKOFF_MAX, BACKOFF_BASE * 2 ** (failures - 1)))


@dataclass(frozen=True, slots=True)
class Generation:
    """Generation is one certificate generation: connection info and its SSL context."""

    number: int
    info: ConnectionInfo
    context: ssl.SSLContext
    issued: float
    expires: float
    tickets: Tickets

    @property
    def lifetime(self) -> float:
        """lifetime is how long the certificate was valid for when it was fetched."""
        return self.expires - self.issued


class Tickets:
    """Tickets lets one certificate generation resume TLS 1.3 sessions with the instance.

    The context offers the latest session ticket the instance sent (as haproxy does by
    default), so a new tunnel skips the client certificate's signature and the certificate
    checks: a fraction of a full handshake's CPU on both sides. A ticket belongs to its
    context, so a new certificate generation starts afresh.
    """

    __slots__ = ("resumed", "session")

    def __init__(self, context: ssl.SSLContext) -> None:
        self.session: ssl.SSLSession | None = None
        self.resumed = 0
        wrap_bio = context.wrap_bio

        def wrap_with_ticket(
            incoming: ssl.MemoryBIO,
            outgoing: ssl.MemoryBIO,
            server_side: bool = False,
            server_hostname: str | bytes | None = None,
            session: ssl.SSLSession | None = None,
        ) -> ssl.SSLObject:
            return wrap_bio(
                incoming, outgoing, server_side, server_hostname, session=session or self.session
            )

        # asyncio and uvloop both create their SSLObject through context.wrap_bio.
        context.wrap_bio = wrap_with_ticket  # type: ignore[method-assign]

    def remember(self, transport: asyncio.BaseTransport) -> None:
        """remember keeps the ticket of a tunnel that has received data (so has its ticket)."""
        sslobj = transport.get_extra_info("ssl_object")
        if sslobj is None:
            return
        if sslobj.session_reused:
            # Keep the ticket we resumed with: a session taken from a resumed connection
            # keeps its predecessors alive in OpenSSL, so memory would grow with every tunnel.
            # When the instance stops accepting it, a full handshake brings a fresh one.
            self.resumed += 1
            return
        session = sslobj.session
        if session is not None and session.has_ticket:
            self.session = session


def hint_for(cause: DialCause, instance: str, *, ip_type: IPType, address: str = "") -> str:
    """hint_for says what to do about a failed dial, with the gcloud command where one exists."""
    project, _, rest = instance.rpartition(":")
    project, _, _region = project.rpartition(":")
    name = rest
    target = f"{address}:{SERVER_PROXY_PORT}" if address else f"port {SERVER_PROXY_PORT}"
    if cause is DialCause.INSUFFICIENT_SCOPES:
        return (
            "The access token lacks the Cloud SQL OAuth scope. On a Compute Engine VM, give its "
            "service account the cloud-platform (or sqlservice.admin) scope: gcloud compute "
            "instances stop VM --zone ZONE && gcloud compute instances set-service-account VM "
            "--zone ZONE --scopes=cloud-platform && gcloud compute instances start VM --zone ZONE"
        )
    if cause is DialCause.PERMISSION_DENIED:
        return (
            "The identity may not use this instance. Grant it the Cloud SQL Client role: "
            f"gcloud projects add-iam-policy-binding {project} "
            "--member=serviceAccount:SA_EMAIL --role=roles/cloudsql.client"
        )
    if cause is DialCause.INVALID_CREDENTIALS:
        return (
            "The credentials were rejected or could not produce a token. Check --credentials-file "
            "or --token, or run `gcloud auth application-default login`."
        )
    if cause is DialCause.INSTANCE_NOT_FOUND:
        return (
            f'No instance "{name}" in project "{project}". Check the connection name: '
            "gcloud sql instances list --format='value(connectionName)'"
        )
    if cause is DialCause.REGION_MISMATCH:
        return (
            "The region in the connection name is wrong. Copy the exact name: "
            f"gcloud sql instances describe {name} --project {project} "
            "--format='value(connectionName)'"
        )
    if cause is DialCause.NO_ADDRESS and ip_type is IPType.PRIVATE:
        return (
            "The instance has no private IP. Set up private services access (VPC peering) and "
            "add one: gcloud compute addresses create google-managed-services-default --global "
            "--purpose=VPC_PEERING --prefix-length=16 --network=default && gcloud services "
            "vpc-peerings connect --service=servicenetworking.googleapis.com "
            "--ranges=google-managed-services-default --network=default && gcloud sql instances "
            f"patch {name} --project {project} --network=default; or drop --private-ip."
        )
    if cause is DialCause.NO_ADDRESS and ip_type is IPType.PSC:
        return (
            "Private Service Connect is not enabled on the instance, or it has no PSC DNS name; "
            "enable PSC or drop --psc."
        )
    if cause is DialCause.NO_ADDRESS:
        return (
            "The instance has no public IP. Use --private-ip from inside its VPC, or add a "
            f"public IP: gcloud sql instances patch {name} --project {project} --assign-ip"
        )
    if cause is DialCause.NOT_POSTGRES:
        return "sqlproxy serves Cloud SQL for PostgreSQL instances only."
    if cause is DialCause.ADMIN_API:
        return (
            "The Cloud SQL Admin API failed or could not be reached; sqlproxy retries with "
            "backoff. Check it is enabled: gcloud services enable sqladmin.googleapis.com"
        )
    if cause is DialCause.REFUSED:
        return (
            f"Nothing accepted the connection on {target}. Check the instance is running "
            f"(gcloud sql instances describe {name} --project {project} --format='value(state)') "
            "and that the address type is right (--private-ip inside the VPC)."
        )
    if cause is DialCause.TIMEOUT:
        return (
            f"No answer from {target} in time. A firewall or a missing VPC route drops TCP "
            "3307: allow egress to the instance on port 3307, and with --private-ip run "
            "sqlproxy inside the peered VPC."
        )
    if cause is DialCause.UNREACHABLE:
        return (
            f"{target} is unreachable from this host. With --private-ip, sqlproxy must run in "
            "the instance's VPC (or a peered one)."
        )
    return (
        "The TLS handshake with the instance failed. sqlproxy fetches a new ephemeral "
        "certificate and retries on the next connection; check the host clock (`date -u`)."
    )


def _classify(exc: BaseException) -> tuple[DialCause, str]:
    """_classify maps connector, HTTP, auth and socket errors to a cause and a safe detail."""
    if isinstance(exc, aiohttp.ClientResponseError):
        detail = f"Admin API answered {exc.status} {exc.message}"
        if exc.status == 403 and "scope" in exc.message.lower():
            return DialCause.INSUFFICIENT_SCOPES, detail
        if exc.status == 403:
            return DialCause.PERMISSION_DENIED, detail
        if exc.status == 401:
            return DialCause.INVALID_CREDENTIALS, detail
        if exc.status == 404:
            return DialCause.INSTANCE_NOT_FOUND, detail
        return DialCause.ADMIN_API, detail
    if isinstance(exc, aiohttp.ClientError):
        return DialCause.ADMIN_API, f"Admin API unreachable: {_first_line(exc)}"
    if isinstance(exc, google.auth.exceptions.GoogleAuthError):
        return DialCause.INVALID_CREDENTIALS, f"could not get an access token: {_first_line(exc)}"
    if isinstance(exc, CloudSQLIPTypeError):
        return DialCause.NO_ADDRESS, _first_line(exc)
    if isinstance(exc, ValueError) and "region was mismatched" in str(exc):
        return DialCause.REGION_MISMATCH, _first_line(exc).split("]: ", 1)[-1]
    if isinstance(exc, ConnectionRefusedError):
        return DialCause.REFUSED, "connection refused"
    if isinstance(exc, ssl.SSLError):
        return DialCause.TLS, f"TLS handshake failed: {exc.reason or _first_line(exc)}"
    if isinstance(exc, TimeoutError):
        return DialCause.TIMEOUT, "timed out"
    if isinstance(exc, OSError):
        return DialCause.UNREACHABLE, exc.strerror or _first_line(exc)
    return DialCause.ADMIN_API, f"{type(exc).__name__}: {_first_line(exc)}"


class _InstanceCache:
    """_InstanceCache holds one instance's current certificate generation and refreshes it."""

    def __init__(self, dialer: CloudSQLDialer, instance: Instance) -> None:
        self._dialer = dialer
        self._instance = instance
        self._conn_name = _parse_connection_name(instance.name)
        self._gen: Generation | None = None
        self._refreshing: asyncio.Task[Generation] | None = None
        self._forced = False
        self._timer: asyncio.TimerHandle | None = None
        self._refresh_failures = 0
        self._retry_at = 0.0
        self._last_error: DialError | None = None
        self._dial_failures = 0
        self._force_allowed_at = 0.0
        self._closed = False

    @property
    def generation(self) -> Generation | None:
        """generation is the current certificate generation, if one was fetched."""
        return self._gen

    async def get(self) -> Generation:
        """get returns a usable generation, refreshing first when there is none."""
        gen = self._gen
        if gen is not None and not self._forced and self._usable(gen):
            return gen
        if self._refreshing is None:
            if self._last_error is not None and time.monotonic() < self._retry_at:
                if gen is not None and gen.expires > time.time():
                    return gen
                raise self._last_error
            self._start_refresh()
        assert self._refreshing is not None
        return await asyncio.shield(self._refreshing)

    def _usable(self, gen: Generation) -> bool:
        now = time.time()
        if self._dialer.lazy:
            return now < gen.expires - min(LAZY_REFRESH_BUFFER, gen.lifetime / 2)
        return now < gen.expires

    def dial_failed(self) -> None:
        """dial_failed forces a refresh (new certificate and addresses), with backoff."""
        self._dial_failures += 1
        now = time.monotonic()
        if now < self._force_allowed_at or self._closed:
            return
        self._force_allowed_at = now + backoff(self._dial_failures)
        self._forced = True
        if self._refreshing is None:
            self._start_refresh()

    def dial_succeeded(self) -> None:
        """dial_succeeded resets the forced-refresh backoff."""
        self._dial_failures = 0
        self._force_allowed_at = 0.0

    def _start_refresh(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task = asyncio.get_running_loop().create_task(self._refresh())
        self._refreshing = task
        task.add_done_callback(self._refresh_done)

    def _refresh_done(self, task: asyncio.Task[Generation]) -> None:
        self._refreshing = None
        self._forced = False
        if not task.cancelled():
            # Retrieve the exception so asyncio does not log "never retrieved".
            task.exception()

    async def _refresh(self) -> Generation:
        name = self._instance.name
        try:
            async with asyncio.timeout(REFRESH_TIMEOUT):
                info = await self._dialer.fetch(self._conn_name, self._instance.auto_iam_authn)
                if not str(info.database_version).startswith("POSTGRES"):
                    raise DialError(
                        name,
                        DialCause.NOT_POSTGRES,
                        f"instance runs {info.database_version}",
                        hint_for(DialCause.NOT_POSTGRES, name, ip_type=self._instance.ip_type),
                    )
                context = await info.create_ssl_context(self._instance.auto_iam_authn)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            err = exc if isinstance(exc, DialError) else self._dialer.error(self._instance, exc)
            self._refresh_failures += 1
            wait = backoff(self._refresh_failures)
            self._retry_at = time.monotonic() + wait
            self._last_error = err
            logger.error(
                "[%s] certificate refresh failed (retry in %.0fs): %s: %s",
                name,
                wait,
                err.cause.value,
                err.detail,
            )
            self._dialer.refresh_listener(name, None, err)
            self._schedule(wait)
            raise err from None
        number = self._gen.number + 1 if self._gen else 1
        expires = info.expiration.timestamp()
        gen = Generation(number, info, context, time.time(), expires, Tickets(context))
        self._gen = gen
        self._refresh_failures = 0
        self._last_error = None
        logger.debug(
            "[%s] certificate generation %d fetched, valid for %.0fs", name, number, gen.lifetime
        )
        self._dialer.refresh_listener(name, gen, None)
        self._schedule(max(gen.lifetime / 2, 0.5))
        return gen

    def _schedule(self, delay: float) -> None:
        """_schedule plans the next background refresh (none in lazy mode)."""
        if self._dialer.lazy or self._closed:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(delay, self._timer_fired)

    def _timer_fired(self) -> None:
        self._timer = None
        if self._refreshing is None and not self._closed:
            self._start_refresh()

    async def close(self) -> None:
        """close stops the refresh timer and any refresh in flight."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        task = self._refreshing
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


RefreshListener = Callable[[str, Generation | None, DialError | None], None]


def _ignore_refresh(_name: str, _gen: Generation | None, _err: DialError | None) -> None:
    return None


class CloudSQLDialer:
    """CloudSQLDialer dials Cloud SQL instances with certificates from the Admin API."""

    def __init__(
        self,
        config: Config,
        credentials: Credentials,
        *,
        refresh_listener: RefreshListener = _ignore_refresh,
    ) -> None:
        self._config = config
        self._credentials = credentials
        self._timeout = config.dial_timeout
        self.lazy = config.lazy_refresh
        self.refresh_listener = refresh_listener
        self._caches: dict[tuple[str, bool], _InstanceCache] = {}
        self._client: CloudSQLClient | None = None
        self._keys: asyncio.Task[tuple[bytes, str]] | None = None
        self._token_lock = asyncio.Lock()

    async def start(self, instances: tuple[Instance, ...]) -> None:
        """start creates the HTTP client and key pair; without lazy refresh it prefetches."""
        self._client = CloudSQLClient(
            self._config.admin_api_endpoint,
            self._config.quota_project,
            self._credentials,
            user_agent=f"sqlproxy/{__version__}",
        )
        self._keys = asyncio.get_running_loop().create_task(asyncio.to_thread(_generate_keys))
        if not self.lazy:
            for inst in instances:
                self._cache(inst)._start_refresh()

    def _cache(self, instance: Instance) -> _InstanceCache:
        key = (instance.name, instance.auto_iam_authn)
        cache = self._caches.get(key)
        if cache is None:
            cache = self._caches[key] = _InstanceCache(self, instance)
        return cache

    def generation(self, instance: Instance) -> Generation | None:
        """generation is the instance's current certificate generation, if any."""
        cache = self._caches.get((instance.name, instance.auto_iam_authn))
        return cache.generation if cache else None

    def remember_ticket(self, instance: Instance, transport: asyncio.BaseTransport) -> None:
        """remember_ticket keeps the tunnel's session ticket in the current generation."""
        gen = self.generation(instance)
        if gen is not None and transport.get_extra_info("sslcontext") is gen.context:
            gen.tickets.remember(transport)

    async def fetch(self, conn_name: Any, enable_iam_auth: bool) -> ConnectionInfo:
        """fetch asks the Admin API for metadata and an ephemeral certificate."""
        assert self._client is not None and self._keys is not None, "start() first"
        await self._fresh_token()
        info: ConnectionInfo = await self._client.get_connection_info(
            conn_name, self._keys, enable_iam_auth
        )
        return info

    async def _fresh_token(self) -> None:
        # The connector refreshes credentials synchronously on the event loop; doing it here
        # in a worker thread first keeps every relayed session moving meanwhile.
        async with self._token_lock:
            if self._credentials.token_state != TokenState.FRESH:
                await asyncio.to_thread(self._credentials.refresh, Request())

    def error(self, instance: Instance, exc: BaseException, address: str = "") -> DialError:
        """error turns any failure into a DialError with cause, detail and hint."""
        cause, detail = _classify(exc)
        if address and cause in (
            DialCause.REFUSED,
            DialCause.TIMEOUT,
            DialCause.UNREACHABLE,
            DialCause.TLS,
        ):
            detail = f"{detail} ({address}:{SERVER_PROXY_PORT})"
        return DialError(
            instance.name,
            cause,
            detail,
            hint_for(cause, instance.name, ip_type=instance.ip_type, address=address),
        )

    async def dial(self, instance: Instance, protocol_factory: Callable[[], P]) -> P:
        """dial opens TCP then TLS to the instance's address on port 3307, within the timeout."""
        cache = self._cache(instance)
        address = ""
        stage = "connecting"
        try:
            async with asyncio.timeout(self._timeout):
                gen = await cache.get()
                hosts = gen.info.get_preferred_ips(IPTypes(instance.ip_type.value))
                address = hosts[0]
                sock = await self._connect_tcp(address)
                stage = "in the TLS handshake"
                loop = asyncio.get_running_loop()
                try:
                    _, protocol = await loop.create_connection(
                        protocol_factory,
                        sock=sock,
                        ssl=gen.context,
                        server_hostname=address,
                        ssl_handshake_timeout=self._timeout,
                    )
                except BaseException:
                    sock.close()
                    raise
        except DialError:
            raise
        except TimeoutError:
            if not address:
                # Still waiting for the Admin API: a 3307 hint would send people the wrong way.
                raise DialError(
                    instance.name,
                    DialCause.ADMIN_API,
                    f"the Admin API did not answer within {self._timeout:g}s",
                    hint_for(DialCause.ADMIN_API, instance.name, ip_type=instance.ip_type),
                ) from None
            cache.dial_failed()
            raise DialError(
                instance.name,
                DialCause.TIMEOUT,
                f"timed out after {self._timeout:g}s {stage} ({address}:{SERVER_PROXY_PORT})",
                hint_for(
                    DialCause.TIMEOUT, instance.name, ip_type=instance.ip_type, address=address
                ),
            ) from None
        except (OSError, CloudSQLIPTypeError) as exc:
            cache.dial_failed()
            raise self.error(instance, exc, address) from None
        cache.dial_succeeded()
        return protocol

    async def _connect_tcp(self, host: str) -> socket.socket:
        loop = asyncio.get_running_loop()
        targets: list[tuple[int, Any]]
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:  # a PSC DNS name
            infos = await loop.getaddrinfo(host, SERVER_PROXY_PORT, type=socket.SOCK_STREAM)
            targets = [(family, addr) for family, _, _, _, addr in infos]
        else:  # an IP literal: no resolver round trip
            targets = [
                (socket.AF_INET6 if ip.version == 6 else socket.AF_INET, (host, SERVER_PROXY_PORT))
            ]
        last: OSError = OSError(f"no address for {host}")
        for family, addr in targets:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setblocking(False)
            tune_socket(sock)
            try:
                await loop.sock_connect(sock, addr)
            except OSError as exc:
                sock.close()
                last = exc
                continue
            except BaseException:
                sock.close()
                raise
            return sock
        raise last

    async def close(self) -> None:
        """close stops every refresh and closes the Admin API client."""
        await asyncio.gather(*(c.close() for c in self._caches.values()))
        if self._keys is not None:
            self._keys.cancel()
            with contextlib.suppress(BaseException):
                await self._keys
        if self._client is not None:
            await self._client.close()
