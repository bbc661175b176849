"""`sqlproxy wait`, `healthcheck` and `shutdown`: small clients of a running proxy's endpoints.

They need no curl in the image, so a Docker HEALTHCHECK or a Kubernetes exec probe can use
them directly; they read the same CSQL_PROXY_* / SQLPROXY_* variables as the proxy.
"""

from __future__ import annotations

import sys
import time
import urllib.error
import urllib.request
from typing import Any

import click

from sqlproxy.config import (
    DEFAULT_ADMIN_PORT,
    DEFAULT_HTTP_ADDRESS,
    DEFAULT_HTTP_PORT,
    parse_duration,
)
from sqlproxy.configfile import env_names

PROBE_TIMEOUT = 5.0


def _get(url: str, method: str = "GET") -> tuple[int, str]:
    """_get returns (status, body) of an HTTP request, or (0, the reason) when unreachable."""
    request = urllib.request.Request(url, method=method)  # noqa: S310 - http URLs we build
    try:
        with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT) as response:  # noqa: S310
            return int(response.status), response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return 0, str(reason)


def _base(address: str, port: int) -> str:
    # A proxy listening on all addresses is reached on loopback.
    address = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(address, address)  # noqa: S104
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:{port}"


def http_options(fn: Any) -> Any:
    """http_options adds --http-address/--http-port, read from the proxy's variables too."""
    fn = click.option(
        "--http-port",
        type=int,
        default=DEFAULT_HTTP_PORT,
        show_default=True,
        envvar=env_names("http-port"),
        help="Port of the proxy's health server.",
    )(fn)
    return click.option(
        "--http-address",
        default=DEFAULT_HTTP_ADDRESS,
        show_default=True,
        envvar=env_names("http-address"),
        help="Address of the proxy's health server.",
    )(fn)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--max",
    "max_wait",
    default="30s",
    show_default=True,
    help="Give up after this long (Go-style duration or seconds).",
)
@http_options
def wait_command(max_wait: str, http_address: str, http_port: int) -> None:
    """Wait until the proxy reports started (/startup answers 200); exit 1 on timeout."""
    deadline = time.monotonic() + parse_duration(max_wait)
    url = f"{_base(http_address, http_port)}/startup"
    status, body = 0, ""
    while time.monotonic() < deadline:
        status, body = _get(url)
        if status == 200:
            return
        time.sleep(0.1)
    click.echo(f"sqlproxy: not started after {max_wait} ({url}: {status or body})", err=True)
    sys.exit(1)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--probe",
    type=click.Choice(["readiness", "liveness", "startup"]),
    default="readiness",
    show_default=True,
    help="Which endpoint to ask.",
)
@http_options
def healthcheck_command(probe: str, http_address: str, http_port: int) -> None:
    """Exit 0 if the proxy's health endpoint answers 200, else 1 (for Docker HEALTHCHECK)."""
    url = f"{_base(http_address, http_port)}/{probe}"
    status, body = _get(url)
    if status != 200:
        click.echo(f"sqlproxy: {probe} check failed: {status or 'unreachable'} {body}", err=True)
        sys.exit(1)
    click.echo(body.strip() or "ok")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--admin-port",
    type=int,
    default=DEFAULT_ADMIN_PORT,
    show_default=True,
    envvar=env_names("admin-port"),
    help="Port of the proxy's admin server.",
)
def shutdown_command(admin_port: int) -> None:
    """Ask a proxy started with --quitquitquit to shut down gracefully."""
    url = f"http://localhost:{admin_port}/quitquitquit"
    status, body = _get(url, method="POST")
    if status != 200:
        click.echo(f"sqlproxy: shutdown request failed: {status or body}", err=True)
        sys.exit(1)
