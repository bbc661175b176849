"""Benchmark sqlproxy against direct PostgreSQL, haproxy and stunnel doing the same tunnel.

  python -m bench.run [--quick] [--reps 3] [--out bench/out]

Sets up everything itself: the emulator and a real PostgreSQL, stunnel as the instance's
server side (mutual TLS on port 3307, as Cloud SQL), a TLS echo server as a second instance,
sqlproxy, and, when installed, haproxy and stunnel as client-side tunnels with an ephemeral
certificate from the emulator. Targets run interleaved (A B C A B C ...); medians are reported
as a Markdown table, a JSON file and (with matplotlib) PNG charts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from sqlproxy.emulator import Emulator, EmulatorSettings, EmulatorThread, InstanceSettings
from sqlproxy.emulator.instance import _bind_3307

PG_INSTANCE = "bench:us-central1:pg"
ECHO_INSTANCE = "bench:us-central1:echo"
PYTHON = sys.executable


@dataclass
class Plan:
    """Plan sizes every workload; --quick shrinks it to a smoke run."""

    reps: int = 3
    bulk_rows: int = 1_100_000  # ~220 MB of COPY text
    pgbench_scale: int = 10
    pgbench_seconds: int = 10
    pgbench_clients: tuple[int, ...] = (1, 16, 64)
    connect_seconds: int = 10
    storm: int = 5000
    idle: tuple[int, ...] = (1000, 3000, 5000)
    idle_cycles: int = 3
    stream_mb: int = 200
    # sqlproxy also runs with this many worker processes (haproxy uses a thread per CPU).
    workers: int = 2

    @classmethod
    def quick(cls) -> Plan:
        """quick is a smoke run: every workload, tiny sizes, one repetition."""
        return cls(
            reps=1,
            bulk_rows=20_000,
            pgbench_scale=1,
            pgbench_seconds=1,
            pgbench_clients=(1, 4),
            connect_seconds=1,
            storm=100,
            idle=(100,),
            idle_cycles=1,
            stream_mb=8,
        )


def free_port() -> int:
    """free_port is a TCP port on loopback that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_loopback_ip() -> str:
    """free_loopback_ip is a 127.x.y.z whose port 3307 is free now."""
    ip, sock = _bind_3307(None)
    sock.close()
    return ip


def rss_kib(pid: int) -> int:
    """rss_kib is a process's resident memory (VmRSS) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Progress:
    """Progress draws a one-line progress bar on stderr."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.started = total, 0, time.monotonic()

    def step(self, label: str) -> None:
        """step advances the bar and names what runs now."""
        self.done += 1
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        elapsed = time.monotonic() - self.started
        sys.stderr.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
            f"{elapsed:5.0f}s {label[:50]:<50}"
        )
        sys.stderr.flush()

    def close(self) -> None:
        """close ends the bar's line."""
        sys.stderr.write("\n")


@dataclass
class Target:
    """Target is one way to reach the instances: its PostgreSQL and echo endpoints."""

    name: str
    pg_port: int
    echo_port: int
    pid: int = 0


@dataclass
class Bench:
    """Bench owns every process it starts and stops them all at the end."""

    plan: Plan
    work: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    results: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def spawn(self, argv: list[str], ready: str | None = None) -> subprocess.Popen[bytes]:
        """spawn starts a long-lived process logging to a file; with ready, it waits for a
        line containing that text."""
        log = self.work / f"{Path(argv[0]).name}-{len(self.procs)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        deadline = time.monotonic() + 60
        while ready is not None and ready not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{argv[0]} did not start: {log.read_text()[-2000:]}")
            time.sleep(0.05)
        return proc

    def record(self, workload: str, target: str, value: float) -> None:
        """record keeps one measurement."""
        self.results.setdefault(workload, {}).setdefault(target, []).append(value)

    def stop(self) -> None:
        """stop terminates every process this bench started."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _wait_port(host: str, port: int, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (proc is None or proc.poll() is None):
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port} (see the logs in the work directory)")


async def _client_certificate(emulator: Emulator, instance: str, directory: Path) -> None:
    """_client_certificate asks the Admin API for an ephemeral certificate, as the connector
    does, and writes it for haproxy (one PEM) and stunnel (cert + key)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    project, _, name = instance.split(":")
    url = f"{emulator.url}/sql/v1beta4/projects/{project}/instances/{name}:generateEphemeralCert"
    headers = {"Authorization": f"Bearer {emulator.mint_token(ttl=6 * 3600)}"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(url, json={"public_key": public}, headers=headers) as resp,
    ):
        cert = (await resp.json())["ephemeralCert"]["cert"]
    key_text = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "client.crt").write_text(cert)
    (directory / "client.key").write_text(key_text)
    (directory / "client.pem").write_text(cert + key_text)
    (directory / "ca.pem").write_text(emulator.instance(instance).ca_pem)


