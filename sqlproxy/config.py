"""The proxy's configuration: one frozen Config, instance specs, and duration parsing."""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

DEFAULT_ADDRESS = "127.0.0.1"
DEFAULT_POSTGRES_PORT = 5432
DEFAULT_DIAL_TIMEOUT = 30.0
DEFAULT_STARTUP_TIMEOUT = 10.0
# Below Convex's 30 s operation timeout, so a queued client still gets an answer in time.
DEFAULT_MAX_WAIT = 15.0
SERVER_PROXY_PORT = 3307
PG_SOCKET_NAME = ".s.PGSQL.5432"
DEFAULT_HTTP_ADDRESS = "localhost"
DEFAULT_HTTP_PORT = 9090
DEFAULT_ADMIN_PORT = 9091

# Same shape as the connector's and Go proxy's check: PROJECT (optionally domain-scoped,
# "example.com:project"), REGION and INSTANCE, colon separated.
_CONNECTION_NAME = re.compile(
    r"(?P<project>[^:?]+(?::[^:?]+)?):(?P<region>[^:?]+):(?P<name>[^:?]+)"
)

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_TRUE = {"", "t", "true", "1", "yes", "y", "on"}
_FALSE = {"f", "false", "0", "no", "n", "off"}


class ConfigError(ValueError):
    """ConfigError is a configuration mistake reported to the user in one line."""


class IPType(enum.Enum):
    """IPType selects which of the instance's addresses sqlproxy dials."""

    PUBLIC = "PRIMARY"
    PRIVATE = "PRIVATE"
    PSC = "PSC"


def parse_duration(text: str) -> float:
    """parse_duration reads "500ms", "30s", "1m30s" (Go style) or plain seconds into seconds."""
    value = text.strip()
    try:
        seconds = float(value)
    except ValueError:
        pos = 0
        seconds = 0.0
        for match in _DURATION_PART.finditer(value):
            if match.start() != pos:
                break
            seconds += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
            pos = match.end()
        if pos != len(value) or not value:
            raise ConfigError(
                f'invalid duration "{text}": use Go-style units such as 500ms, 30s, 1m30s '
                "or a number of seconds"
            ) from None
    if seconds < 0:
        raise ConfigError(f'invalid duration "{text}": must not be negative')
    return seconds


def parse_bool(text: str, what: str) -> bool:
    """parse_bool reads the boolean spellings Google's proxy accepts in query parameters."""
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(f'invalid value "{text}" for {what}: use true or false')


def check_connection_name(name: str) -> None:
    """check_connection_name refuses anything that is not PROJECT:REGION:INSTANCE."""
    if not _CONNECTION_NAME.fullmatch(name):
        raise ConfigError(
            f'invalid instance connection name "{name}": expected PROJECT:REGION:INSTANCE '
            "(find it with: gcloud sql instances describe INSTANCE "
            "--format='value(connectionName)')"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class InstanceArg:
    """InstanceArg is one positional argument: a connection name and its query parameters."""

    name: str
    port: int | None = None
    address: str | None = None
    private_ip: bool | None = None
    psc: bool | None = None
    auto_iam_authn: bool | None = None
    max_connections: int | None = None
    unix_socket: str | None = None
    unix_socket_path: str | None = None

    @classmethod
    def parse(cls, text: str) -> InstanceArg:
        """parse reads "p:r:i?port=5433&private-ip=true" the way Google's proxy does."""
        name, _, query = text.strip().partition("?")
        check_connection_name(name)
        values: dict[str, str] = {}
        for key, value in parse_qsl(query, keep_blank_values=True):
            if key in values:
                raise ConfigError(f'instance "{name}": query parameter "{key}" given twice')
            values[key] = value
        known = {
            "port",
            "address",
            "private-ip",
            "psc",
            "auto-iam-authn",
            "max-connections",
            "unix-socket",
            "unix-socket-path",
        }
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f'instance "{name}": unknown query parameter "{unknown[0]}" '
                f"(known: {', '.join(sorted(known))})"
            )

        def flag(key: str) -> bool | None:
            if key not in values:
                return None
            return parse_bool(values[key], f'"{key}" of instance "{name}"')

        port: int | None = None
        if "port" in values:
            port = parse_port(values["port"], f'"port" of instance "{name}"')
        address = values.get("address")
        if address is not None:
            check_address(address)
        max_conns: int | None = None
        if "max-connections" in values:
            max_conns = parse_count(values["max-connections"], f'"max-connections" of "{name}"')
        unix_socket = values.get("unix-socket") or None
        unix_socket_path = values.get("unix-socket-path") or None
        if (unix_socket or unix_socket_path) and (port is not None or address is not None):
            raise ConfigError(
                f'instance "{name}": ?unix-socket/?unix-socket-path cannot be combined with '
                "?port or ?address"
            )
        if unix_socket and unix_socket_path:
            raise ConfigError(
                f'instance "{name}": give ?unix-socket or ?unix-socket-path, not both'
            )
        return cls(
            name=name,
            port=port,
            address=address,
            private_ip=flag("private-ip"),
            psc=flag("psc"),
            auto_iam_authn=flag("auto-iam-authn"),
            max_connections=max_conns,
            unix_socket=unix_socket,
            unix_socket_path=unix_socket_path,
        )


