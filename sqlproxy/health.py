"""Health: the startup, liveness and readiness answers, from the proxy's own state."""

from __future__ import annotations

from sqlproxy.limits import Admission


class Health:
    """Health says whether the proxy has started, is alive, and should get new connections."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self.started = False
        self.shutting_down = False

    def readiness(self) -> tuple[bool, str]:
        """readiness is (ready, why): not while starting, shutting down, or saturated."""
        if not self.started:
            return False, "starting"
        if self.shutting_down:
            return False, "shutting down"
        if self._admission.saturated:
            return False, (
                f"saturated: {self._admission.open} of {self._admission.max_connections} "
                "connections in use"
            )
        return True, "ok"