@dataclass
class Endpoints:
    """Endpoints are what a tunnel target needs: both instances and the client certificate."""

    emulator: Emulator
    pg_ip: str
    echo_ip: str
    client_dir: Path
    stunnel: str


def _free_port_pair() -> int:
    port = free_port()
    while True:  # sqlproxy takes port and port+1
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("127.0.0.1", port + 1))
            return port
        port = free_port()


def start_targets(
    bench: Bench, ep: Endpoints, label: str = "", workers: int = 1
) -> dict[str, Target]:
    """start_targets starts sqlproxy (and, with workers > 1, sqlproxy --workers too),
    haproxy (if installed) and stunnel, each reaching both instances; label keeps the config
    files of a second set apart."""
    work, targets = bench.work, {}
    for count in sorted({1, workers}):
        port = _free_port_pair()
        proc = bench.spawn(
            [
                PYTHON,
                "-m",
                "sqlproxy",
                "--port",
                str(port),
                "--quiet",
                "--workers",
                str(count),
                "--sqladmin-api-endpoint",
                ep.emulator.url,
                "--credentials-file",
                str(ep.emulator.key_file),
                PG_INSTANCE,
                ECHO_INSTANCE,
            ]
        )
        _wait_port("127.0.0.1", port, proc)
        _wait_port("127.0.0.1", port + 1, proc)
        name = "sqlproxy" if count == 1 else f"sqlproxy x{count}"
        # Memory is read from one process, so only the single-process target reports it.
        targets[name] = Target(name, port, port + 1, proc.pid if count == 1 else 0)
    haproxy = shutil.which("haproxy")
    pairs = (("pg", ep.pg_ip), ("echo", ep.echo_ip))
    if haproxy:
        hp, he = free_port(), free_port()
        blocks = [
            f"listen {name}\n  bind 127.0.0.1:{listen}\n  mode tcp\n"
            f"  server instance {ip}:3307 ssl crt {ep.client_dir / name / 'client.pem'} "
            f"ca-file {ep.client_dir / name / 'ca.pem'} verify required ssl-min-ver TLSv1.3\n"
            for (name, ip), listen in zip(pairs, (hp, he), strict=True)
        ]
        # As its users run it: default threading (one thread per CPU), defaults otherwise.
        config = work / f"haproxy{label}.cfg"
        config.write_text(
            "global\n  maxconn 9000\ndefaults\n  mode tcp\n  timeout connect 30s\n"
            "  timeout client 1h\n  timeout server 1h\n" + "".join(blocks)
        )
        proc = bench.spawn([haproxy, "-db", "-f", str(config)])
        _wait_port("127.0.0.1", hp, proc)
        targets["haproxy"] = Target("haproxy", hp, he, proc.pid)
    sp, se = free_port(), free_port()
    services = "".join(
        f"[{name}]\nclient = yes\naccept = 127.0.0.1:{listen}\nconnect = {ip}:3307\n"
        f"cert = {ep.client_dir / name / 'client.crt'}\n"
        f"key = {ep.client_dir / name / 'client.key'}\n"
        f"CAfile = {ep.client_dir / name / 'ca.pem'}\nverifyChain = yes\nsslVersionMin = TLSv1.3\n"
        for (name, ip), listen in zip(pairs, (sp, se), strict=True)
    )
    config = work / f"client-stunnel{label}.conf"
    config.write_text(f"foreground = yes\npid =\nsyslog = no\n{services}")
    proc = bench.spawn([ep.stunnel, str(config)])
    _wait_port("127.0.0.1", sp, proc)
    targets["stunnel"] = Target("stunnel", sp, se, proc.pid)
    return targets