def parse_count(text: str, what: str) -> int:
    """parse_count reads a non-negative whole number (0 means no limit)."""
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f'invalid number "{text}" for {what}') from None
    if value < 0:
        raise ConfigError(f"invalid number {value} for {what}: must be 0 or more")
    return value


def unix_socket_file(path: str) -> str:
    """unix_socket_file is where a ?unix-socket-path socket lives: the path itself when it
    already ends in .s.PGSQL.5432 (as libpq expects), else that name inside the directory."""
    if path.rstrip("/").endswith(PG_SOCKET_NAME):
        return path.rstrip("/")
    return f"{path.rstrip('/')}/{PG_SOCKET_NAME}"


def parse_port(text: str, what: str) -> int:
    """parse_port reads a TCP port number (0 asks the system for a free one)."""
    try:
        port = int(text)
    except ValueError:
        raise ConfigError(f'invalid port "{text}" for {what}') from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"invalid port {port} for {what}: must be 0-65535")
    return port


def check_address(address: str) -> None:
    """check_address refuses a listen address that is not an IP literal or a host name."""
    try:
        ipaddress.ip_address(address)
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9.-]+", address):
            raise ConfigError(
                f'invalid address "{address}": use an IP address such as 127.0.0.1 or 0.0.0.0'
            ) from None


@dataclass(frozen=True, slots=True, kw_only=True)
class Instance:
    """Instance is one Cloud SQL instance with its resolved listener and dial options."""

    name: str
    address: str
    port: int
    ip_type: IPType
    auto_iam_authn: bool
    # 0: no per-instance cap (the global --max-connections still applies).
    max_connections: int = 0
    # A Unix socket path to listen on instead of address:port.
    unix_path: str | None = None

    @property
    def listen(self) -> str:
        """listen is where this instance's listener binds: "host:port" or a socket path."""
        if self.unix_path:
            return self.unix_path
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"


