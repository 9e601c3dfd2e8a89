"""Virtual smartcard hardware for tests and the simulator: a private pcscd, cards, their maker.

Everything runs on the real stack: pcscd with the vsmartcard ``vpcd`` reader driver, and our PIV
applet (:mod:`firmware_sim.piv_applet`) as the card, reached by clients through libpcsclite
(pyscard, OpenSC). Three things keep it private and loopback-only:

- pcscd 1.9.9 always listens on ``/run/pcscd/pcscd.comm`` (it ignores ``PCSCLITE_CSOCK_NAME``;
  only the client library reads it), so pcscd runs in its own mount namespace with a private
  directory bound over ``/run``. Clients set ``PCSCLITE_CSOCK_NAME`` (see :meth:`PcscDaemon.env`)
  and never meet a system pcscd;
- vpcd listens on all interfaces, and Debian's vpcd crashes in its connect-to-card mode, so
  pcscd also gets its own network namespace (only ``lo``), and the applet is started inside it
  with ``nsenter``. No port is opened on the host, and no port can collide with a host socket;
- processes are started and stopped by PID, and die with the thread that started them
  (PR_SET_PDEATHSIG), so a crashed run leaves none behind. Namespaces need root (as in CI).

Debian's ``python3-virtualsmartcard`` installs its package one directory too deep; the applet
process gets that directory on its ``PYTHONPATH`` (found with ``dpkg -L``), nothing else does.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from device_sdk.debian import MissingPackageFile, package_file
from device_sdk.hazmat import libc

APPLET = Path(__file__).resolve().parent / "piv_applet.py"
VPCD_PORT = 30000  # inside pcscd's own network namespace; below the ephemeral range anyway
DEFAULT_PIN = "123456"


class VirtualCardError(RuntimeError):
    """The virtual card stack could not be started; the message says what is missing."""


def dpkg_file(package: str, suffix: str) -> Path:
    """The first file of installed Debian ``package`` whose path ends with ``suffix``."""
    try:
        return package_file(package, suffix)
    except MissingPackageFile as exc:
        raise VirtualCardError(f"{exc.args[0]} (scripts/debian-packages-test.txt)") from exc


def virtualsmartcard_path() -> Path:
    """The directory to put on the applet's PYTHONPATH for ``import virtualsmartcard``."""
    init = dpkg_file("python3-virtualsmartcard", "virtualsmartcard/virtualsmartcard/__init__.py")
    return init.parent.parent


# -- the card manufacturer --------------------------------------------------------------------


