"""A throwaway PostgreSQL server for the test session.

``postgres_server()`` runs ``initdb`` into a fresh temporary directory, starts ``postgres`` on a
free loopback TCP port below 32768 (outside Linux's ephemeral range, so it cannot collide with
outgoing connections) with its unix socket in the same directory, waits until it accepts
connections and yields a :class:`PostgresServer`. A test may stop it and start it again on the
same port (:meth:`PostgresServer.stop`, :meth:`PostgresServer.start`) to cause an outage. On
exit the server is stopped (``pg_ctl stop -m immediate``, then SIGKILL by PID as a fallback) and
the directory removed.

PostgreSQL refuses to run as root, so when the tests run as root every server command goes
through ``runuser -u postgres --`` and the directory is handed to the ``postgres`` user. The
binaries come from the Debian ``postgresql`` package (``/usr/lib/postgresql/<major>/bin``), which
``make test`` installs through scripts/bootstrap.sh; when they are missing this module raises
:class:`PostgresUnavailable` with that instruction, and the tests fail rather than skip.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SUPERUSER = "postgres"
OS_USER = "postgres"  # who runs the server when the tests run as root
START_TIMEOUT_S = 30
PORT_RANGE = (20000, 32767)  # below the Linux ephemeral range (32768-60999)

HINT = (
    "run `make test` (scripts/bootstrap.sh installs the Debian packages in "
    "scripts/debian-packages.txt, including postgresql), or as root: "
    "apt-get install --no-install-recommends postgresql"
)


class PostgresUnavailable(RuntimeError):
    """The throwaway server could not be started; the message says why and what to do."""


@dataclass(frozen=True)
class PostgresServer:
    """A running throwaway cluster: connect over TCP as the trusted superuser."""

    host: str
    port: int
    directory: Path

    def url(self, database: str = "postgres") -> str:
        """A SQLAlchemy URL for ``database`` using the psycopg 3 driver."""
        return f"postgresql+psycopg://{SUPERUSER}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create an empty database ``name`` and return its SQLAlchemy URL."""
        try:
            import psycopg
            from psycopg import sql
        except ImportError:
            raise PostgresUnavailable(
                "the psycopg driver is not installed in this environment; run `make test` "
                "(it installs fleetgate with the dev extra) or pip install 'psycopg[binary]'"
            ) from None
        conninfo = f"host={self.host} port={self.port} user={SUPERUSER} dbname=postgres"
        with psycopg.connect(conninfo, autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def stop(self) -> None:
        """Stop the server (``pg_ctl stop -m fast``: open connections are cut); the data stays,
        for :meth:`start`. Not ``immediate``: with ``synchronous_commit=off`` that would lose
        the last commits."""
        _stop(_as_server_user(), find_bindir(), self.directory / "data", mode="fast")

    def start(self) -> None:
        """Start the stopped server again on the same port; returns once it accepts
        connections."""
        _run(
            _start_command(_as_server_user(), find_bindir(), self.directory, self.port),
            "pg_ctl start",
        )


def find_bindir() -> Path:
    """The newest ``/usr/lib/postgresql/<major>/bin`` that has initdb, pg_ctl and postgres."""
    candidates = []
    for initdb in glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        bindir = Path(initdb).parent
        major = bindir.parent.name
        if major.isdigit() and all((bindir / b).exists() for b in ("pg_ctl", "postgres")):
            candidates.append((int(major), bindir))
    if not candidates:
        raise PostgresUnavailable(
            f"the PostgreSQL server binaries are not installed (no /usr/lib/postgresql/*/bin/"
            f"initdb); {HINT}"
        )
    return max(candidates)[1]


def _as_server_user() -> list[str]:
    """The command prefix that runs a server binary as a user PostgreSQL accepts."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(OS_USER)
    except KeyError:
        raise PostgresUnavailable(
            f"running as root, but there is no '{OS_USER}' OS user to run PostgreSQL as "
            f"(postgres refuses to run as root); {HINT}"
        ) from None
    if shutil.which("runuser") is None:
        raise PostgresUnavailable(
            "running as root, and `runuser` (Debian package util-linux) is missing, so "
            f"PostgreSQL cannot be started as '{OS_USER}'; {HINT}"
        )
    return ["runuser", "-u", OS_USER, "--"]


def _run(cmd: list[str], what: str) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=START_TIMEOUT_S)
    if result.returncode != 0:
        raise PostgresUnavailable(
            f"{what} failed (exit {result.returncode}): {' '.join(cmd)}\n"
            f"{result.stdout}{result.stderr}"
        )


def _start_command(prefix: list[str], bindir: Path, directory: Path, port: int) -> list[str]:
    options = (
        f"-p {port} -c listen_addresses=127.0.0.1 -k {directory} "
        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
        "-c max_connections=50 -c TimeZone=UTC"
    )
    data, log = directory / "data", directory / "postgres.log"
    return [
        *prefix,
        *(str(bindir / "pg_ctl"), "start", "-D", str(data), "-l", str(log)),
        *("-w", "-t", str(START_TIMEOUT_S), "-o", options),
    ]


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _candidate_ports(count: int) -> Iterator[int]:
    rng = random.Random()  # picking a port, not a secret
    tried = 0
    while tried < count:
        port = rng.randint(*PORT_RANGE)
        if _port_is_free(port):
            tried += 1
            yield port


def _server_pid(data: Path) -> int | None:
    try:
        first = (data / "postmaster.pid").read_text().split("\n", 1)[0]
    except OSError:
        return None
    return int(first) if re.fullmatch(r"\d+", first.strip()) else None


def _stop(prefix: list[str], bindir: Path, data: Path, mode: str = "immediate") -> None:
    pid = _server_pid(data)
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        subprocess.run(
            [*prefix, str(bindir / "pg_ctl"), "stop", "-D", str(data), "-m", mode, "-w"],
            capture_output=True,
            timeout=15,
        )
    if pid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def server_for_tests() -> Iterator[PostgresServer]:
    """:func:`postgres_server` as a pytest fixture's body: a server that cannot start fails the
    test (never a skip)."""
    import pytest

    try:
        with postgres_server() as server:
            yield server
    except PostgresUnavailable as exc:
        pytest.fail(f"cannot start the test PostgreSQL server: {exc}", pytrace=False)


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """Start a throwaway cluster, yield it, then stop it and delete its directory."""
    bindir = find_bindir()
    prefix = _as_server_user()
    # Under /tmp (world-traversable) so the postgres user can reach it even when TMPDIR or
    # pytest's basetemp is a root-only directory.
    base = "/tmp" if prefix else None  # mkdtemp: a private subdirectory
    directory = Path(tempfile.mkdtemp(prefix="fleetgate-pg-", dir=base))
    data = directory / "data"
    log = directory / "postgres.log"
    try:
        if prefix:
            shutil.chown(directory, user=OS_USER, group=OS_USER)
        _run(
            [
                *prefix,
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            ],
            "initdb",
        )
        server = None
        for port in _candidate_ports(5):
            result = subprocess.run(
                _start_command(prefix, bindir, directory, port),
                capture_output=True,
                text=True,
                timeout=START_TIMEOUT_S + 5,
            )
            if result.returncode == 0:
                server = PostgresServer("127.0.0.1", port, directory)
                break
            _stop(prefix, bindir, data)
            logged = log.read_text() if log.exists() else ""
            if "could not bind" not in logged and "already in use" not in logged:
                raise PostgresUnavailable(
                    f"PostgreSQL did not start (pg_ctl exit {result.returncode}):\n"
                    f"{result.stdout}{result.stderr}\n{logged}"
                )
        if server is None:
            raise PostgresUnavailable("PostgreSQL found no free loopback port in 5 attempts")
        try:
            yield server
        finally:
            _stop(prefix, bindir, data)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
