"""One nats-server on this machine, started and supervised by ``fleetgate serve broker``
(``[fabric] local = true``; issue 12, "one machine, durable").

A single-machine install gets durable sessions, queues and retained messages the way a cluster
does, from one JetStream server with one replica, instead of a second persistence mechanism.
The server listens on loopback only, keeps its store in ``<home>/fabric/jetstream`` and admits
one user, ``fleetgate``, whose password is made up on first start and kept in an owner-only
file: no other local process reads or writes device subjects without it. It is started and
stopped by its PID (recorded in ``<home>/fabric/nats-local.pid``, so a server left behind by a
killed broker is stopped before a new one starts), and started again, with a log line, if it
dies while the broker runs. The node reconnects on its own meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

from broker.fabric.node import FabricUnavailable, check_server_version
from fleetgate.config import Config, FabricSettings
from fleetgate.keyfiles import write_secret

log = logging.getLogger("fleetgate.fabric.local")

PROJECT_BINARY = Path(__file__).resolve().parents[2] / ".tools" / "nats" / "usr/sbin/nats-server"
"""Where ``scripts/get-nats-server.sh`` puts Debian 13's nats-server 2.10.27."""

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
RESTART_DELAYS_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
STABLE_S = 30.0  # a server that ran this long starts the delays over


def find_binary(settings: FabricSettings) -> Path:
    """``local_binary``, else the project's own copy, else ``nats-server`` on PATH; refused
    with what to do if none is there or it is older than 2.10."""
    if settings.local_binary:
        candidates = [Path(settings.local_binary)]
    else:
        on_path = shutil.which("nats-server")
        candidates = [PROJECT_BINARY, *([Path(on_path)] if on_path else [])]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            check_server_version(binary_version(candidate))
            return candidate
    raise FabricUnavailable(
        "[fabric] local = true needs a nats-server 2.10 or newer, and there is none at "
        f"{', '.join(str(c) for c in candidates)}: run scripts/get-nats-server.sh (it unpacks "
        "Debian 13's nats-server into .tools/nats) or set [fabric] local_binary"
    )


def binary_version(binary: Path) -> str:
    out = subprocess.run(  # noqa: S603 - the configured or the project's nats-server
        [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
    ).stdout
    found = re.search(r"v(\d+\.\d+\.\d+)", out)
    if found is None:
        raise FabricUnavailable(f"{binary} --version said {out.strip()!r}: not a nats-server")
    return found.group(1)


class LocalNats:
    """``async with LocalNats(config):`` runs the supervised server for the block."""

    def __init__(self, config: Config) -> None:
        assert config.fabric is not None and config.fabric.local
        self.settings = config.fabric
        self.directory = config.home / "fabric"
        self.conf = self.directory / "nats-local.conf"
        self.pid_file = self.directory / "nats-local.pid"
        self.password_file = config.data_path(self.settings.password_file)
        self.log_file = config.logs_dir / "nats-server.log"
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self._binary: Path | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        """Start the server and wait until it accepts connections (or say why not)."""
        self._binary = await asyncio.to_thread(find_binary, self.settings)
        self._write_config()
        await asyncio.to_thread(self._stop_left_over)
        await self._spawn()
        await self._wait_listening()
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())
        log.info(
            "local nats-server started",
            extra={"pid": self.pid, "port": self.settings.local_port, "store": str(self._store)},
        )

    async def stop(self) -> None:
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        process = self.process
        if process is not None and process.returncode is None:
            process.send_signal(signal.SIGTERM)  # lame-duck off: a clean JetStream shutdown
            try:
                await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                process.kill()
                await process.wait()
        self.pid_file.unlink(missing_ok=True)
        log.info("local nats-server stopped")

    async def __aenter__(self) -> LocalNats:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def _store(self) -> Path:
        return self.directory / "jetstream"

    def _write_config(self) -> None:
        """Loopback only, JetStream in the data directory, one user (password made up once)."""
        if not self.password_file.exists():
            write_secret(self.password_file, secrets.token_urlsafe(32).encode() + b"\n")
        password = self.password_file.read_text().strip()
        text = f"""# written by `fleetgate serve broker` ([fabric] local = true) at each start
server_name: fleetgate-local
listen: 127.0.0.1:{self.settings.local_port}
jetstream {{
  store_dir: "{self._store}"
}}
authorization {{
  user: "{self.settings.user}"
  password: "{password}"
}}
"""
        write_secret(self.conf, text.encode())  # it holds the password: 0600

    def _stop_left_over(self) -> None:
        """A server this data directory's broker started and did not stop (the broker was
        killed): found by its PID file, stopped by that PID if it still runs our config."""
        try:
            pid = int(self.pid_file.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return
        if str(self.conf).encode() not in cmdline:
            return
        log.warning("stopping a local nats-server left running", extra={"pid": pid})
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    async def _spawn(self) -> None:
        assert self._binary is not None
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as out:
            self.process = await asyncio.create_subprocess_exec(
                str(self._binary),
                "-c",
                str(self.conf),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a ^C to the broker's terminal reaches the broker only
            )
        self.pid_file.write_text(f"{self.process.pid}\n")

    async def _wait_listening(self) -> None:
        assert self.process is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_S
        while True:
            if self.process.returncode is not None:
                raise FabricUnavailable(
                    f"the local nats-server exited at start (code {self.process.returncode}): "
                    f"{self._log_tail()}"
                )
            try:
                if await self._answers():
                    return
            except OSError:
                pass
            if loop.time() > deadline:
                raise FabricUnavailable(
                    f"the local nats-server did not listen on 127.0.0.1:"
                    f"{self.settings.local_port} within {START_TIMEOUT_S:.0f} s: "
                    f"{self._log_tail()}"
                )
            await asyncio.sleep(0.05)

    async def _answers(self) -> bool:
        """Whether our server (not something else on the port) greets with its INFO."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.settings.local_port)
        try:
            line = await asyncio.wait_for(reader.readline(), 1.0)
        except TimeoutError:
            return False
        finally:
            writer.close()
        return line.startswith(b"INFO ") and b'"server_name":"fleetgate-local"' in line

    def _log_tail(self) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").splitlines()[-3:]
        except OSError:
            return f"(no log at {self.log_file})"
        return " | ".join(lines) + f" (log: {self.log_file})"

    async def _supervise(self) -> None:
        """Start the server again whenever it exits, waiting longer each time it dies soon."""
        attempt = 0
        while True:
            assert self.process is not None
            started = time.monotonic()
            code = await self.process.wait()
            if self._stopping:
                return
            attempt = 0 if time.monotonic() - started > STABLE_S else attempt + 1
            delay = RESTART_DELAYS_S[min(attempt, len(RESTART_DELAYS_S) - 1)]
            log.error(
                "local nats-server exited: restarting",
                extra={"pid": self.process.pid, "code": code, "delay_s": delay},
            )
            await asyncio.sleep(delay)
            try:
                await self._spawn()
            except OSError as exc:
                log.error("local nats-server could not be started again: %s", exc)
                continue
            self.restarts += 1
            log.info("local nats-server restarted", extra={"pid": self.pid})