def resolve_instances(
    args: list[InstanceArg],
    *,
    address: str,
    port: int | None,
    private_ip: bool,
    psc: bool,
    auto_iam_authn: bool,
    unix_socket: str | None = None,
) -> tuple[Instance, ...]:
    """resolve_instances merges global flags into each instance, numbering ports like Go does.

    An explicit ?port= wins; otherwise instances take --port, --port+1, ... in order, or
    5432, 5433, ... when --port is not given.  Port 0 binds a free port for every instance.
    """
    if not args:
        raise ConfigError(
            "missing instance connection name (e.g. project:region:instance); "
            "pass it as an argument or set CSQL_PROXY_INSTANCE_CONNECTION_NAME"
        )
    next_port = DEFAULT_POSTGRES_PORT if port is None else port
    resolved: list[Instance] = []
    seen: dict[str, str] = {}
    for arg in args:
        unix_path: str | None = None
        if arg.unix_socket_path:
            unix_path = unix_socket_file(arg.unix_socket_path)
        elif arg.unix_socket or (unix_socket and arg.port is None and arg.address is None):
            unix_path = f"{(arg.unix_socket or unix_socket or '').rstrip('/')}/{arg.name}/"
            unix_path += PG_SOCKET_NAME
        if unix_path is not None:
            inst_port = 0
        elif arg.port is not None:
            inst_port = arg.port
        else:
            inst_port = next_port
            if next_port != 0:
                next_port += 1
        use_private = private_ip if arg.private_ip is None else arg.private_ip
        use_psc = psc if arg.psc is None else arg.psc
        if use_private and use_psc:
            raise ConfigError(
                f'instance "{arg.name}": --private-ip and --psc cannot both be set; choose one'
            )
        ip_type = IPType.PRIVATE if use_private else IPType.PSC if use_psc else IPType.PUBLIC
        inst = Instance(
            name=arg.name,
            address=arg.address or address,
            port=inst_port,
            ip_type=ip_type,
            auto_iam_authn=auto_iam_authn if arg.auto_iam_authn is None else arg.auto_iam_authn,
            max_connections=arg.max_connections or 0,
            unix_path=unix_path,
        )
        if inst.port != 0 or inst.unix_path:
            if inst.listen in seen:
                raise ConfigError(
                    f'instances "{seen[inst.listen]}" and "{inst.name}" both want to listen on '
                    f"{inst.listen}; give one of them ?port= or ?unix-socket-path="
                )
            seen[inst.listen] = inst.name
        resolved.append(inst)
    return tuple(resolved)


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """Config is everything the proxy needs to run, validated once at construction."""

    instances: tuple[Instance, ...]
    credentials_file: str | None = None
    token: str | None = field(default=None, repr=False)
    quota_project: str | None = None
    sqladmin_api_endpoint: str | None = None
    universe_domain: str | None = None
    lazy_refresh: bool = False
    dial_timeout: float = DEFAULT_DIAL_TIMEOUT
    loop: str = "uvloop"
    # Front door and admission.
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT
    max_connections: int = 0
    max_wait: float = DEFAULT_MAX_WAIT
    max_waiting: int = 0
    idle_timeout: float = 0.0
    # TLS between clients and sqlproxy (Google's proxy has none).
    client_tls_cert: str | None = None
    client_tls_key: str | None = None
    client_tls_dir: str | None = None
    client_tls_san: tuple[str, ...] = ()
    client_tls_required: bool = False
    # Operations.
    health_check: bool = False
    http_address: str = DEFAULT_HTTP_ADDRESS
    http_port: int = DEFAULT_HTTP_PORT
    prometheus: bool = False
    prometheus_namespace: str = ""
    quitquitquit: bool = False
    admin_port: int = DEFAULT_ADMIN_PORT
    min_sigterm_delay: float = 0.0
    max_sigterm_delay: float = 0.0
    exit_zero_on_sigterm: bool = False
    run_connection_test: bool = False
    # Worker processes sharing the ports (SO_REUSEPORT); limits stay global.
    workers: int = 1

    def __post_init__(self) -> None:
        if not self.instances:
            raise ConfigError("missing instance connection name (e.g. project:region:instance)")
        if self.credentials_file and self.token:
            raise ConfigError(
                "--credentials-file and --token cannot both be set; choose one credential source"
            )
        if self.token and any(i.auto_iam_authn for i in self.instances):
            raise ConfigError(
                "--token cannot be used with --auto-iam-authn: a static token cannot be "
                "refreshed for IAM login; use --credentials-file or application default "
                "credentials"
            )
        if self.sqladmin_api_endpoint and self.universe_domain:
            raise ConfigError("--sqladmin-api-endpoint and --universe-domain cannot both be set")
        if self.sqladmin_api_endpoint and not re.match(
            r"https?://[^/]+", self.sqladmin_api_endpoint
        ):
            raise ConfigError(
                f'invalid --sqladmin-api-endpoint "{self.sqladmin_api_endpoint}": '
                "expected a URL such as https://sqladmin.googleapis.com"
            )
        if self.dial_timeout <= 0:
            raise ConfigError("--dial-timeout must be greater than zero")
        if self.loop not in ("uvloop", "asyncio"):
            raise ConfigError(f'invalid --loop "{self.loop}": use uvloop or asyncio')
        if self.startup_timeout <= 0:
            raise ConfigError("--startup-timeout must be greater than zero")
        if (
            min(self.max_connections, self.max_waiting) < 0
            or min(self.max_wait, self.idle_timeout) < 0
        ):
            raise ConfigError(
                "--max-connections, --max-wait, --max-waiting and --idle-timeout "
                "must not be negative"
            )
        if bool(self.client_tls_cert) != bool(self.client_tls_key):
            raise ConfigError("--client-tls-cert and --client-tls-key must be given together")
        if self.client_tls_dir and self.client_tls_cert:
            raise ConfigError(
                "--client-tls-dir and --client-tls-cert/--client-tls-key cannot both be set; "
                "choose generated or your own certificate"
            )
        if self.client_tls_san and not self.client_tls_dir:
            raise ConfigError("--client-tls-san only applies with --client-tls-dir")
        if min(self.min_sigterm_delay, self.max_sigterm_delay) < 0:
            raise ConfigError("--min-sigterm-delay and --max-sigterm-delay must not be negative")
        if self.prometheus_namespace and not re.fullmatch(
            r"[a-zA-Z_][a-zA-Z0-9_]*", self.prometheus_namespace
        ):
            raise ConfigError(
                f'invalid --prometheus-namespace "{self.prometheus_namespace}": use letters, '
                "digits and underscores"
            )
        if self.prometheus_namespace and not self.prometheus:
            raise ConfigError("--prometheus-namespace needs --prometheus")
        if not 1 <= self.workers <= 64:
            raise ConfigError("--workers must be between 1 and 64")
        if self.workers > 1 and any(i.unix_path for i in self.instances):
            raise ConfigError("--workers above 1 needs TCP listeners (not --unix-socket)")
        if self.client_tls_required and not self.client_tls:
            raise ConfigError(
                "--client-tls-required needs --client-tls-dir or --client-tls-cert/--client-tls-key"
            )

    @property
    def client_tls(self) -> bool:
        """client_tls is true when sqlproxy answers SSLRequest with 'S'."""
        return bool(self.client_tls_dir or self.client_tls_cert)

    @property
    def admin_api_endpoint(self) -> str:
        """admin_api_endpoint is the Admin API base URL, without a trailing slash."""
        if self.sqladmin_api_endpoint:
            return self.sqladmin_api_endpoint.rstrip("/")
        return f"https://sqladmin.{self.universe_domain or 'googleapis.com'}"
