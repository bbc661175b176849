"""sqlproxy: a Python-native Cloud SQL Auth Proxy for PostgreSQL."""

from __future__ import annotations

__version__ = "0.1.0"

from sqlproxy.config import Config, ConfigError, Instance, IPType
from sqlproxy.server import BoundAddress, ProxyServer, serve

__all__ = [
    "BoundAddress",
    "Config",
    "ConfigError",
    "IPType",
    "Instance",
    "ProxyServer",
    "__version__",
    "serve",
]
