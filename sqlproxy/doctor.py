"""`sqlproxy doctor`: find the classic failures between a host and a Cloud SQL instance.

Each step prints OK, FAIL or SKIP with its evidence and, on failure, the fix (the exact gcloud
command where one exists). Steps that depend on a failed one are skipped, not guessed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import os
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
import click
import google.auth.exceptions
from google.auth import compute_engine
from google.auth.transport.requests import Request

from sqlproxy.config import (
    DEFAULT_ADDRESS,
    DEFAULT_POSTGRES_PORT,
    SERVER_PROXY_PORT,
    Config,
    ConfigError,
    Instance,
    InstanceArg,
    IPType,
    resolve_instances,
)
from sqlproxy.configfile import env_names, instances_from_env
from sqlproxy.dialer import (
    ADMIN_API_SCOPES,
    CloudSQLDialer,
    DialCause,
    DialError,
    hint_for,
    load_credentials,
)
from sqlproxy.pgwire import SSL_REQUEST
from sqlproxy.relay import Leg
from sqlproxy.server import ProxyServer, running_in_container

OK, FAIL, SKIP = "OK", "FAIL", "SKIP"
DEFAULT_STEP_TIMEOUT = 10.0


@dataclass
class Step:
    """Step is one check's outcome: a name, a status, what was seen, and how to fix it."""

    name: str
    status: str
    evidence: str
    fix: str = ""


@dataclass
class Findings:
    """Findings carry what earlier steps learned to the later ones."""

    credentials: Any = None
    token: str = ""
    instance_json: dict[str, Any] = field(default_factory=dict)
    settings_json: dict[str, Any] = field(default_factory=dict)
    address: str = ""