def setup(bench: Bench) -> tuple[EmulatorThread, dict[str, Target], dict[str, Any]]:
    """setup starts PostgreSQL, the instance sides and every target."""
    work, plan = bench.work, bench.plan
    pg_ip, echo_ip = free_loopback_ip(), free_loopback_ip()
    thread = EmulatorThread(
        EmulatorSettings(
            instances=[
                InstanceSettings(
                    PG_INSTANCE, primary_ip=pg_ip, private_ip=pg_ip, psc=False, serve=False
                ),
                InstanceSettings(
                    ECHO_INSTANCE, primary_ip=echo_ip, private_ip=echo_ip, psc=False, serve=False
                ),
            ],
            postgres_max_connections=300,
            cert_ttl=6 * 3600,
            token_ttl=6 * 3600,
        )
    )
    emulator = thread.start()
    pg = emulator.postgres
    assert pg is not None
    # Instance sides: stunnel terminates mutual TLS in front of PostgreSQL (as Cloud SQL's
    # server-side proxy does); a uvloop TLS echo server plays the no-database instance.
    pg_files = emulator.instance(PG_INSTANCE).write_server_files(work / "pg-instance")
    echo_files = emulator.instance(ECHO_INSTANCE).write_server_files(work / "echo-instance")
    stunnel = shutil.which("stunnel4") or shutil.which("stunnel")
    if stunnel is None:
        raise SystemExit("bench needs stunnel for the instance side: apt-get install stunnel4")
    (work / "instance-stunnel.conf").write_text(
        f"foreground = yes\npid =\nsyslog = no\n[pg]\naccept = {pg_ip}:3307\n"
        f"connect = {pg.host}:{pg.port}\ncert = {pg_files[0]}\nkey = {pg_files[1]}\n"
        f"CAfile = {pg_files[2]}\nverifyChain = yes\nsslVersionMin = TLSv1.3\n"
    )
    instance_side = bench.spawn([stunnel, str(work / "instance-stunnel.conf")])
    bench.spawn([PYTHON, "-m", "bench.echo", echo_ip, "3307", *map(str, echo_files)], ready="ready")
    plain_echo = free_port()
    bench.spawn([PYTHON, "-m", "bench.echo", "127.0.0.1", str(plain_echo)], ready="ready")
    _wait_port(pg_ip, 3307, instance_side)

    client_dir = work / "client"
    for inst, sub in ((PG_INSTANCE, "pg"), (ECHO_INSTANCE, "echo")):
        asyncio.run(_client_certificate(emulator, inst, client_dir / sub))
    endpoints = Endpoints(emulator, pg_ip, echo_ip, client_dir, stunnel)
    targets = {
        "direct": Target("direct", pg.port, plain_echo),
        **start_targets(bench, endpoints, workers=bench.plan.workers),
    }
    bench.extra["endpoints"] = endpoints

    env = {
        **os.environ,
        "PGPASSWORD": pg.password,
        "PGUSER": pg.user,
        "PGHOST": "127.0.0.1",
        "PGSSLMODE": "disable",
        "PGDATABASE": "postgres",
    }
    _psql(
        env,
        pg.port,
        f"DROP TABLE IF EXISTS bulk; CREATE UNLOGGED TABLE bulk AS SELECT g, "
        f"repeat(md5(g::text), 6) AS s FROM generate_series(1, {plan.bulk_rows}) g; "
        "CREATE UNLOGGED TABLE IF NOT EXISTS bulk_in (LIKE bulk)",
    )
    dump = work / "bulk.copy"
    subprocess.run(
        ["psql", "-X", "-p", str(pg.port), "-c", f"\\copy bulk TO '{dump}'"],
        env=env,
        check=True,
        capture_output=True,
    )
    subprocess.run(
        ["pgbench", "-i", "-q", "-s", str(plan.pgbench_scale), "-p", str(pg.port)],
        env=env,
        check=True,
        capture_output=True,
    )
    info = {"env": env, "dump": dump, "dump_bytes": dump.stat().st_size, "pg_port": pg.port}
    return thread, targets, info


def _psql(env: dict[str, str], port: int, sql: str) -> None:
    subprocess.run(
        ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-p", str(port), "-c", sql],
        env=env,
        check=True,
        capture_output=True,
    )


