"""The emulator: Cloud SQL instances, Admin API, credentials and PostgreSQL, started together."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import shutil
import tempfile
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
from aiohttp import web

from sqlproxy.emulator.auth import (
    CLOUD_PLATFORM,
    DEFAULT_TOKEN_TTL,
    ServiceAccount,
    TokenStore,
)
from sqlproxy.emulator.http import AdminCall, make_app
from sqlproxy.emulator.instance import EmulatedInstance, InstanceSettings
from sqlproxy.emulator.postgres import LocalPostgres, PostgresTarget

logger = logging.getLogger(__name__)

DEFAULT_PROJECT = "sqlproxy-demo"
DEFAULT_INSTANCE = f"{DEFAULT_PROJECT}:us-central1:demo"
DEFAULT_CERT_TTL = 3600.0

T = TypeVar("T")


@dataclass
class VirtualMachine:
    """VirtualMachine is the emulated GCE VM whose metadata server sqlproxy may use."""

    project: str = DEFAULT_PROJECT
    email: str = "123456789012-compute@developer.gserviceaccount.com"
    scopes: tuple[str, ...] = (CLOUD_PLATFORM,)
    name: str = "convex-vm"
    zone: str = "us-central1-a"


@dataclass
class EmulatorSettings:
    """EmulatorSettings configure an Emulator; the defaults give one healthy instance."""

    instances: Sequence[InstanceSettings] = field(
        default_factory=lambda: [InstanceSettings(DEFAULT_INSTANCE)]
    )
    host: str = "127.0.0.1"
    port: int = 0
    # Use this PostgreSQL instead of starting one (postgresql://user:pass@host:port).
    postgres: PostgresTarget | None = None
    postgres_listen: str = "127.0.0.1"
    postgres_max_connections: int = 300
    # Superuser password of the started PostgreSQL (random when None).
    postgres_password: str | None = None
    # Databases to create at start (Convex needs convex_self_hosted to exist).
    databases: tuple[str, ...] = ()
    cert_ttl: float = DEFAULT_CERT_TTL
    token_ttl: float = DEFAULT_TOKEN_TTL
    vm_scopes: tuple[str, ...] = (CLOUD_PLATFORM,)
    state_dir: Path | None = None
    # Address written into URLs (key file token_uri, Admin API) when it differs from host.
    public_host: str | None = None


class Emulator:
    """Emulator stands in for Google Cloud: Admin API, OAuth, metadata server and instances."""

    def __init__(self, settings: EmulatorSettings | None = None) -> None:
        self.settings = settings or EmulatorSettings()
        self.tokens = TokenStore()
        self.tokens_default_scope = CLOUD_PLATFORM
        project = (
            self.settings.instances[0].connection_name.rsplit(":", 2)[0]
            if (self.settings.instances)
            else DEFAULT_PROJECT
        )
        self.account = ServiceAccount(
            email=f"sqlproxy@{project.split(':')[-1]}.iam.gserviceaccount.com", project=project
        )
        self.tokens.add_account(self.account)
        self.vm = VirtualMachine(project=project, scopes=tuple(self.settings.vm_scopes))
        self.instances: dict[str, EmulatedInstance] = {}
        self.admin_calls: list[AdminCall] = []
        self.iam_logins: list[str] = []
        self.cert_ttl = self.settings.cert_ttl
        self.token_ttl = self.settings.token_ttl
        self.postgres: PostgresTarget | None = None
        self._local_pg: LocalPostgres | None = None
        self._runner: web.AppRunner | None = None
        self._port = 0
        self._state_dir: Path | None = None
        self._own_state_dir = False

    # -- addresses ------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """port is the HTTP port of the Admin API, token endpoint and metadata server."""
        return self._port

    @property
    def url(self) -> str:
        """url is the Admin API endpoint to pass as --sqladmin-api-endpoint."""
        return f"http://{self.settings.public_host or self.settings.host}:{self._port}"

    @property
    def token_uri(self) -> str:
        """token_uri is the OAuth token endpoint named in the key files."""
        return f"{self.url}/token"

    @property
    def metadata_host(self) -> str:
        """metadata_host is the value for GCE_METADATA_HOST and GCE_METADATA_IP."""
        return f"{self.settings.public_host or self.settings.host}:{self._port}"

    @property
    def key_file(self) -> Path:
        """key_file is the emulated service account's JSON key (for --credentials-file)."""
        assert self._state_dir is not None, "start() first"
        return self._state_dir / "key.json"

    @property
    def user_credentials_file(self) -> Path:
        """user_credentials_file is a gcloud-style authorized-user ADC file."""
        assert self._state_dir is not None, "start() first"
        return self._state_dir / "user-adc.json"

    def find_instance(self, project: str, name: str) -> EmulatedInstance | None:
        """find_instance looks an instance up by project and name (the region is not in the URL)."""
        for inst in self.instances.values():
            if inst.project == project and inst.name == name:
                return inst
        return None

    def instance(self, connection_name: str) -> EmulatedInstance:
        """instance returns an emulated instance by its connection name."""
        return self.instances[connection_name]

    def mint_token(
        self,
        scopes: Sequence[str] = (CLOUD_PLATFORM,),
        ttl: float | None = None,
        email: str | None = None,
    ) -> str:
        """mint_token issues an access token usable with --token."""
        token, _ = self.tokens.mint(
            email or self.account.email, set(scopes), self.token_ttl if ttl is None else ttl
        )
        return token

    def proxy_args(self, *instances: str) -> list[str]:
        """proxy_args is the sqlproxy command line for these instances (all by default)."""
        return [
            "--sqladmin-api-endpoint",
            self.url,
            "--credentials-file",
            str(self.key_file),
            *(instances or list(self.instances)),
        ]

    def describe(self) -> dict[str, Any]:
        """describe is a JSON-ready summary: endpoints, files, instances and their faults."""
        return {
            "admin_api": self.url,
            "token_uri": self.token_uri,
            "metadata_host": self.metadata_host,
            "credentials_file": str(self.key_file),
            "service_account": self.account.email,
            "iam_user": self.account.iam_user,
            "vm": {"email": self.vm.email, "scopes": list(self.vm.scopes)},
            "instances": {
                name: {
                    "addresses": dict(inst.addresses),
                    "database_version": inst.database_version,
                    "faults": vars(inst.faults),
                }
                for name, inst in self.instances.items()
            },
        }

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """start brings up PostgreSQL (unless given), the instances and the HTTP server."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        settings = self.settings
        if settings.state_dir is None:
            self._state_dir = Path(tempfile.mkdtemp(prefix="sqlproxy-emulator-"))
            self._own_state_dir = True
        else:
            self._state_dir = settings.state_dir
            self._state_dir.mkdir(parents=True, exist_ok=True)
        if settings.postgres is None:
            self._local_pg = LocalPostgres(
                listen=settings.postgres_listen,
                max_connections=settings.postgres_max_connections,
                password=settings.postgres_password,
            )
            self.postgres = await asyncio.to_thread(self._local_pg.start)
        else:
            self.postgres = settings.postgres
        version = await self._prepare_database()
        for inst_settings in settings.instances:
            if inst_settings.database_version is None:
                inst_settings.database_version = version
            inst = EmulatedInstance(inst_settings, self.postgres)
            self.instances[inst.connection_name] = inst
            await inst.start()
        self._runner = web.AppRunner(make_app(self), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, settings.host, settings.port, reuse_address=True)
        await site.start()
        self._port = int(self._runner.addresses[0][1])
        self._write_files()

    def _write_files(self) -> None:
        assert self._state_dir is not None
        for path, text in (
            (self.key_file, self.account.key_file(self.token_uri)),
            (
                self.user_credentials_file,
                self.tokens.authorized_user_file("developer@example.com", self.token_uri),
            ),
        ):
            path.write_text(text)
            path.chmod(0o600)

    async def _prepare_database(self) -> str:
        """_prepare_database reads the server version and adds the IAM database users.

        The users are what `gcloud sql users create --type=cloud_iam_service_account` makes.
        """
        assert self.postgres is not None
        pg = self.postgres
        try:
            conn = await asyncpg.connect(
                host=pg.host,
                port=pg.port,
                user=pg.user,
                password=pg.password,
                database="postgres",
                ssl=False,
            )
        except (OSError, asyncpg.PostgresError) as exc:
            logger.warning("emulator: cannot reach PostgreSQL to add IAM users: %s", exc)
            return "POSTGRES_15"
        try:
            version_num = int(await conn.fetchval("SHOW server_version_num"))
            for email in (self.account.email, self.vm.email):
                role = email.removesuffix(".gserviceaccount.com").replace('"', '""')
                exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role)
                if not exists:
                    await conn.execute(f'CREATE ROLE "{role}" LOGIN')
                await conn.execute(f'GRANT pg_read_all_data, pg_write_all_data TO "{role}"')
            for database in self.settings.databases:
                if not await conn.fetchval(
                    "SELECT 1 FROM pg_database WHERE datname = $1", database
                ):
                    await conn.execute(f'CREATE DATABASE "{database.replace(chr(34), "")}"')
        finally:
            await conn.close()
        return f"POSTGRES_{version_num // 10000}"

    async def stop(self) -> None:
        """stop closes everything start opened, including the temporary PostgreSQL."""
        for inst in self.instances.values():
            await inst.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._local_pg is not None:
            await asyncio.to_thread(self._local_pg.stop)
            self._local_pg = None
        if self._own_state_dir and self._state_dir is not None:
            shutil.rmtree(self._state_dir, ignore_errors=True)


class EmulatorThread:
    """EmulatorThread runs an Emulator on its own event loop in a background thread.

    Tests, the demo and the benchmarks use it so that the emulator keeps serving while the
    caller's own loop (or a blocking call) is busy.
    """

    def __init__(self, settings: EmulatorSettings | None = None) -> None:
        self.emulator = Emulator(settings)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="emulator", daemon=True)

    def start(self) -> Emulator:
        """start runs the emulator and returns it once it serves."""
        self._thread.start()
        self.call(self.emulator.start)
        return self.emulator

    def call(self, fn: Callable[[], Awaitable[T]], timeout: float = 120) -> T:
        """call runs an emulator coroutine on the emulator's loop and waits for its result."""

        async def wrapper() -> T:
            return await fn()

        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(
            wrapper(), self._loop
        )
        return future.result(timeout)

    def set_faults(self, connection_name: str, **changes: Any) -> None:
        """set_faults switches faults of one instance from any thread."""
        inst = self.emulator.instance(connection_name)
        self.call(lambda: inst.set_faults(changes))

    def stop(self) -> None:
        """stop stops the emulator and its loop."""
        try:
            self.call(self.emulator.stop)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()
