"""Virtual TPMs for tests and the simulator: swtpm "manufactured" with an EK certificate.

A :class:`TpmManufacturer` is a test TPM-manufacturer CA (``swtpm_localca``'s state directory:
a root CA and the issuing CA that signs EK certificates). :meth:`VirtualTpm.manufacture` runs
``swtpm_setup`` with private configuration files (the packaged ones keep the CA in a system
directory), serves the TPM on loopback TCP ports below 32768 and puts ``tpm2-abrmd`` in front of
it under its own D-Bus name. Every process is started here and stopped by its PID.

The tabrmd TCTI reaches its daemon through the *session* bus named by the environment variable
``DBUS_SESSION_BUS_ADDRESS``, and GLib keeps one session-bus connection per process, so every
TPM a process talks to sits on one :class:`DbusSession`; the bus names keep them apart.

swtpm 0.7.1 always writes two EK certificates: RSA-2048 (NV 0x01c00002) and ECC P-384 (NV
0x01c00016); there is no P-256 EK certificate. All state paths are absolute: swtpm fails (TPM
failure mode) on relative ones once it has changed directory.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DbusSession", "TpmManufacturer", "VirtualTpm", "VirtualTpmError", "quiet_tss_env"]

START_TIMEOUT_S = 10.0


class VirtualTpmError(RuntimeError):
    """A virtual TPM (swtpm, dbus-daemon, tpm2-abrmd) could not be manufactured or started."""


def quiet_tss_env() -> dict[str, str]:
    """tss2 logs expected misses (an absent EK NV index) as ERROR lines; silence its log."""
    return {"TSS2_LOG": "all+none"}


@dataclass(frozen=True)
class TpmManufacturer:
    """A test TPM-manufacturer CA, created by ``swtpm_localca`` on first use of ``directory``."""

    directory: Path

    @property
    def ca_certificate(self) -> Path:
        """The manufacturer's root: what an enrollment service's TPM trust store holds."""
        return self.directory / "swtpm-localca-rootca-cert.pem"

    @property
    def issuer_certificate(self) -> Path:
        """The intermediate CA that signs EK certificates (the station sends it as ``ek_chain``)."""
        return self.directory / "issuercert.pem"

    @property
    def issuer_key(self) -> Path:
        """The intermediate's key (certtool text, then PEM): tests re-sign EK certificates."""
        return self.directory / "signkey.pem"


