"""A podman harness for the container tests: throwaway storage, an offline base image.

No Docker engine and no registry here: podman builds and runs the project's Dockerfile and
compose files, from a Debian base made with debootstrap and tagged as the Dockerfile's FROM.
Everything machine-specific lives here, never in the Dockerfile (see
../shared/reference/containers.md for the recipe).

Run as a script (``python -m tests.podman``) it prepares the base image ahead of the tests.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

BASE_IMAGE = "docker.io/library/python:3.11-slim"
HOME = Path(os.environ.get("SQLPROXY_PODMAN_HOME", "/var/tmp/sqlproxy-podman"))
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


class Unavailable(Exception):
    """Unavailable says why podman cannot run here (the tests then skip with it)."""


def env() -> dict[str, str]:
    """env points podman at this harness's configuration and storage."""
    return {
        **os.environ,
        "CONTAINERS_CONF": str(HOME / "containers.conf"),
        "CONTAINERS_STORAGE_CONF": str(HOME / "storage.conf"),
    }


def podman(
    *args: str, check: bool = True, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    """podman runs one podman command with the harness's configuration."""
    result = subprocess.run(
        ["podman", *args],
        capture_output=True,
        text=True,
        env=env(),
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return result


def _write_config() -> None:
    HOME.mkdir(parents=True, exist_ok=True)
    hard = (
        subprocess.run(
            ["sh", "-c", "ulimit -Hn"], capture_output=True, text=True, check=False
        ).stdout.strip()
        or "20000"
    )
    (HOME / "containers.conf").write_text(
        "[containers]\n"
        f'default_ulimits = ["nofile={hard}:{hard}", "nproc=32768:32768"]\n'
        "[engine]\n"
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n'
        'runtime = "runc"\n'
    )
    (HOME / "storage.conf").write_text(
        "[storage]\n"
        'driver = "overlay"\n'
        f'graphroot = "{HOME / "storage"}"\n'
        f'runroot = "{HOME / "run"}"\n'
    )


def _mirror() -> str:
    for path in [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]:
        if path.is_file():
            match = re.search(r"(?:URIs:|deb)\s+(https?://\S+/debian)\b", path.read_text())
            if match:
                return match.group(1)
    return "http://deb.debian.org/debian"


def _bootstrap_base() -> None:
    """_bootstrap_base makes BASE_IMAGE from Debian bookworm with debootstrap."""
    rootfs = Path(tempfile.mkdtemp(prefix="sqlproxy-rootfs-", dir="/var/tmp"))
    try:
        subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=python3,python3-venv,python3-pip,ca-certificates",
                "bookworm",
                str(rootfs),
                _mirror(),
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=1200,
        )
        for marker in rootfs.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
            marker.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(
            ["podman", "import", "-", "localhost/python:bookworm"],
            stdin=tar.stdout,
            env=env(),
            check=True,
            capture_output=True,
            timeout=600,
        )
        tar.wait()
        podman("tag", "localhost/python:bookworm", BASE_IMAGE)
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)


def prepare() -> None:
    """prepare checks podman can run here and makes sure the base image exists."""
    missing = [t for t in ("podman", "runc", "debootstrap") if shutil.which(t) is None]
    if missing:
        raise Unavailable(
            f"not installed: {', '.join(missing)} (apt-get install podman runc "
            "debootstrap uidmap slirp4netns fuse-overlayfs)"
        )
    if os.geteuid() != 0:
        raise Unavailable("the podman harness needs root (debootstrap, rootful podman)")
    _write_config()
    if podman("image", "exists", BASE_IMAGE, check=False).returncode != 0:
        _bootstrap_base()


def build(tag: str, dockerfile: str = "Dockerfile", context: str = ".") -> None:
    """build builds an image from the project's Dockerfile, keeping HEALTHCHECK."""
    podman(
        "build",
        "--format",
        "docker",
        "-v",
        f"{CA_BUNDLE}:{CA_BUNDLE}:ro",
        "-f",
        dockerfile,
        "-t",
        tag,
        context,
        timeout=1800,
    )


if __name__ == "__main__":
    prepare()
    print(f"base image {BASE_IMAGE} ready in {HOME}")