class Doctor:
    """Doctor runs the checks for one instance in order and collects their steps."""

    def __init__(
        self,
        config: Config,
        *,
        user: str | None,
        password: str | None,
        database: str | None,
        local_address: str,
        local_port: int,
        timeout: float,
    ) -> None:
        self.config = config
        self.instance = config.instances[0]
        self.user = user
        self.password = password
        self.database = database
        self.local_address = local_address
        self.local_port = local_port
        self.timeout = timeout
        self.found = Findings()
        self.steps: list[Step] = []

    @property
    def project(self) -> str:
        """project is the instance's project (domain-scoped projects keep their domain)."""
        return self.instance.name.rsplit(":", 2)[0]

    @property
    def short_name(self) -> str:
        """short_name is the instance name without project and region."""
        return self.instance.name.rsplit(":", 1)[1]

    def _hint(self, cause: DialCause) -> str:
        return hint_for(
            cause, self.instance.name, ip_type=self.instance.ip_type, address=self.found.address
        )

    async def run(self) -> list[Step]:
        """run performs every step; a step whose prerequisite failed is skipped."""
        checks: list[tuple[str, Callable[[], Awaitable[Step]], tuple[str, ...]]] = [
            ("credentials", self.check_credentials, ()),
            ("oauth-scopes", self.check_scopes, ("credentials",)),
            ("admin-api", self.check_admin_api, ("credentials",)),
            ("address", self.check_address, ("admin-api",)),
            ("tcp-3307", self.check_tcp, ("address",)),
            ("tls", self.check_tls, ("tcp-3307",)),
            ("postgres-login", self.check_login, ("tls",)),
            ("local-port", self.check_local_port, ()),
            ("bind-address", self.check_bind_address, ()),
        ]
        status: dict[str, str] = {}
        for name, check, needs in checks:
            failed = [n for n in needs if status.get(n) != OK]
            if failed:
                step = Step(name, SKIP, f"skipped: {failed[0]} did not pass")
            else:
                try:
                    step = await check()
                except Exception as exc:
                    step = Step(name, FAIL, f"unexpected error: {type(exc).__name__}: {exc}")
            status[name] = step.status
            self.steps.append(step)
        return self.steps

    # -- remote side ----------------------------------------------------------------------

    async def check_credentials(self) -> Step:
        """check_credentials finds the credential source, gets a token and names the identity."""
        try:
            creds = await asyncio.to_thread(load_credentials, self.config)
        except ConfigError as exc:
            return Step(
                "credentials",
                FAIL,
                str(exc),
                "On a VM, attach a service account to it; elsewhere run `gcloud auth "
                "application-default login` or pass --credentials-file KEY.json",
            )
        try:
            await asyncio.to_thread(creds.refresh, Request())
        except google.auth.exceptions.GoogleAuthError as exc:
            return Step(
                "credentials",
                FAIL,
                f"{_source(self.config, creds)}: cannot get an access token: "
                f"{str(exc).splitlines()[0]}",
                self._hint(DialCause.INVALID_CREDENTIALS),
            )
        self.found.credentials = creds
        self.found.token = str(creds.token)
        identity = (
            getattr(creds, "service_account_email", None)
            or getattr(creds, "account", None)
            or "identity not reported"
        )
        return Step("credentials", OK, f"{_source(self.config, creds)}: {identity}")

    async def check_scopes(self) -> Step:
        """check_scopes reads the VM's OAuth scopes from the metadata server."""
        if not isinstance(self.found.credentials, compute_engine.Credentials):
            return Step(
                "oauth-scopes", SKIP, "credentials do not come from the VM's metadata server"
            )
        scopes = (await self._metadata("instance/service-accounts/default/scopes")).split()
        if ADMIN_API_SCOPES & set(scopes):
            return Step(
                "oauth-scopes",
                OK,
                "the VM's service account has " + ", ".join(s.rsplit("/", 1)[-1] for s in scopes),
            )
        vm = (await self._metadata("instance/name")).strip() or "VM"
        zone = (await self._metadata("instance/zone")).strip().rsplit("/", 1)[-1] or "ZONE"
        return Step(
            "oauth-scopes",
            FAIL,
            "the VM's service account lacks the Cloud SQL scope (has: "
            + (", ".join(s.rsplit("/", 1)[-1] for s in scopes) or "none")
            + ")",
            f"gcloud compute instances stop {vm} --zone {zone}\n"
            f"gcloud compute instances set-service-account {vm} --zone {zone} "
            "--scopes=cloud-platform\n"
            f"gcloud compute instances start {vm} --zone {zone}",
        )

    async def _metadata(self, path: str) -> str:
        host = os.environ.get("GCE_METADATA_HOST", "metadata.google.internal")
        url = f"http://{host}/computeMetadata/v1/{path}"
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout)) as http,
            http.get(url, headers={"Metadata-Flavor": "Google"}) as resp,
        ):
            return await resp.text() if resp.status == 200 else ""

    async def _admin_get(self, http: aiohttp.ClientSession, path: str) -> tuple[int, Any]:
        conn = self.instance.name.rsplit(":", 2)
        url = (
            f"{self.config.admin_api_endpoint}/sql/v1beta4/projects/{conn[0]}/instances/"
            f"{conn[2]}{path}"
        )
        headers = {"Authorization": f"Bearer {self.found.token}"}
        if self.config.quota_project:
            headers["x-goog-user-project"] = self.config.quota_project
        async with http.get(url, headers=headers) as resp:
            try:
                body = await resp.json(content_type=None)
            except (ValueError, aiohttp.ContentTypeError):
                body = {}
            return resp.status, body

    async def check_admin_api(self) -> Step:
        """check_admin_api reads the instance: state, version, region and addresses."""
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as http:
                status, body = await self._admin_get(http, "")
                if status == 200:
                    status, settings = await self._admin_get(http, "/connectSettings")
                    self.found.settings_json = settings if isinstance(settings, dict) else {}
        except (aiohttp.ClientError, TimeoutError) as exc:
            return Step(
                "admin-api",
                FAIL,
                f"the Admin API at {self.config.admin_api_endpoint} did not answer: "
                f"{type(exc).__name__} {exc}",
                self._hint(DialCause.ADMIN_API),
            )
        if status != 200:
            message = (body.get("error") or {}).get("message", "") if isinstance(body, dict) else ""
            reasons = json.dumps(body)
            if status == 403 and "ACCESS_TOKEN_SCOPE_INSUFFICIENT" in reasons:
                cause = DialCause.INSUFFICIENT_SCOPES
            else:
                cause = {
                    403: DialCause.PERMISSION_DENIED,
                    401: DialCause.INVALID_CREDENTIALS,
                    404: DialCause.INSTANCE_NOT_FOUND,
                }.get(status, DialCause.ADMIN_API)
            return Step("admin-api", FAIL, f"{status} {message}".strip(), self._hint(cause))
        self.found.instance_json = body
        region = self.instance.name.rsplit(":", 2)[1]
        if body.get("region") and body["region"] != region:
            return Step(
                "admin-api",
                FAIL,
                f"the instance is in {body['region']}, not {region}",
                self._hint(DialCause.REGION_MISMATCH),
            )
        version = str(body.get("databaseVersion", "?"))
        if not version.startswith("POSTGRES"):
            return Step(
                "admin-api",
                FAIL,
                f"the instance runs {version}",
                self._hint(DialCause.NOT_POSTGRES),
            )
        state = str(body.get("state", "?"))
        addresses = (
            ", ".join(f"{a.get('type')} {a.get('ipAddress')}" for a in body.get("ipAddresses", []))
            or "no IP addresses"
        )
        evidence = f"{state}, {version}, region {body.get('region')}; {addresses}"
        if state != "RUNNABLE":
            return Step(
                "admin-api",
                FAIL,
                evidence,
                f"Start the instance: gcloud sql instances patch {self.short_name} "
                f"--project {self.project} --activation-policy=ALWAYS",
            )
        return Step("admin-api", OK, evidence)

    async def check_address(self) -> Step:
        """check_address picks the address of the chosen type, as the connector would."""
        settings = self.found.settings_json
        wanted = self.instance.ip_type
        if wanted is IPType.PSC:
            names = [
                d.get("name", "")
                for d in settings.get("dnsNames", [])
                if d.get("connectionType") == "PRIVATE_SERVICE_CONNECT"
            ]
            names = names or [settings.get("dnsName", "")]
            found = [n.rstrip(".") for n in names if n] if settings.get("pscEnabled") else []
        else:
            found = [
                a.get("ipAddress", "")
                for a in settings.get("ipAddresses", [])
                if a.get("type") == wanted.value
            ]
        label = {
            IPType.PUBLIC: "public (PRIMARY)",
            IPType.PRIVATE: "private",
            IPType.PSC: "Private Service Connect",
        }[wanted]
        if not found:
            return Step(
                "address",
                FAIL,
                f"the instance has no {label} address",
                self._hint(DialCause.NO_ADDRESS),
            )
        self.found.address = found[0]
        return Step("address", OK, f"{label} address {found[0]}")

    async def check_tcp(self) -> Step:
        """check_tcp connects to address:3307 and tells refused from timed out."""
        target = f"{self.found.address}:{SERVER_PROXY_PORT}"
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout):
                _, writer = await asyncio.open_connection(self.found.address, SERVER_PROXY_PORT)
        except ConnectionRefusedError:
            return Step(
                "tcp-3307",
                FAIL,
                f"{target} refused the connection (nothing listens, or a firewall rejects it)",
                self._hint(DialCause.REFUSED),
            )
        except TimeoutError:
            return Step(
                "tcp-3307",
                FAIL,
                f"no answer from {target} within {self.timeout:g}s "
                "(packets are dropped: firewall or no route)",
                self._hint(DialCause.TIMEOUT),
            )
        except OSError as exc:
            return Step(
                "tcp-3307",
                FAIL,
                f"{target}: {exc.strerror or exc}",
                self._hint(DialCause.UNREACHABLE),
            )
        writer.close()
        return Step(
            "tcp-3307", OK, f"connected to {target} in {(time.monotonic() - started) * 1000:.0f} ms"
        )

    async def check_tls(self) -> Step:
        """check_tls fetches an ephemeral certificate and completes the TLS handshake."""
        dialer = CloudSQLDialer(
            dataclasses.replace(self.config, dial_timeout=self.timeout), self.found.credentials
        )
        await dialer.start(())
        try:
            leg = Leg("instance", lambda _leg, _exc: None)
            await dialer.dial(self.instance, lambda: leg)
            gen = dialer.generation(self.instance)
            version = leg.transport.get_extra_info("ssl_object").version() if leg.transport else ""
            leg.close()
        except DialError as err:
            return Step("tls", FAIL, f"{err.cause.value}: {err.detail}", err.hint)
        finally:
            await dialer.close()
        expires = time.strftime("%H:%M:%S UTC", time.gmtime(gen.expires)) if gen else "?"
        return Step(
            "tls", OK, f"{version} handshake with an ephemeral certificate (valid until {expires})"
        )

    async def check_login(self) -> Step:
        """check_login logs in through a private sqlproxy listener and runs SELECT version()."""
        if not self.user:
            return Step(
                "postgres-login", SKIP, "pass --user (and --password-env VAR) to try a login"
            )
        config = dataclasses.replace(
            self.config,
            instances=(
                dataclasses.replace(self.instance, address="127.0.0.1", port=0, unix_path=None),
            ),
            dial_timeout=self.timeout,
        )
        dialer = CloudSQLDialer(config, self.found.credentials)
        server = ProxyServer(config, dialer)
        await dialer.start(())
        await server.start()
        database = self.database or self.user
        try:
            bound = server.addresses[0]
            conn = await asyncpg.connect(
                host=bound.host,
                port=bound.port,
                user=self.user,
                password=self.password,
                database=database,
                ssl=False,
                timeout=self.timeout,
            )
            try:
                version = await conn.fetchval("SELECT version()")
            finally:
                await conn.close()
        except asyncpg.exceptions.InvalidPasswordError as exc:
            return Step(
                "postgres-login",
                FAIL,
                str(exc),
                "Check the password (it is read from --password-env); reset it with: "
                f"gcloud sql users set-password {self.user} --instance={self.short_name} "
                f"--project={self.project} --prompt-for-password",
            )
        except asyncpg.exceptions.InvalidCatalogNameError as exc:
            return Step(
                "postgres-login",
                FAIL,
                str(exc),
                f"Create it: gcloud sql databases create {database} "
                f"--instance={self.short_name} --project={self.project}",
            )
        except (asyncpg.PostgresError, OSError, TimeoutError) as exc:
            return Step(
                "postgres-login",
                FAIL,
                f"{type(exc).__name__}: {exc}".splitlines()[0],
                getattr(exc, "hint", "") or "",
            )
        finally:
            await server.close()
        return Step(
            "postgres-login",
            OK,
            f"logged in as {self.user} to {database}: {str(version).split(',')[0]}",
        )

    # -- local side -----------------------------------------------------------------------

    async def check_local_port(self) -> Step:
        """check_local_port says whether the proxy's port is free, and who holds it if not."""
        where = f"{self.local_address}:{self.local_port}"
        family = socket.AF_INET6 if ":" in self.local_address else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((self.local_address, self.local_port))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    return Step(
                        "local-port",
                        FAIL,
                        f"cannot bind {where}: {exc.strerror}",
                        "Use an address of this host with --address (0.0.0.0 for all).",
                    )
            else:
                return Step("local-port", OK, f"{where} is free for sqlproxy")
        if await self._speaks_postgres():
            return Step(
                "local-port",
                OK,
                f"{where} is in use by a PostgreSQL server or proxy (a running sqlproxy?)",
            )
        return Step(
            "local-port",
            FAIL,
            f"{where} is taken by a program that is not PostgreSQL",
            "Stop that program or give sqlproxy another --port.",
        )

    async def _speaks_postgres(self) -> bool:
        """_speaks_postgres sends an SSLRequest: a PostgreSQL server answers 'S' or 'N'."""
        try:
            async with asyncio.timeout(2):
                reader, writer = await asyncio.open_connection(self.local_address, self.local_port)
        except (OSError, TimeoutError):
            return False
        try:
            async with asyncio.timeout(2):
                writer.write(struct.pack("!ii", 8, SSL_REQUEST))
                return await reader.readexactly(1) in (b"N", b"S")
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            return False
        finally:
            writer.close()

    async def check_bind_address(self) -> Step:
        """check_bind_address warns when other containers could not reach the proxy."""
        address = self.local_address
        if address in ("0.0.0.0", "::"):  # noqa: S104
            return Step("bind-address", OK, f"{address} is reachable from other containers")
        loopback = address == "localhost" or address.startswith("127.") or address == "::1"
        if loopback and running_in_container():
            return Step(
                "bind-address",
                FAIL,
                f"{address} inside a container is reachable from this container only: a Convex "
                'backend in another container gets "Connection refused (os error 111)"',
                "Listen on all interfaces: --address 0.0.0.0 (compose: command: "
                '["--address=0.0.0.0", "--port=5432", ...])',
            )
        if loopback:
            return Step("bind-address", OK, f"{address}: clients on this host only")
        return Step("bind-address", OK, f"{address}")