class DbusSession:
    """A private ``dbus-daemon --session`` on a socket in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory.resolve()
        self.address = ""
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> DbusSession:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._process = subprocess.Popen(  # noqa: S603 (our own arguments)
            [
                _tool("dbus-daemon"),
                "--session",
                "--nofork",
                "--nopidfile",
                f"--address=unix:path={self.directory / 'bus.sock'}",
                "--print-address=1",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert self._process.stdout is not None
        self.address = self._process.stdout.readline().decode().strip()
        self._process.stdout.close()
        if not self.address:
            self.stop()
            raise VirtualTpmError(
                "dbus-daemon did not print its address: is dbus-daemon installed?"
            )
        return self

    @property
    def environment(self) -> dict[str, str]:
        """What a client of this bus needs in its environment (the tabrmd TCTI reads it)."""
        return {"DBUS_SESSION_BUS_ADDRESS": self.address}

    def stop(self) -> None:
        _stop(self._process)
        self._process = None


class VirtualTpm:
    """One manufactured swtpm with tpm2-abrmd in front of it; see :meth:`manufacture`."""

    def __init__(
        self, directory: Path, manufacturer: TpmManufacturer, bus: DbusSession, name: str
    ) -> None:
        self.directory = directory.resolve()
        self.manufacturer = manufacturer
        self.bus = bus
        self.bus_name = f"org.fleetgate.VirtualTpm.{name}"
        self.port = 0
        self._swtpm: subprocess.Popen[bytes] | None = None
        self._abrmd: subprocess.Popen[bytes] | None = None

    @classmethod
    def manufacture(
        cls,
        directory: Path,
        *,
        manufacturer: TpmManufacturer,
        bus: DbusSession,
        name: str | None = None,
    ) -> VirtualTpm:
        """A fresh TPM with EK certificates from ``manufacturer``, served and resource-managed.

        ``name`` (letters, digits, ``_``) makes the D-Bus name; a random one by default.
        """
        tpm = cls(directory, manufacturer, bus, name or f"t{secrets.token_hex(4)}")
        tpm._setup()
        try:
            tpm.start()
        except BaseException:
            tpm.stop()
            raise
        return tpm

    # -- what clients need ----------------------------------------------------------------

    @property
    def direct_tcti(self) -> str:
        """swtpm's command port, bypassing the resource manager (3 transient slots, no swapping)."""
        return f"swtpm:host=127.0.0.1,port={self.port}"

    @property
    def tcti(self) -> str:
        """Through tpm2-abrmd: what tpm2-openssl needs (a TLS handshake outgrows 3 slots)."""
        return f"tabrmd:bus_name={self.bus_name},bus_type=session"

    @property
    def environment(self) -> dict[str, str]:
        """Environment for a client process of this TPM (session bus, quiet tss2 log)."""
        return {**self.bus.environment, **quiet_tss_env()}

    # -- processes --------------------------------------------------------------------------

    def start(self) -> None:
        """Serve the TPM state on free loopback ports and start its resource manager."""
        port = _free_port_pair()
        log = self.directory / "swtpm.log"
        self._swtpm = subprocess.Popen(  # noqa: S603 (our own arguments)
            [
                _tool("swtpm"),
                "socket",
                "--tpm2",
                "--tpmstate",
                f"dir={self.directory / 'state'}",
                "--server",
                f"type=tcp,port={port},bindaddr=127.0.0.1",
                "--ctrl",
                f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
                "--flags",
                "not-need-init,startup-clear",
                "--log",
                f"file={log},level=1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.port = port
        _wait(lambda: _listening(port + 1), self._swtpm, f"swtpm on port {port}", log)
        self.start_resource_manager()

    def start_resource_manager(self) -> None:
        """tpm2-abrmd on the session bus as :attr:`bus_name` (``--allow-root`` for CI as root)."""
        if self._abrmd is not None:
            return
        if self._bus_name_owned():
            raise VirtualTpmError(
                f"{self.bus_name} is already taken on the session bus {self.bus.address}: "
                "another VirtualTpm has that name; give each TPM its own name"
            )
        log = self.directory / "abrmd.log"
        with log.open("ab") as out:
            self._abrmd = subprocess.Popen(  # noqa: S603 (our own arguments)
                [
                    _tool("tpm2-abrmd"),
                    "--session",
                    "--allow-root",
                    f"--dbus-name={self.bus_name}",
                    f"--tcti={self.direct_tcti}",
                ],
                stdout=out,
                stderr=out,
                env={**os.environ, **self.environment},
            )
        _wait(lambda: self._bus_name_owned(), self._abrmd, f"tpm2-abrmd as {self.bus_name}", log)

    def stop_resource_manager(self) -> None:
        """Stop tpm2-abrmd only: the TPM stays up, clients of :attr:`tcti` find no daemon."""
        _stop(self._abrmd)
        self._abrmd = None

    def stop(self) -> None:
        self.stop_resource_manager()
        _stop(self._swtpm)
        self._swtpm = None

    def __enter__(self) -> VirtualTpm:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    # -- manufacturing ----------------------------------------------------------------------

    def _setup(self) -> None:
        """``swtpm_setup`` with EK certificates from our manufacturer CA, NV locked."""
        config = self.directory / "config"
        state = self.directory / "state"
        for path in (config, state, self.manufacturer.directory):
            path.mkdir(parents=True, exist_ok=True)
        ca = self.manufacturer.directory.resolve()
        localca_conf = config / "swtpm-localca.conf"
        localca_conf.write_text(
            f"statedir = {ca}\n"
            f"signingkey = {ca / 'signkey.pem'}\n"
            f"issuercert = {ca / 'issuercert.pem'}\n"
            f"certserial = {ca / 'certserial'}\n"
        )
        options = config / "swtpm-localca.options"
        options.write_text(
            "--platform-manufacturer fleetgate-test\n"
            "--platform-version 2.1\n"
            "--platform-model virtual-tpm\n"
        )
        setup_conf = config / "swtpm_setup.conf"
        setup_conf.write_text(
            f"create_certs_tool = {_tool('swtpm_localca')}\n"
            f"create_certs_tool_config = {localca_conf}\n"
            f"create_certs_tool_options = {options}\n"
            "active_pcr_banks = sha256\n"
        )
        log = self.directory / "swtpm_setup.log"
        with log.open("wb") as out:
            result = subprocess.run(  # noqa: S603 (our own arguments)
                [
                    _tool("swtpm_setup"),
                    "--tpm2",
                    "--tpmstate",
                    str(state),
                    "--config",
                    str(setup_conf),
                    "--create-ek-cert",
                    "--lock-nvram",
                    "--overwrite",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=60,
                check=False,
            )
        if result.returncode != 0:
            raise VirtualTpmError(
                f"swtpm_setup failed (exit {result.returncode}); see {log}. It needs swtpm, "
                "swtpm-tools and certtool (gnutls-bin, a swtpm-tools dependency)"
            )

    def _bus_name_owned(self) -> bool:
        result = subprocess.run(  # noqa: S603 (our own arguments)
            [
                _tool("dbus-send"),
                "--session",
                "--print-reply=literal",
                "--dest=org.freedesktop.DBus",
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus.NameHasOwner",
                f"string:{self.bus_name}",
            ],
            capture_output=True,
            text=True,
            env={**os.environ, **self.bus.environment},
            timeout=5,
            check=False,
        )
        return "true" in result.stdout


_PACKAGES = {
    "swtpm": "swtpm",
    "swtpm_setup": "swtpm-tools",
    "swtpm_localca": "swtpm-tools",
    "tpm2-abrmd": "tpm2-abrmd",
    "dbus-daemon": "dbus-daemon",
    "dbus-send": "dbus-bin",
}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise VirtualTpmError(
            f"{name} is not installed: install the Debian package {_PACKAGES[name]} "
            "(make test's bootstrap installs scripts/debian-packages-test.txt)"
        )
    return path


def _free_port_pair() -> int:
    """A loopback port below 32768 (outside Linux's ephemeral range) free with its successor."""
    for _ in range(200):
        port = random.randint(20000, 32766)  # noqa: S311 (a port, not a secret)
        if all(_bindable(p) for p in (port, port + 1)):
            return port
    raise VirtualTpmError("no two free consecutive loopback ports below 32768")


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _wait(
    ready: Callable[[], bool], process: subprocess.Popen[bytes], what: str, log: Path
) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        if process.poll() is not None:
            raise VirtualTpmError(f"{what} exited with {process.returncode}; see {log}")
        if time.monotonic() > deadline:
            _stop(process)
            raise VirtualTpmError(f"{what} was not ready within {START_TIMEOUT_S} s; see {log}")
        time.sleep(0.02)


def _stop(process: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM by PID, then SIGKILL if it has not exited within 5 s."""
    if process is None or process.poll() is not None:
        return
    os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(5)
