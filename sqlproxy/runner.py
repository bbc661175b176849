"""Running a command's main coroutine on the chosen event loop until it is asked to stop."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Coroutine
from typing import Any

import uvloop

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class Stop:
    """Stop is the shutdown request: set once by a signal or /quitquitquit, with its reason."""

    def __init__(self) -> None:
        self.requested = asyncio.Event()
        self.reason: str | None = None

    def request(self, reason: str) -> None:
        """request asks for shutdown; the first reason wins."""
        if self.reason is None:
            self.reason = reason
        self.requested.set()

    def exit_code(self, *, exit_zero_on_sigterm: bool = False) -> int:
        """exit_code is Google's proxy's code for the reason: 130 SIGINT, 143 SIGTERM, else 0."""
        if self.reason == "SIGINT":
            return EXIT_SIGINT
        if self.reason == "SIGTERM":
            return EXIT_OK if exit_zero_on_sigterm else EXIT_SIGTERM
        return EXIT_OK


Main = Callable[[Stop], Coroutine[Any, Any, int | None]]


def run_until_signal(loop_name: str, main: Main) -> int:
    """run_until_signal runs main(stop) and returns its exit code.

    This is the one place that installs signal handlers; they only set the stop request. The
    first SIGINT or SIGTERM asks main to shut down gracefully; a second SIGINT cancels it at
    once (exit 130). When main returns None, the code follows the stop reason.
    """
    forced: list[bool] = []

    async def runner() -> int:
        stop = Stop()
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def on_signal(signum: int) -> None:
            name = signal.Signals(signum).name
            if stop.reason is not None and name == "SIGINT":
                forced.append(True)
                task.cancel()
                return
            stop.request(name)

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum)
        try:
            code = await main(stop)
        except asyncio.CancelledError:
            if forced:
                return EXIT_SIGINT
            raise
        return stop.exit_code() if code is None else code

    if loop_name == "uvloop":
        return uvloop.run(runner())
    return asyncio.run(runner())
