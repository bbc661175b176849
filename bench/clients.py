"""Load clients for the echo workloads, run as their own process; print one JSON result.

python -m bench.clients storm HOST PORT N      N simultaneous new connections
python -m bench.clients stream HOST PORT MB    MB through one connection and back
python -m bench.clients hold HOST PORT N       open N connections, hold until stdin closes
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time

import uvloop

from sqlproxy.pgwire import startup_message

# Every connection starts like PostgreSQL, so that sqlproxy's front door lets it through; the
# echo instance sends the startup packet back.
HELLO = startup_message({"user": "bench", "database": "bench"})


async def _open(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(HELLO)
    await reader.readexactly(len(HELLO))
    return reader, writer


async def storm(host: str, port: int, n: int) -> dict[str, float]:
    """storm opens n connections at once; each completes a round trip through the tunnel."""
    latencies: list[float] = []
    failures = 0

    async def one() -> None:
        nonlocal failures
        started = time.perf_counter()
        try:
            _, writer = await _open(host, port)
        except (OSError, asyncio.IncompleteReadError):
            failures += 1
            return
        latencies.append(time.perf_counter() - started)
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "connections_per_second": len(latencies) / elapsed,
        "p50_ms": statistics.median(latencies) * 1000 if latencies else 0.0,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000 if latencies else 0.0,
        "failures": failures,
    }


async def stream(host: str, port: int, megabytes: int) -> dict[str, float]:
    """stream pushes data through the tunnel to the echo server and reads it all back."""
    reader, writer = await _open(host, port)
    chunk = b"x" * (256 * 1024)
    total = megabytes * 1024 * 1024

    async def send() -> None:
        sent = 0
        while sent < total:
            writer.write(chunk)
            sent += len(chunk)
            await writer.drain()

    async def receive() -> None:
        got = 0
        while got < total:
            data = await reader.read(1 << 20)
            if not data:
                raise ConnectionError("closed early")
            got += len(data)

    started = time.perf_counter()
    await asyncio.gather(send(), receive())
    elapsed = time.perf_counter() - started
    writer.close()
    return {"megabytes_per_second": 2 * total / elapsed / 1e6}


async def hold(host: str, port: int, n: int) -> dict[str, float]:
    """hold opens n connections, reports, and keeps them until stdin closes."""
    conns = []
    for i in range(0, n, 200):
        conns += await asyncio.gather(*(_open(host, port) for _ in range(min(200, n - i))))
    print(json.dumps({"open": len(conns)}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for _, writer in conns:
        writer.close()
    return {"closed": len(conns)}


def main() -> None:
    """main runs one client command and prints its JSON result."""
    command, host, port, amount = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    fn = {"storm": storm, "stream": stream, "hold": hold}[command]
    print(json.dumps(uvloop.run(fn(host, port, amount))), flush=True)


if __name__ == "__main__":
    main()
