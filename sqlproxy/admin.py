"""HTTP endpoints: health checks and metrics, and the localhost-only admin /quitquitquit."""

from __future__ import annotations

import logging

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sqlproxy.config import Config
from sqlproxy.health import Health
from sqlproxy.metrics import Metrics
from sqlproxy.runner import Stop

logger = logging.getLogger(__name__)


def _health_app(health: Health, metrics: Metrics | None, config: Config) -> web.Application:
    app = web.Application()

    async def startup(_request: web.Request) -> web.Response:
        if health.started:
            return web.Response(text="ok")
        return web.Response(status=503, text="starting")

    async def liveness(_request: web.Request) -> web.Response:
        # Answering at all proves the event loop is running.
        return web.Response(text="ok")

    async def readiness(_request: web.Request) -> web.Response:
        ready, why = health.readiness()
        return web.Response(status=200 if ready else 503, text=why)

    async def scrape(_request: web.Request) -> web.Response:
        assert metrics is not None
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    if config.health_check:
        app.router.add_get("/startup", startup)
        app.router.add_get("/liveness", liveness)
        app.router.add_get("/readiness", readiness)
    if metrics is not None:
        app.router.add_get("/metrics", scrape)
    return app


def _admin_app(stop: Stop) -> web.Application:
    app = web.Application()

    async def quitquitquit(_request: web.Request) -> web.Response:
        logger.info("shutdown requested through /quitquitquit")
        stop.request("quitquitquit")
        return web.Response(text="shutting down")

    app.router.add_post("/quitquitquit", quitquitquit)
    app.router.add_get("/quitquitquit", quitquitquit)
    return app


async def _start(app: web.Application, host: str, port: int, what: str) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_address=True).start()
    except OSError as exc:
        await runner.cleanup()
        raise OSError(f"cannot serve {what} on {host}:{port}: {exc.strerror or exc}") from None
    logger.info("serving %s on %s:%d", what, host, port)
    return runner


async def start_endpoints(
    config: Config, health: Health, metrics: Metrics | None, stop: Stop
) -> list[web.AppRunner]:
    """start_endpoints starts the health/metrics server and the admin server, as configured."""
    runners: list[web.AppRunner] = []
    try:
        if config.health_check or metrics is not None:
            what = " and ".join(
                w
                for w, on in (
                    ("health checks", config.health_check),
                    ("metrics", metrics is not None),
                )
                if on
            )
            runners.append(
                await _start(
                    _health_app(health, metrics, config),
                    config.http_address,
                    config.http_port,
                    what,
                )
            )
        if config.quitquitquit:
            runners.append(
                await _start(_admin_app(stop), "localhost", config.admin_port, "/quitquitquit")
            )
    except OSError:
        for runner in runners:
            await runner.cleanup()
        raise
    return runners
