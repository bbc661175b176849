"""A throwaway PostgreSQL server from the system's binaries, for the emulator and tests."""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

POSTGRES_SUPERUSER = "postgres"
START_TIMEOUT = 60.0


class PostgresError(RuntimeError):
    """PostgresError says why a local PostgreSQL could not be found or started."""


@dataclass(frozen=True, slots=True)
class PostgresTarget:
    """PostgresTarget is where the emulated instances send their sessions."""

    host: str
    port: int
    user: str
    password: str
    # A Unix socket directory with "trust" authentication, only for the emulator's own
    # IAM-authenticated sessions; None when using an external server.
    socket_dir: str | None = None

    @classmethod
    def from_url(cls, url: str) -> PostgresTarget:
        """from_url reads postgresql://user:password@host:port (as given to --postgres-url)."""
        parts = urlsplit(url)
        if parts.scheme not in ("postgres", "postgresql") or not parts.hostname:
            raise PostgresError("invalid --postgres-url: expected postgresql://USER:PASS@HOST:PORT")
        return cls(
            host=parts.hostname,
            port=parts.port or 5432,
            user=unquote(parts.username or POSTGRES_SUPERUSER),
            password=unquote(parts.password or ""),
        )

    def url(
        self, database: str = "postgres", host: str | None = None, port: int | None = None
    ) -> str:
        """url is a libpq URL for this server (or for the same credentials elsewhere)."""
        return (
            f"postgresql://{quote(self.user, safe='')}:{quote(self.password, safe='')}"
            f"@{host or self.host}:{port or self.port}/{database}"
        )


def find_bindir() -> Path:
    """find_bindir locates initdb and postgres (pg_config, then Debian's layout)."""
    candidates: list[Path] = []
    if env := os.environ.get("SQLPROXY_PG_BINDIR"):
        candidates.append(Path(env))
    if shutil.which("pg_config"):
        out = subprocess.run(
            ["pg_config", "--bindir"], capture_output=True, text=True, check=False
        ).stdout.strip()
        if out:
            candidates.append(Path(out))
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for path in candidates:
        if (path / "initdb").is_file() and (path / "postgres").is_file():
            return path
    raise PostgresError(
        "PostgreSQL server binaries (initdb, postgres) not found; install them "
        "(Debian/Ubuntu: apt-get install postgresql) or pass --postgres-url"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """free_port asks the system for a TCP port that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class LocalPostgres:
    """LocalPostgres runs a PostgreSQL cluster in a temporary directory until stopped.

    When run as root it runs the server as the ``postgres`` system user, since initdb and
    postgres refuse to run as root.
    """

    def __init__(
        self,
        *,
        listen: str = "127.0.0.1",
        port: int = 0,
        max_connections: int = 300,
        extra_hba: tuple[str, ...] = (),
        password: str | None = None,
    ) -> None:
        self._listen = listen
        self._port = port or free_port(listen if listen != "*" else "127.0.0.1")
        self._max_connections = max_connections
        self._extra_hba = extra_hba
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self.password = password or secrets.token_urlsafe(18)
        self._run_as: pwd.struct_passwd | None = None

    @property
    def target(self) -> PostgresTarget:
        """target is how to reach the server as its superuser."""
        assert self._dir is not None, "start() first"
        host = "127.0.0.1" if self._listen in ("*", "0.0.0.0") else self._listen  # noqa: S104
        return PostgresTarget(
            host=host,
            port=self._port,
            user=POSTGRES_SUPERUSER,
            password=self.password,
            socket_dir=str(self._dir / "socket"),
        )

    def _cmd(self, argv: list[str]) -> list[str]:
        if self._run_as is None:
            return argv
        return ["runuser", "-u", self._run_as.pw_name, "--", *argv]

    def start(self) -> PostgresTarget:
        """start runs initdb and postgres, and waits until the server accepts connections."""
        bindir = find_bindir()
        if os.geteuid() == 0:
            try:
                self._run_as = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresError(
                    "running as root needs a 'postgres' system user to run the server "
                    "(useradd --system postgres), or pass --postgres-url"
                ) from None
        # Under the system temp dir, not a per-user 0700 one: the postgres user must enter it.
        base = Path(tempfile.mkdtemp(prefix="sqlproxy-pg-"))
        self._dir = base
        data = base / "data"
        sockets = base / "socket"
        sockets.mkdir()
        pwfile = base / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._run_as is not None:
            base.chmod(0o711)
            for path in (base, sockets, pwfile):
                os.chown(path, self._run_as.pw_uid, self._run_as.pw_gid)
        else:
            base.chmod(0o700)
        pwfile.chmod(0o600)
        init = subprocess.run(
            self._cmd(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    POSTGRES_SUPERUSER,
                    "--pwfile",
                    str(pwfile),
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                ]
            ),
            capture_output=True,
            text=True,
            check=False,
        )
        pwfile.unlink()
        if init.returncode != 0:
            raise PostgresError(f"initdb failed: {init.stderr.strip() or init.stdout.strip()}")
        if self._extra_hba:
            with (data / "pg_hba.conf").open("a") as hba:
                hba.write("\n".join(self._extra_hba) + "\n")
        log = base / "postgres.log"
        log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if self._run_as is not None:
            os.fchown(log_fd, self._run_as.pw_uid, self._run_as.pw_gid)
        listen = "*" if self._listen in ("*", "0.0.0.0") else self._listen  # noqa: S104
        self._proc = subprocess.Popen(
            self._cmd(
                [
                    str(bindir / "postgres"),
                    "-D",
                    str(data),
                    "-p",
                    str(self._port),
                    "-k",
                    str(sockets),
                    "-c",
                    f"listen_addresses={listen}",
                    "-c",
                    f"max_connections={self._max_connections}",
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "shared_buffers=64MB",
                    "-c",
                    "log_min_messages=warning",
                ]
            ),
            stdout=log_fd,
            stderr=log_fd,
            start_new_session=True,
        )
        os.close(log_fd)
        self._wait_ready(log)
        return self.target

    def _wait_ready(self, log: Path) -> None:
        assert self._proc is not None
        assert self._dir is not None
        deadline = time.monotonic() + START_TIMEOUT
        sock_path = self._dir / "socket" / f".s.PGSQL.{self._port}"
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise PostgresError(
                    f"postgres exited with code {self._proc.returncode}: "
                    f"{log.read_text(errors='replace').strip()[-2000:]}"
                )
            if sock_path.exists():
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection((self.target.host, self._port), timeout=1),
                ):
                    return
            time.sleep(0.05)
        self.stop()
        raise PostgresError(f"postgres did not start within {START_TIMEOUT:.0f}s")

    def stop(self) -> None:
        """stop shuts the server down fast and removes its directory."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