@dataclass(frozen=True)
class CardManufacturer:
    """A test card manufacturer: its attestation CA, and the personalisation of new cards."""

    directory: Path

    @property
    def cert_path(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def key_path(self) -> Path:
        return self.directory / "ca.key"

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_path.read_bytes())

    @classmethod
    def create(cls, directory: Path, *, name: str = "fleetgate test maker") -> CardManufacturer:
        """A new self-signed P-256 attestation root CA in ``directory`` (key 0600)."""
        directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
                x509.NameAttribute(NameOID.COMMON_NAME, f"{name} PIV attestation CA"),
            ]
        )
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=30 * 365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        maker = cls(directory)
        fd = os.open(maker.key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        maker.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return maker

    def manufacture(self, state_path: Path, *, serial: int, pin: str = DEFAULT_PIN) -> Path:
        """A new card's state file: the applet makes its attestation key, this CA certifies it."""
        result = subprocess.run(  # noqa: S603 (our own arguments)
            [
                sys.executable,
                str(APPLET),
                "manufacture",
                "--state",
                str(state_path),
                "--serial",
                str(serial),
                "--pin",
                pin,
                "--ca-cert",
                str(self.cert_path),
                "--ca-key",
                str(self.key_path),
            ],
            capture_output=True,
            text=True,
            env=_applet_env(),
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            raise VirtualCardError(f"manufacturing card {serial} failed: {result.stderr.strip()}")
        return state_path


# -- pcscd --------------------------------------------------------------------------------------


class PcscDaemon:
    """A private ``pcscd --foreground`` with one vpcd reader pair, in its own namespaces."""

    def __init__(self, directory: Path) -> None:
        if os.geteuid() != 0:
            raise VirtualCardError(
                "the virtual card stack runs pcscd in private mount and network namespaces, "
                "which needs root (run the tests as root, as CI does)"
            )
        self.directory = directory.resolve()
        self.run_dir = self.directory / "run"
        self.log_path = self.directory / "pcscd.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        return self.run_dir / "pcscd" / "pcscd.comm"

    @property
    def pid(self) -> int:
        if self._process is None:
            raise VirtualCardError("pcscd is not running: call start() first")
        return self._process.pid

    def env(self) -> dict[str, str]:
        """Environment for PC/SC clients (pyscard, OpenSC tools, the PKCS#11 module).

        libpcsclite reads ``PCSCLITE_CSOCK_NAME`` once per process, at its first context.
        OpenSC's file cache is off, so tools always read the card itself.
        """
        return {
            "PCSCLITE_CSOCK_NAME": str(self.socket_path),
            "OPENSC_CONF": str(self.directory / "opensc.conf"),
        }

    def start(self, timeout: float = 10.0) -> PcscDaemon:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        driver = dpkg_file("vsmartcard-vpcd", "/libifdvpcd.so")
        reader_conf = self.directory / "reader.conf"
        reader_conf.write_text(
            'FRIENDLYNAME "Virtual PCD"\n'
            f"DEVICENAME   /dev/null:0x{VPCD_PORT:X}\n"
            f"LIBPATH      {driver}\n"
            f"CHANNELID    0x{VPCD_PORT:X}\n"
        )
        (self.directory / "opensc.conf").write_text(
            "app default {\n  framework pkcs15 {\n    use_file_caching = no;\n  }\n}\n"
        )
        script = (
            f"ip link set lo up && mount --bind '{self.run_dir}' /run && "
            f"exec pcscd --foreground -c '{reader_conf}'"
        )
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(  # noqa: S603 (our own arguments)
                ["unshare", "--mount", "--net", "--propagation", "private", "sh", "-c", script],  # noqa: S607
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent(),
            )
        deadline = time.monotonic() + timeout
        while not self.socket_path.exists():
            if self._process.poll() is not None:
                raise VirtualCardError(f"pcscd exited: {self.log_path.read_text().strip()}")
            if time.monotonic() > deadline:
                self.stop()
                raise VirtualCardError(f"pcscd did not open {self.socket_path} in {timeout} s")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            _terminate(process)


# -- cards ----------------------------------------------------------------------------------------


class VirtualCard:
    """One card (a state file) that can be inserted into, and removed from, pcscd's reader."""

    def __init__(self, daemon: PcscDaemon, state_path: Path, *, quickack: bool = True) -> None:
        self.daemon = daemon
        self.state_path = state_path.resolve()
        self.quickack = quickack
        self.log_path = self.state_path.with_suffix(".log")
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def inserted(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def insert(self) -> VirtualCard:
        """Start the applet inside pcscd's network namespace; it connects to vpcd's reader.

        The applet gives up after 10 s without vpcd, so this returns or fails within that.
        """
        if self.inserted:
            return self
        command = [
            "nsenter",
            f"--net=/proc/{self.daemon.pid}/ns/net",
            sys.executable,
            str(APPLET),
            "serve",
            "--state",
            str(self.state_path),
            "--port",
            str(VPCD_PORT),
        ]
        if self.quickack:
            command.append("--quickack")
        with self.log_path.open("ab") as log:
            process = subprocess.Popen(  # noqa: S603 (our own arguments)
                command,
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
                env=_applet_env(),
                preexec_fn=_die_with_parent(),
            )
        self._process = process
        assert process.stdout is not None
        line = process.stdout.readline()  # the applet prints one line once vpcd accepted it
        if not line.startswith(b"inserted"):
            self.remove()
            raise VirtualCardError(
                f"the card applet did not reach vpcd: see {self.log_path} and "
                f"{self.daemon.log_path}"
            )
        return self

    def remove(self) -> None:
        """Pull the card: stop the applet process (by PID)."""
        process, self._process = self._process, None
        if process is not None:
            _terminate(process)
            if process.stdout is not None:
                process.stdout.close()


def _die_with_parent() -> Callable[[], None]:
    """A ``preexec_fn``: SIGTERM when the starting thread dies, so a crashed test run leaves no
    pcscd or applet behind (the setting survives unshare's, nsenter's and sh's exec). ``prctl``
    is bound here, in the parent, so the child after fork only calls it."""
    prctl = libc.process().prctl

    def in_child() -> None:
        if prctl(libc.PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(libc.last_errno(), "prctl(PR_SET_PDEATHSIG) failed")

    return in_child


def _applet_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(virtualsmartcard_path()), env.get("PYTHONPATH", "")) if p
    )
    return env


def _terminate(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10)