def _timed(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def _pgbench(env: dict[str, str], port: int, args: list[str]) -> tuple[float, float]:
    out = subprocess.run(
        ["pgbench", "-n", "-p", str(port), *args],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    tps = float(re.search(r"tps = ([\d.]+)", out).group(1))  # type: ignore[union-attr]
    latency = re.search(r"latency average = ([\d.]+) ms", out)
    return tps, float(latency.group(1)) if latency else 0.0


def _client(command: str, port: int, amount: int) -> dict[str, float]:
    out = subprocess.run(
        [PYTHON, "-m", "bench.clients", command, "127.0.0.1", str(port), str(amount)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


def workloads(bench: Bench, info: dict[str, Any]) -> list[tuple[str, Callable[[Target], None]]]:
    """workloads lists each measurement as (label, fn(target))."""
    env, plan = info["env"], bench.plan

    def bulk_out(t: Target) -> None:
        seconds = _timed(
            ["psql", "-X", "-p", str(t.pg_port), "-c", "\\copy bulk TO '/dev/null'"], env
        )
        bench.record("bulk COPY TO STDOUT (MB/s)", t.name, info["dump_bytes"] / seconds / 1e6)

    def bulk_in(t: Target) -> None:
        _psql(env, info["pg_port"], "TRUNCATE bulk_in")
        seconds = _timed(
            ["psql", "-X", "-p", str(t.pg_port), "-c", f"\\copy bulk_in FROM '{info['dump']}'"], env
        )
        bench.record("bulk COPY FROM STDIN (MB/s)", t.name, info["dump_bytes"] / seconds / 1e6)

    def select(clients: int) -> Callable[[Target], None]:
        def run(t: Target) -> None:
            tps, latency = _pgbench(
                env,
                t.pg_port,
                [
                    "-S",
                    "-M",
                    "prepared",
                    "-c",
                    str(clients),
                    "-j",
                    str(min(clients, 2)),
                    "-T",
                    str(plan.pgbench_seconds),
                ],
            )
            bench.record(f"pgbench -S, {clients} clients (TPS)", t.name, tps)
            bench.record(f"pgbench -S, {clients} clients (latency ms)", t.name, latency)

        return run

    def connect(t: Target) -> None:
        tps, _ = _pgbench(
            env, t.pg_port, ["-S", "-C", "-c", "8", "-j", "2", "-T", str(plan.connect_seconds)]
        )
        bench.record("pgbench -C -S, 8 clients (connections/s)", t.name, tps)

    def storm(t: Target) -> None:
        result = _client("storm", t.echo_port, plan.storm)
        bench.record(
            f"storm of {plan.storm} connections (connections/s)",
            t.name,
            result["connections_per_second"],
        )
        bench.record(f"storm of {plan.storm} connections (p50 ms)", t.name, result["p50_ms"])
        bench.record(f"storm of {plan.storm} connections (p99 ms)", t.name, result["p99_ms"])

    def stream(t: Target) -> None:
        result = _client("stream", t.echo_port, plan.stream_mb)
        bench.record("TLS echo stream (MB/s, both ways)", t.name, result["megabytes_per_second"])

    found: list[tuple[str, Callable[[Target], None]]] = [
        ("bulk out", bulk_out),
        ("bulk in", bulk_in),
    ]
    found += [(f"pgbench -S c={c}", select(c)) for c in plan.pgbench_clients]
    found += [("pgbench -C", connect), ("storm", storm), ("echo stream", stream)]
    return found


def idle_scale(bench: Bench, progress: Progress) -> None:
    """idle_scale holds many idle connections and reads each relay's memory, cycle by cycle.

    Every target starts afresh for it, so earlier workloads' heap does not hide or inflate
    the cost of a connection, and growth across cycles shows a leak.
    """
    first_fresh = len(bench.procs)
    fresh = start_targets(bench, bench.extra["endpoints"], label="-idle")
    for target in (t for t in fresh.values() if t.pid):
        # One connection first: certificates fetched, session ticket in hand.
        _client("storm", target.echo_port, 1)
        start = rss_kib(target.pid)
        bench.record("idle: RSS MB at start", target.name, start / 1024)
        for n in bench.plan.idle:
            for cycle in range(bench.plan.idle_cycles):
                progress.step(f"idle {n} via {target.name} cycle {cycle + 1}")
                holder = subprocess.Popen(
                    [
                        PYTHON,
                        "-m",
                        "bench.clients",
                        "hold",
                        "127.0.0.1",
                        str(target.echo_port),
                        str(n),
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                assert holder.stdout is not None and holder.stdin is not None
                holder.stdout.readline()
                time.sleep(0.5)
                during = rss_kib(target.pid)
                holder.stdin.close()
                holder.wait(60)
                time.sleep(1.0)
                after = rss_kib(target.pid)
                # Against the fresh process's RSS: memory reused from an earlier, larger
                # cycle still counts as what n connections need.
                bench.record(
                    f"idle {n}: KB per open connection", target.name, (during - start) * 1.024 / n
                )
                bench.record(
                    f"idle {n}: RSS MB after close, cycle {cycle + 1}", target.name, after / 1024
                )
    for proc in bench.procs[first_fresh:]:
        proc.terminate()


def summarize(bench: Bench, order: list[str]) -> tuple[str, dict[str, Any]]:
    """summarize turns the measurements into a Markdown table and JSON-ready data."""
    medians = {
        w: {t: statistics.median(v) for t, v in per.items()} for w, per in bench.results.items()
    }
    ratios = [(v, "haproxy") for v in order if v.startswith("sqlproxy")] + [("sqlproxy", "direct")]
    head = "| workload | " + " | ".join(order) + " | "
    head += " | ".join(f"{a} / {b}" for a, b in ratios) + " |"
    lines = [head, "|" + "---|" * (len(order) + len(ratios) + 1)]
    for workload, per in medians.items():
        cells = [f"{per[t]:,.1f}" if t in per else "—" for t in order]
        cells += [
            f"{per[a] / per[b]:.2f}x" if per.get(a) and per.get(b) else "—" for a, b in ratios
        ]
        lines.append(f"| {workload} | " + " | ".join(cells) + " |")
    extra = {k: v for k, v in bench.extra.items() if k != "endpoints"}
    data = {"medians": medians, "samples": bench.results, **extra}
    return "\n".join(lines) + "\n", data


def charts(data: dict[str, Any], out: Path) -> list[Path]:
    """charts draws one bar chart per workload when matplotlib is installed."""
    try:
        import matplotlib  # noqa: PLC0415 - optional extra

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return []
    paths = []
    for i, (workload, per) in enumerate(data["medians"].items()):
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.bar(list(per), list(per.values()), color="#4477aa")
        ax.set_title(workload, fontsize=9)
        fig.tight_layout()
        path = out / f"chart-{i:02d}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths


def machine() -> str:
    """machine describes the host the numbers come from."""
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem = int(Path("/proc/meminfo").read_text().split()[1]) // (1024 * 1024)
    versions = []
    for tool, flag in (("haproxy", "-v"), ("stunnel4", "-version"), ("psql", "--version")):
        if shutil.which(tool):
            out = subprocess.run([tool, flag], capture_output=True, text=True, check=False)
            versions.append((out.stdout + out.stderr).strip().splitlines()[0][:60])
    return (
        f"{os.cpu_count()} x {cpu}, {mem} GiB, Linux {platform.release()}, Python "
        f"{platform.python_version()}; " + "; ".join(versions)
    )


@contextlib.contextmanager
def workdir(path: Path | None) -> Iterator[Path]:
    """workdir is a scratch directory for configs, certificates and the COPY file."""
    tmp = Path(tempfile.mkdtemp(prefix="sqlproxy-bench-", dir="/var/tmp"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """main runs the whole benchmark and writes results.md, results.json and charts."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny sizes, 1 rep")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 3)")
    parser.add_argument("--out", type=Path, default=Path("bench/out"), help="output directory")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated workload names to run (e.g. storm,idle); default: all",
    )
    args = parser.parse_args(argv)
    plan = Plan.quick() if args.quick else Plan()
    if args.reps:
        plan.reps = args.reps
    args.out.mkdir(parents=True, exist_ok=True)
    failure: Exception | None = None
    order: list[str] = []
    with workdir(None) as work:
        bench = Bench(plan, work)
        thread = None
        try:
            thread, targets, info = setup(bench)
            order = list(targets)
            only = [w.strip() for w in args.only.split(",") if w.strip()]
            runs = [r for r in workloads(bench, info) if not only or any(o in r[0] for o in only)]
            run_idle = not only or "idle" in only
            measured = sum(1 for t in targets.values() if t.pid)
            idle_steps = run_idle * measured * len(plan.idle) * plan.idle_cycles
            progress = Progress(plan.reps * len(runs) * len(order) + idle_steps)
            for rep in range(plan.reps):
                for label, run in runs:
                    for name in order:  # interleaved: A B C A B C ...
                        progress.step(f"rep {rep + 1} {label} via {name}")
                        run(targets[name])
            if run_idle:
                idle_scale(bench, progress)
            progress.close()
        except Exception as exc:
            failure = exc
        finally:
            bench.stop()
            if thread is not None:
                thread.stop()
    bench.extra.update(
        {
            "machine": machine(),
            "command": "python -m bench.run "
            + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "plan": plan.__dict__,
        }
    )
    table, data = summarize(bench, order)
    (args.out / "results.json").write_text(json.dumps(data, indent=2, default=str))
    (args.out / "results.md").write_text(
        f"Machine: {data['machine']}\n\nCommand: `{data['command']}` ({data['date']}), "
        f"medians of {plan.reps} interleaved repetitions.\n\n{table}"
    )
    charts(data, args.out)
    print(table)
    if failure is not None:
        raise failure
    return 0


if __name__ == "__main__":
    sys.exit(main())