def _source(config: Config, creds: Any) -> str:
    if config.token:
        return "--token (a static access token)"
    if config.credentials_file:
        return f"--credentials-file {config.credentials_file}"
    if path := os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
        return f"GOOGLE_APPLICATION_CREDENTIALS={path}"
    if isinstance(creds, compute_engine.Credentials):
        return "the VM's service account (metadata server)"
    return "gcloud application default credentials"


def render(instance: Instance, steps: list[Step]) -> str:
    """render lays the steps out for a terminal."""
    lines = [f"sqlproxy doctor: {instance.name} ({instance.ip_type.name.lower()} IP)"]
    for step in steps:
        lines.append(f"  {step.status:<4}  {step.name:<14} {step.evidence}")
        for i, fix in enumerate(step.fix.splitlines()):
            lines.append(f"        {'fix:' if i == 0 else '    '} {fix}")
    failed = [s.name for s in steps if s.status == FAIL]
    lines.append("all checks passed" if not failed else f"failed: {', '.join(failed)}")
    return "\n".join(lines)


def _opt(name: str, *decls: str, **kwargs: Any) -> Callable[[Any], Any]:
    return click.option(f"--{name}", *decls, envvar=env_names(name), **kwargs)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("instance", required=False, metavar="INSTANCE_CONNECTION_NAME")
