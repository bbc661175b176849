"""The benchmark harness keeps working: a --quick run covers every workload and target.

It asserts nothing about speed (speed is measured in bench/, see bench/RESULTS.md)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(
    not (shutil.which("stunnel4") or shutil.which("stunnel")),
    reason="the harness needs stunnel for the instance side (apt-get install stunnel4)",
)
def test_quick_run_produces_every_result(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    medians = data["medians"]
    expected_targets = {"direct", "sqlproxy", "sqlproxy x2", "stunnel"} | (
        {"haproxy"} if shutil.which("haproxy") else set()
    )
    for workload in (
        "bulk COPY TO STDOUT (MB/s)",
        "bulk COPY FROM STDIN (MB/s)",
        "pgbench -S, 4 clients (TPS)",
        "pgbench -C -S, 8 clients (connections/s)",
        "storm of 100 connections (connections/s)",
        "TLS echo stream (MB/s, both ways)",
    ):
        assert set(medians[workload]) == expected_targets, workload
        assert all(value > 0 for value in medians[workload].values())
    # Memory is measured (tiny runs are noise, so no sign is asserted).
    assert isinstance(medians["idle 100: KB per open connection"]["sqlproxy"], float)
    table = (tmp_path / "results.md").read_text()
    assert "| workload | direct | sqlproxy | sqlproxy x2 |" in table
    assert "sqlproxy / haproxy" in table
    assert data["machine"] and data["command"].startswith("python -m bench.run --quick")
