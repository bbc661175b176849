"""Prometheus metrics: read from the proxy's own counters at scrape time, plus histograms."""

from __future__ import annotations

import platform
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sqlproxy import __version__

if TYPE_CHECKING:
    from sqlproxy.server import ProxyServer

DEFAULT_NAMESPACE = "sqlproxy"
WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30, 60)
DIAL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """Metrics owns the registry: histograms observed per connection, and a collector that
    reads the server's counters when scraped (nothing is done per relayed byte)."""

    def __init__(self, namespace: str = DEFAULT_NAMESPACE) -> None:
        self.namespace = namespace or DEFAULT_NAMESPACE
        self.registry = CollectorRegistry(auto_describe=True)
        self.admission_wait = Histogram(
            "admission_wait_seconds",
            "Time clients waited for a connection slot (admitted or refused).",
            ["instance"],
            namespace=self.namespace,
            registry=self.registry,
            buckets=WAIT_BUCKETS,
        )
        self.dial_latency = Histogram(
            "dial_latency_seconds",
            "Time to open a tunnel: certificate, TCP connect and TLS handshake.",
            ["instance"],
            namespace=self.namespace,
            registry=self.registry,
            buckets=DIAL_BUCKETS,
        )
        self._server: ProxyServer | None = None
        self.registry.register(_StateCollector(self))

    def bind(self, server: ProxyServer) -> None:
        """bind points the scrape-time collector at a running server."""
        self._server = server

    @property
    def server(self) -> ProxyServer | None:
        """server is the proxy being measured, once bound."""
        return self._server


class _StateCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        ns = self._metrics.namespace
        info = GaugeMetricFamily(
            f"{ns}_build_info",
            "sqlproxy build information.",
            labels=["version", "python"],
        )
        info.add_metric([__version__, platform.python_version()], 1)
        yield info
        server = self._metrics.server
        if server is None:
            return
        names = sorted({i.name for i in server.config.instances})
        gauges = {
            "open": GaugeMetricFamily(
                f"{ns}_open_connections", "Sessions open now (admitted).", labels=["instance"]
            ),
            "waiting": GaugeMetricFamily(
                f"{ns}_waiting_connections",
                "Clients waiting for a slot now.",
                labels=["instance"],
            ),
            "expiry": GaugeMetricFamily(
                f"{ns}_certificate_expiry_timestamp_seconds",
                "When the current ephemeral certificate expires (Unix time).",
                labels=["instance"],
            ),
        }
        accepted = CounterMetricFamily(
            f"{ns}_connections_accepted", "Client connections accepted.", labels=["instance"]
        )
        refused = CounterMetricFamily(
            f"{ns}_connections_refused",
            "Clients refused, by reason (full, queue-full, protocol-error, startup-timeout, "
            "tls-required).",
            labels=["instance", "reason"],
        )
        dial_failures = CounterMetricFamily(
            f"{ns}_dial_failures", "Failed dials, by cause.", labels=["instance", "cause"]
        )
        cancels = CounterMetricFamily(
            f"{ns}_cancel_requests", "Cancel requests forwarded.", labels=["instance"]
        )
        relayed = CounterMetricFamily(
            f"{ns}_bytes", "Bytes relayed, by direction.", labels=["instance", "direction"]
        )
        refreshes = CounterMetricFamily(
            f"{ns}_certificate_refreshes",
            "Certificate refreshes, by result.",
            labels=["instance", "result"],
        )
        live = server.live_bytes()
        for name in names:
            stats = server.stats[name]
            admission = server.admission.states[name]
            gauges["open"].add_metric([name], admission.open)
            gauges["waiting"].add_metric([name], admission.waiting)
            accepted.add_metric([name], stats.accepted)
            for reason, count in sorted((stats.refused + admission.refused_total).items()):
                refused.add_metric([name, reason], count)
            for cause, count in sorted(stats.dial_failures.items()):
                dial_failures.add_metric([name, cause], count)
            cancels.add_metric([name], stats.cancels)
            from_client, to_client = live.get(name, (0, 0))
            relayed.add_metric([name, "to_instance"], stats.bytes_to_instance + from_client)
            relayed.add_metric([name, "to_client"], stats.bytes_to_client + to_client)
            refreshes.add_metric([name, "ok"], stats.refresh_ok)
            refreshes.add_metric([name, "failed"], stats.refresh_failed)
            if stats.cert_expiry:
                gauges["expiry"].add_metric([name], stats.cert_expiry)
        yield from gauges.values()
        yield from (accepted, refused, dial_failures, cancels, relayed, refreshes)
