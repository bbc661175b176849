"""The command line: flags and environment become a Config; errors become exit codes."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

import click

from sqlproxy import __version__, logs
from sqlproxy.config import (
    DEFAULT_ADDRESS,
    DEFAULT_DIAL_TIMEOUT,
    DEFAULT_MAX_WAIT,
    DEFAULT_STARTUP_TIMEOUT,
    Config,
    ConfigError,
    InstanceArg,
    check_address,
    parse_duration,
    resolve_instances,
)
from sqlproxy.demo import demo_command
from sqlproxy.emulator.cli import emulator_command
from sqlproxy.runner import EXIT_SIGINT, run_until_signal
from sqlproxy.server import serve

ENV_PREFIX = "CSQL_PROXY_"
EXIT_CONFIG = 1

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


def _env(flag: str) -> str:
    return ENV_PREFIX + flag.upper().replace("-", "_")


def flag_option(name: str, *decls: str, **kwargs: Any) -> Callable[[FC], FC]:
    """flag_option declares --name, also read from CSQL_PROXY_NAME like Google's proxy."""
    kwargs.setdefault("show_envvar", True)
    return click.option(f"--{name}", *decls, envvar=_env(name), **kwargs)


def instances_from_env() -> list[str]:
    """instances_from_env reads CSQL_PROXY_INSTANCE_CONNECTION_NAME, or _0, _1, ... in order."""
    single = os.environ.get(_env("instance-connection-name"))
    if single:
        return [single]
    found: list[str] = []
    while value := os.environ.get(f"{_env('instance-connection-name')}_{len(found)}"):
        found.append(value)
    return found


def build_config(
    instances: Sequence[str], opts: dict[str, Any], explicit: frozenset[str] = frozenset()
) -> Config:
    """build_config checks the flags together and makes the frozen Config.

    ``explicit`` names the options the user set (flag or environment), not defaulted.
    """
    names = list(instances) or instances_from_env()
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
    )


SUBCOMMANDS_HELP = """
\b
Other commands:
  sqlproxy emulator   run a local Cloud SQL emulator (Admin API, instances, OAuth, metadata)
  sqlproxy demo       emulator + PostgreSQL + sqlproxy, and the psql line to try it
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
@flag_option("debug-logs", is_flag=True, help="Log debug lines too.")
@flag_option("quiet", is_flag=True, help="Log errors only.")
@click.version_option(__version__, "-v", "--version", prog_name="sqlproxy")
def proxy_command(instances: tuple[str, ...], **opts: Any) -> None:
    """Relay PostgreSQL clients to Cloud SQL instances over mutual TLS.

    Each INSTANCE_CONNECTION_NAME (PROJECT:REGION:INSTANCE, optionally with
    ?port=, ?address=, ?private-ip=, ?psc=, ?auto-iam-authn=, ?max-connections=,
    ?unix-socket=, ?unix-socket-path=) gets its own listener.
    """
    ctx = click.get_current_context()
    explicit = frozenset(
        name
        for name in opts
        if ctx.get_parameter_source(name)
        in (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
    )
    config = build_config(instances, opts, explicit)
    logs.configure(debug=opts["debug_logs"], quiet=opts["quiet"])
    sys.exit(run_until_signal(config.loop, lambda stop: _serve(config, stop)))


async def _serve(config: Config, stop: asyncio.Event) -> None:
    async with serve(config):
        await stop.wait()


def fail(message: str) -> NoReturn:
    """fail prints a one-line error and exits 1, as Google's proxy does for bad config."""
    click.echo(f"sqlproxy: {message}", err=True)
    sys.exit(EXIT_CONFIG)


SUBCOMMANDS: dict[str, click.Command] = {"emulator": emulator_command, "demo": demo_command}


def main(argv: Sequence[str] | None = None) -> None:
    """main dispatches to a subcommand or runs the proxy; every error is one line, exit 1."""
    args = list(sys.argv[1:] if argv is None else argv)
    command: click.Command = proxy_command
    prog = "sqlproxy"
    if args and args[0] in SUBCOMMANDS:
        prog = f"sqlproxy {args[0]}"
        command = SUBCOMMANDS[args.pop(0)]
    try:
        command.main(args, prog_name=prog, standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(EXIT_SIGINT)
    except click.ClickException as exc:
        fail(exc.format_message())
    except ConfigError as exc:
        fail(f"config error: {exc}")
    except OSError as exc:
        fail(str(exc))
