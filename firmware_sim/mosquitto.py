"""Debian's Mosquitto as a broker other than fleetgate: the simulator's bridge upstream, and
(through ``tests/sdk_helpers.py``) the device SDK's and the bridge's tests.

TLS 1.3 only on a free loopback port, a given server certificate, client certificates required
and verified against a given CA file, the certificate's CN as user name; persistent sessions
saved after every change. Started, frozen, stopped and killed by its PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from firmware_sim.deployment import free_port


class Mosquitto:
    """Debian's mosquitto on 127.0.0.1:<port>, started and stopped by PID."""

    def __init__(
        self,
        directory: Path,
        *,
        cafile: Path,
        certfile: Path,
        keyfile: Path,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.directory = directory
        self.port = free_port()
        self.log = directory / "mosquitto.log"
        self.config = directory / "mosquitto.conf"
        directory.mkdir(parents=True, exist_ok=True)
        lines = [
            "per_listener_settings false",
            "user root" if os.geteuid() == 0 else "",  # the CA directory is 0700 root
            "persistence true",
            f"persistence_location {directory}/",
            "autosave_interval 1",  # with autosave_on_changes: save after every change, so
            "autosave_on_changes true",  # sessions survive even a SIGKILL
            f"log_dest file {self.log}",
            "log_type all",
            "connection_messages true",
            "set_tcp_nodelay true",  # else Nagle delays each CONNACK and PUBACK by ~40 ms
            f"listener {self.port} 127.0.0.1",
            f"cafile {cafile}",
            f"certfile {certfile}",
            f"keyfile {keyfile}",
            "require_certificate true",
            "use_identity_as_username true",
            "tls_version tlsv1.3",
            *extra,
        ]
        self.config.write_text("\n".join(line for line in lines if line) + "\n")
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> Mosquitto:
        assert self._process is None
        earlier = len(self.log_text())  # a restart appends to the log of the earlier run
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"  # Debian's package
        self._process = subprocess.Popen(  # noqa: S603 - Mosquitto, our configuration
            [binary, "-c", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        while "listen socket on port" not in self.log_text()[earlier:]:
            if self._process.poll() is not None:
                _, err = self._process.communicate()
                raise RuntimeError(f"mosquitto exited: {err.decode()} {self.log_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto did not listen within 10 s: {self.log_text()}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """SIGTERM (mosquitto saves its persistent sessions), then wait for the PID to exit."""
        process, self._process = self._process, None
        if process is None:
            return
        os.kill(process.pid, signal.SIGTERM)
        os.kill(process.pid, signal.SIGCONT)  # a frozen broker handles the SIGTERM at once
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10)
        if process.stderr is not None:
            process.stderr.close()

    def freeze(self) -> None:
        """SIGSTOP: the broker keeps its connections open but answers nothing, as a hung host."""
        assert self._process is not None
        os.kill(self._process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT after :meth:`freeze`."""
        assert self._process is not None
        os.kill(self._process.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: the broker dies at once, as on a crash or power loss."""
        process, self._process = self._process, None
        assert process is not None
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)
        if process.stderr is not None:
            process.stderr.close()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


__all__ = ["Mosquitto"]
