"""A real PostgreSQL server for the shared-state tests, started by the test tier itself.

``initdb`` + ``pg_ctl`` in a temporary directory, on a free loopback port, trust auth, one database
``vlmrag``; run as ``nobody`` when the tests run as root (PostgreSQL refuses to run as root). The
binaries come from Debian's ``postgresql`` package (``/usr/lib/postgresql/<major>/bin``), which
``make postgres`` installs when it is missing. Without them the tests skip with the reason, except in
CI (``CI`` set), where that is a failure.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def _bindir() -> Path | None:
    for initdb in sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True):
        return Path(initdb).parent
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_user(argv: list[str]) -> list[str]:
    """``argv`` run as ``nobody`` when we are root (PostgreSQL will not run as root)."""
    if os.geteuid() != 0:
        return argv
    return ["runuser", "-u", "nobody", "--", *argv]


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A SQLAlchemy URL of a fresh PostgreSQL database; the server stops at the end of the session."""
    bindir = _bindir()
    if bindir is None:
        reason = "PostgreSQL is not installed (`make postgres` installs Debian's package)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the PostgreSQL tests: {reason}", pytrace=False)
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="vlmrag-pg-"))
    data = root / "data"
    if os.geteuid() == 0:
        os.chown(root, 65534, 65534)  # nobody:nogroup
    port = _free_port()
    log = root / "server.log"

    def run(*argv: str) -> None:
        done = subprocess.run(_as_user([str(bindir / argv[0]), *argv[1:]]), check=False, capture_output=True,
                              text=True, timeout=120, cwd=root)
        if done.returncode != 0:
            pytest.fail(f"{argv[0]} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}",
                        pytrace=False)

    run("initdb", "-D", str(data), "-U", "vlmrag", "--auth=trust", "-E", "UTF8", "--no-sync")
    run("pg_ctl", "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
        f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    try:
        run("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "vlmrag", "vlmrag")
        yield f"postgresql+psycopg://vlmrag@127.0.0.1:{port}/vlmrag"
    finally:
        subprocess.run(_as_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
                       check=False, capture_output=True, timeout=60, cwd=root)
        shutil.rmtree(root, ignore_errors=True)