@click.option("--user", help="Database user for the login check.")
@click.option(
    "--password-env",
    metavar="VAR",
    help="Name of the environment variable holding the password (never a flag).",
)
@click.option("--database", help="Database for the login check [default: the user name].")
@_opt("private-ip", is_flag=True, help="Check the private IP path.")
@_opt("psc", is_flag=True, help="Check the Private Service Connect path.")
@_opt("auto-iam-authn", "-i", is_flag=True, help="IAM database authentication.")
@_opt("credentials-file", "-c", help="Service account or authorized-user key file.")
@_opt("token", "-t", help="OAuth2 access token.")
@_opt("quota-project", help="Project billed for Admin API quota.")
@_opt("sqladmin-api-endpoint", help="Admin API base URL.")
@_opt(
    "address",
    "-a",
    default=DEFAULT_ADDRESS,
    show_default=True,
    help="Address sqlproxy listens on (local checks).",
)
@_opt(
    "port",
    "-p",
    type=int,
    default=DEFAULT_POSTGRES_PORT,
    show_default=True,
    help="Port sqlproxy listens on (local checks).",
)
@click.option(
    "--timeout",
    type=float,
    default=DEFAULT_STEP_TIMEOUT,
    show_default=True,
    help="Seconds each network step may take.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report.")
