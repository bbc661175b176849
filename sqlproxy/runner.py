"""Running a command's main coroutine on the chosen event loop until a signal arrives."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Coroutine
from typing import Any

import uvloop

EXIT_SIGINT = 130
EXIT_SIGTERM = 143


def run_until_signal(
    loop_name: str, main: Callable[[asyncio.Event], Coroutine[Any, Any, None]]
) -> int:
    """run_until_signal runs main(stop) until SIGINT/SIGTERM; returns Go's exit codes.

    This is the one place that installs signal handlers; they only set the stop event.
    """
    received: list[int] = []

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            received.append(signum)
            stop.set()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum)
        await main(stop)

    if loop_name == "uvloop":
        uvloop.run(runner())
    else:
        asyncio.run(runner())
    if not received:
        return 0
    return EXIT_SIGINT if received[0] == signal.SIGINT else EXIT_SIGTERM
