"""The command line: flags and environment become a Config; errors become exit codes."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, NoReturn, TypeVar

import click

from sqlproxy import __version__, logs
from sqlproxy.config import (
    DEFAULT_ADDRESS,
    DEFAULT_ADMIN_PORT,
    DEFAULT_DIAL_TIMEOUT,
    DEFAULT_HTTP_ADDRESS,
    DEFAULT_HTTP_PORT,
    DEFAULT_MAX_WAIT,
    DEFAULT_STARTUP_TIMEOUT,
    Config,
    ConfigError,
    InstanceArg,
    check_address,
    parse_duration,
    resolve_instances,
)
from sqlproxy.configfile import (
    env_conflicts,
    env_names,
    find_config_file,
    instances_from_env,
    load_config_file,
    split_file_config,
)
from sqlproxy.demo import demo_command
from sqlproxy.doctor import doctor_command
from sqlproxy.emulator.cli import emulator_command
from sqlproxy.generate import generate_command
from sqlproxy.probes import healthcheck_command, shutdown_command, wait_command
from sqlproxy.runner import EXIT_ERROR, EXIT_SIGINT, Stop, run_until_signal
from sqlproxy.server import run
from sqlproxy.workers import SharedCounts, reserve_ports, supervise

# Set when a --config-file is in use: (its default_map, its instances).
_FILE_INSTANCES: list[str] = []

FC = TypeVar("FC", bound=Callable[..., Any])


class Duration(click.ParamType[float, Any]):
    """Duration accepts Go-style durations ("500ms", "1m30s") or plain seconds."""

    name = "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, float | int):
            return float(value)
        try:
            return parse_duration(str(value))
        except ConfigError as exc:
            self.fail(str(exc), param, ctx)


FLAGS: list[str] = []


def flag_option(name: str, *decls: str, **kwargs: Any) -> Callable[[FC], FC]:
    """flag_option declares --name, also read from CSQL_PROXY_NAME (Google's) or SQLPROXY_NAME."""
    FLAGS.append(name)
    kwargs.setdefault("show_envvar", True)
    return click.option(f"--{name}", *decls, envvar=env_names(name), **kwargs)


def build_config(
    instances: Sequence[str], opts: dict[str, Any], explicit: frozenset[str] = frozenset()
) -> Config:
    """build_config checks the flags together and makes the frozen Config.

    ``explicit`` names the options the user set (flag, environment or file), not defaulted.
    Instances come from the arguments, else the environment, else the config file.
    """
    names = list(instances) or instances_from_env() or list(_FILE_INSTANCES)
    check_address(opts["address"])
    if opts["unix_socket"] and explicit & {"address", "port"}:
        raise ConfigError("--unix-socket cannot be combined with --address or --port")
    resolved = resolve_instances(
        [InstanceArg.parse(n) for n in names],
        address=opts["address"],
        port=opts["port"],
        private_ip=opts["private_ip"],
        psc=opts["psc"],
        auto_iam_authn=opts["auto_iam_authn"],
        unix_socket=opts["unix_socket"],
    )
    return Config(
        instances=resolved,
        credentials_file=opts["credentials_file"],
        token=opts["token"],
        quota_project=opts["quota_project"],
        sqladmin_api_endpoint=opts["sqladmin_api_endpoint"],
        universe_domain=opts["universe_domain"],
        lazy_refresh=opts["lazy_refresh"],
        dial_timeout=opts["dial_timeout"],
        loop=opts["loop"],
        startup_timeout=opts["startup_timeout"],
        max_connections=opts["max_connections"],
        max_wait=opts["max_wait"],
        max_waiting=opts["max_waiting"],
        idle_timeout=opts["idle_timeout"],
        client_tls_cert=opts["client_tls_cert"],
        client_tls_key=opts["client_tls_key"],
        client_tls_dir=opts["client_tls_dir"],
        client_tls_san=tuple(opts["client_tls_san"]),
        client_tls_required=opts["client_tls_required"],
        health_check=opts["health_check"],
        http_address=opts["http_address"],
        http_port=opts["http_port"],
        prometheus=opts["prometheus"],
        prometheus_namespace=opts["prometheus_namespace"],
        quitquitquit=opts["quitquitquit"],
        admin_port=opts["admin_port"],
        min_sigterm_delay=opts["min_sigterm_delay"],
        max_sigterm_delay=opts["max_sigterm_delay"],
        exit_zero_on_sigterm=opts["exit_zero_on_sigterm"],
        run_connection_test=opts["run_connection_test"],
        workers=opts["workers"],
    )


SUBCOMMANDS_HELP = """
\b
Other commands:
  sqlproxy emulator     run a local Cloud SQL emulator (Admin API, instances, OAuth, metadata)
  sqlproxy demo         emulator + PostgreSQL + sqlproxy, and the psql line to try it
  sqlproxy wait         wait until a proxy's /startup answers 200
  sqlproxy healthcheck  exit 0/1 from a proxy's /readiness (or --probe liveness)
  sqlproxy shutdown     ask a proxy started with --quitquitquit to shut down
  sqlproxy doctor       diagnose the path to an instance, step by step, with fixes
  sqlproxy generate     write docker-compose, .env or Kubernetes files for an instance
"""


@click.command(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=SUBCOMMANDS_HELP,
)
@click.argument("instances", nargs=-1, metavar="INSTANCE_CONNECTION_NAME...")
@flag_option(
    "address",
    "-a",
    default=DEFAULT_ADDRESS,
    show_default=True,
    help="Address the listeners bind (0.0.0.0 for other containers).",
)
@flag_option(
    "port",
    "-p",
    type=click.IntRange(0, 65535),
    default=None,
    help="First listener port; later instances get port+1, ... [default: 5432]. "
    "0 picks free ports.",
)
@flag_option("private-ip", is_flag=True, help="Dial the instance's private IP address.")
@flag_option("psc", is_flag=True, help="Dial the instance's Private Service Connect endpoint.")
@flag_option(
    "auto-iam-authn",
    "-i",
    is_flag=True,
    help="Log in with IAM database authentication (the token rides in the certificate).",
)
@flag_option(
    "credentials-file",
    "-c",
    type=click.Path(dir_okay=False),
    help="Service account or authorized-user JSON key file.",
)
@flag_option("token", "-t", help="OAuth2 access token to call the Admin API with.")
@flag_option("quota-project", help="Project billed for Admin API quota.")
@flag_option("sqladmin-api-endpoint", help="Admin API base URL (e.g. the emulator's).")
@flag_option("universe-domain", help="Universe domain, for non-default Google Cloud universes.")
@flag_option(
    "lazy-refresh",
    is_flag=True,
    help="Refresh certificates only when a connection needs one (for throttled CPUs).",
)
@flag_option(
    "dial-timeout",
    type=Duration(),
    default=DEFAULT_DIAL_TIMEOUT,
    show_default=True,
    help="Limit for one dial: certificate, TCP connect and TLS handshake.",
)
@flag_option(
    "loop",
    type=click.Choice(["uvloop", "asyncio"]),
    default="uvloop",
    show_default=True,
    help="Event loop implementation.",
)
@flag_option(
    "unix-socket",
    "-u",
    type=click.Path(file_okay=False),
    help="Listen on DIR/<instance>/.s.PGSQL.5432 instead of TCP.",
)
@flag_option(
    "max-connections",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Sessions open at once across all instances (0: no limit). Per instance: "
    "?max-connections=N.",
)
@flag_option(
    "max-wait",
    type=Duration(),
    default=DEFAULT_MAX_WAIT,
    show_default=True,
    help="How long a client waits for a free slot before SQLSTATE 53300 (0: refuse at once).",
)
@flag_option(
    "max-waiting",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Clients that may wait at once (0: no limit).",
)
@flag_option(
    "idle-timeout",
    type=Duration(),
    default=0.0,
    help="End sessions with no traffic either way for this long (SQLSTATE 57P05) [default: off].",
)
@flag_option(
    "startup-timeout",
    type=Duration(),
    default=DEFAULT_STARTUP_TIMEOUT,
    show_default=True,
    help="Time a new client has to send its startup packet.",
)
@flag_option(
    "client-tls-cert",
    type=click.Path(dir_okay=False),
    help="Certificate (PEM chain) sqlproxy presents to clients that ask for TLS.",
)
@flag_option("client-tls-key", type=click.Path(dir_okay=False), help="Its private key.")
@flag_option(
    "client-tls-dir",
    type=click.Path(file_okay=False),
    help="Generate (once) and reuse a CA and server certificate in DIR for client TLS; "
    "clients trust DIR/ca.pem.",
)
@flag_option(
    "client-tls-san",
    multiple=True,
    help="Extra host name or IP for the generated certificate (repeatable).",
)
@flag_option(
    "client-tls-required", is_flag=True, help="Refuse clients that do not use TLS (SQLSTATE 28000)."
)
@flag_option(
    "health-check",
    is_flag=True,
    help="Serve /startup, /liveness and /readiness on --http-address:--http-port.",
)
@flag_option(
    "http-address",
    default=DEFAULT_HTTP_ADDRESS,
    show_default=True,
    help="Address of the health and metrics server.",
)
@flag_option(
    "http-port",
    type=click.IntRange(0, 65535),
    default=DEFAULT_HTTP_PORT,
    show_default=True,
    help="Port of the health and metrics server.",
)
@flag_option("prometheus", is_flag=True, help="Serve Prometheus metrics on /metrics.")
@flag_option("prometheus-namespace", default="", help="Metric name prefix instead of sqlproxy_.")
@flag_option(
    "quitquitquit",
    is_flag=True,
    help="Serve POST /quitquitquit on localhost:--admin-port to shut down.",
)
@flag_option(
    "admin-port",
    type=click.IntRange(0, 65535),
    default=DEFAULT_ADMIN_PORT,
    show_default=True,
    help="Port of the admin server.",
)
@flag_option(
    "min-sigterm-delay",
    type=Duration(),
    default=0.0,
    help="After SIGTERM, keep accepting new connections this long.",
)
@flag_option(
    "max-sigterm-delay",
    type=Duration(),
    default=0.0,
    help="Then wait this long for open connections to finish before closing them "
    "(exit 1 if some were still open).",
)
@flag_option("exit-zero-on-sigterm", is_flag=True, help="Exit 0 instead of 143 on SIGTERM.")
@flag_option(
    "run-connection-test",
    is_flag=True,
    help="Dial every instance before serving; exit 1 if one fails.",
)
@flag_option(
    "config-file",
    type=click.Path(dir_okay=False),
    help="TOML, YAML or JSON file with flag names as keys (flags > environment > file).",
)
@flag_option(
    "structured-logs",
    "-l",
    is_flag=True,
    help="Log JSON lines (severity, message, timestamp, connection fields).",
)
@flag_option("debug-logs", is_flag=True, help="Log debug lines too.")
@flag_option(
    "workers",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Worker processes sharing the ports (SO_REUSEPORT); limits stay global and worker 0 "
    "serves the HTTP endpoints.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print the resolved configuration as JSON (no secrets) and exit.",
)
@flag_option("quiet", is_flag=True, help="Log errors only.")
@click.version_option(__version__, "-v", "--version", prog_name="sqlproxy")
def proxy_command(instances: tuple[str, ...], **opts: Any) -> None:
    """Relay PostgreSQL clients to Cloud SQL instances over mutual TLS.

    Each INSTANCE_CONNECTION_NAME (PROJECT:REGION:INSTANCE, optionally with
    ?port=, ?address=, ?private-ip=, ?psc=, ?auto-iam-authn=, ?max-connections=,
    ?unix-socket=, ?unix-socket-path=) gets its own listener.
    """
    ctx = click.get_current_context()
    source = click.core.ParameterSource
    explicit = frozenset(
        name
        for name in opts
        if ctx.get_parameter_source(name)
        in (source.COMMANDLINE, source.ENVIRONMENT, source.DEFAULT_MAP)
    )
    env_conflicts(FLAGS)
    config = build_config(instances, opts, explicit)
    if opts["dry_run"]:
        click.echo(json.dumps(describe_config(config), indent=2))
        return
    if opts["debug_logs"] and opts["quiet"]:
        raise ConfigError("--debug-logs and --quiet cannot both be set")
    logs.configure(
        debug=opts["debug_logs"], quiet=opts["quiet"], structured=opts["structured_logs"]
    )
    if config.workers == 1:
        sys.exit(run_until_signal(config.loop, lambda stop: run(config, stop)))
    config, held = reserve_ports(config)
    counts = SharedCounts(config.instances)

    def run_worker(index: int) -> int:
        def main(stop: Stop) -> Coroutine[Any, Any, int]:
            return run(config, stop, worker=index, counts=counts)

        return run_until_signal(config.loop, main)

    code = supervise(config.workers, run_worker)
    for sock in held:
        sock.close()
    sys.exit(code)


def describe_config(config: Config) -> dict[str, Any]:
    """describe_config is the resolved configuration as JSON-ready data, without secrets."""
    data = dataclasses.asdict(config)
    data["token"] = "<set>" if config.token else None
    data["instances"] = [
        {**dataclasses.asdict(i), "ip_type": i.ip_type.name.lower(), "listen": i.listen}
        for i in config.instances
    ]
    return data


def fail(message: str) -> NoReturn:
    """fail prints a one-line error and exits 1, as Google's proxy does for bad config."""
    click.echo(f"sqlproxy: {message}", err=True)
    sys.exit(EXIT_ERROR)


SUBCOMMANDS: dict[str, click.Command] = {
    "emulator": emulator_command,
    "demo": demo_command,
    "wait": wait_command,
    "healthcheck": healthcheck_command,
    "shutdown": shutdown_command,
    "doctor": doctor_command,
    "generate": generate_command,
}


def _file_defaults(args: Sequence[str]) -> dict[str, Any]:
    """_file_defaults loads --config-file into click's default_map (below env and flags)."""
    path = find_config_file(args)
    if path is None:
        return {}
    defaults, instances = split_file_config(load_config_file(path), FLAGS, path)
    _FILE_INSTANCES[:] = instances
    return defaults


def main(argv: Sequence[str] | None = None) -> None:
    """main dispatches to a subcommand or runs the proxy; every error is one line, exit 1."""
    args = list(sys.argv[1:] if argv is None else argv)
    command: click.Command = proxy_command
    prog = "sqlproxy"
    if args and args[0] in SUBCOMMANDS:
        prog = f"sqlproxy {args[0]}"
        command = SUBCOMMANDS[args.pop(0)]
    try:
        extra: dict[str, Any] = {}
        if command is proxy_command:
            extra["default_map"] = _file_defaults(args)
        command.main(args, prog_name=prog, standalone_mode=False, **extra)
    except click.exceptions.Abort:
        sys.exit(EXIT_SIGINT)
    except click.ClickException as exc:
        fail(exc.format_message())
    except ConfigError as exc:
        fail(f"config error: {exc}")
    except OSError as exc:
        fail(str(exc))