def doctor_command(instance: str | None, **opts: Any) -> None:
    """Diagnose the path to a Cloud SQL instance, step by step, with fixes."""
    password_env = opts["password_env"]
    names = [instance] if instance else instances_from_env()[:1]
    password = os.environ.get(password_env) if password_env else None
    if password_env and password is None:
        raise ConfigError(f"--password-env {password_env}: that variable is not set")
    instances = resolve_instances(
        [InstanceArg.parse(n) for n in names],
        address="127.0.0.1",
        port=0,
        private_ip=opts["private_ip"],
        psc=opts["psc"],
        auto_iam_authn=opts["auto_iam_authn"],
    )
    config = Config(
        instances=instances,
        credentials_file=opts["credentials_file"],
        token=opts["token"],
        quota_project=opts["quota_project"],
        sqladmin_api_endpoint=opts["sqladmin_api_endpoint"],
    )
    doctor = Doctor(
        config,
        user=opts["user"],
        password=password,
        database=opts["database"],
        local_address=opts["address"],
        local_port=opts["port"],
        timeout=opts["timeout"],
    )
    steps = asyncio.run(doctor.run())
    if opts["as_json"]:
        click.echo(
            json.dumps(
                {
                    "instance": config.instances[0].name,
                    "ip_type": config.instances[0].ip_type.name.lower(),
                    "ok": all(s.status != FAIL for s in steps),
                    "steps": [dataclasses.asdict(s) for s in steps],
                },
                indent=2,
            )
        )
    else:
        click.echo(render(config.instances[0], steps))
    sys.exit(1 if any(s.status == FAIL for s in steps) else 0)
