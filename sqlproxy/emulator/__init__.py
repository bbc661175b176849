"""A local stand-in for Cloud SQL and a GCE VM, for the demo, the tests and the benchmarks."""

from sqlproxy.emulator.core import (
    DEFAULT_INSTANCE,
    Emulator,
    EmulatorSettings,
    EmulatorThread,
    VirtualMachine,
)
from sqlproxy.emulator.instance import ConnectionRecord, EmulatedInstance, InstanceSettings
from sqlproxy.emulator.postgres import LocalPostgres, PostgresTarget

__all__ = [
    "DEFAULT_INSTANCE",
    "ConnectionRecord",
    "EmulatedInstance",
    "Emulator",
    "EmulatorSettings",
    "EmulatorThread",
    "InstanceSettings",
    "LocalPostgres",
    "PostgresTarget",
    "VirtualMachine",
]
