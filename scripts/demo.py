"""`make demo`: the whole enrollment flow on the embedded defaults (SQLite, loopback).

Creates a CA and a station in ./demo-data, starts the EST service, enrolls devices over mutual
TLS as a production-line station would, revokes one and shows that the CRL (and openssl) agree.
Each step runs the real `fleetgate` command, printed before it runs.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from device_sdk.est import EstClient, client_context, device_csr
from enrollment.keyfiles import write_certificates, write_private_key

ROOT = Path(__file__).resolve().parent.parent
HOME = ROOT / "demo-data"
FLEETGATE = str(Path(sys.executable).with_name("fleetgate"))
DEVICES = [f"sensor-{n:02d}" for n in range(1, 11)]


def step(title: str) -> None:
    print(f"\n== {title}")


def run(*args: str) -> str:
    print("$ fleetgate " + " ".join(args))
    result = subprocess.run([FLEETGATE, *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"demo failed: {result.stderr.strip()}")
    print(result.stdout.rstrip())
    return result.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_tls(port: int, trust: Path, deadline_s: float = 15.0) -> None:
    ctx = ssl.create_default_context(cafile=str(trust))
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            with (
                socket.create_connection(("localhost", port), timeout=1) as raw,
                ctx.wrap_socket(raw, server_hostname="localhost"),
            ):
                return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"demo failed: the enrollment service did not come up on port {port}")


def main() -> None:
    shutil.rmtree(HOME, ignore_errors=True)
    os.environ["FLEETGATE_HOME"] = str(HOME)
    # A throwaway passphrase for this demo's CA; a real deployment keeps it in a secret store.
    os.environ["FLEETGATE_CA_PASSPHRASE"] = secrets.token_urlsafe(24)
    port = free_port()
    os.environ["FLEETGATE_ENROLLMENT_PORT"] = str(port)
    ca_dir = HOME / "ca"

    step("1. Create the fleet CA (root + issuing, keys encrypted at rest)")
    run("ca", "init")
    run("ca", "show")

    step("2. Register a production-line station and the device ids it may enroll")
    run("station", "add", "line-1")
    run("batch", "add", "line-1", *DEVICES, "--group", "sensors", "--label", "WO-1001")

    step(f"3. Start the EST enrollment service on https://localhost:{port}")
    log = (HOME / "enrollment-service.log").open("w")
    server = subprocess.Popen([FLEETGATE, "serve", "enrollment"], stdout=log, stderr=log)
    try:
        wait_for_tls(port, ca_dir / "root.crt")
        print("service is up (mutual TLS 1.3)")

        step(f"4. The station enrolls {len(DEVICES)} devices over EST (simpleenroll)")
        station = HOME / "stations" / "line-1"
        context = client_context(
            ca_dir / "root.crt", station / "station.crt", station / "station.key"
        )
        started = time.perf_counter()
        with EstClient(f"https://localhost:{port}", context) as est:
            for device_id in DEVICES:
                key = ec.generate_private_key(ec.SECP256R1())
                cert = est.simpleenroll(device_csr(device_id, key))
                write_private_key(HOME / "devices" / device_id / "device.key", key)
                write_certificates(HOME / "devices" / device_id / "device.crt", [cert])
        elapsed = time.perf_counter() - started
        print(f"enrolled {len(DEVICES)} devices in {elapsed * 1000:.0f} ms over one connection")
        run("device", "list")

        step("5. A replayed enrollment is refused")
        with EstClient(f"https://localhost:{port}", context) as est:
            try:
                est.simpleenroll(device_csr(DEVICES[0], ec.generate_private_key(ec.SECP256R1())))
                sys.exit("demo failed: a second enrollment of an enrolled id was accepted")
            except Exception as exc:
                print(f"refused as expected: {exc}")

        victim = DEVICES[2]
        step(f"6. {victim} is reported stolen: revoke it")
        run("device", "revoke", victim, "--reason", "keyCompromise")

        step("7. The CRL the service publishes at /crl lists it, and openssl agrees")
        trust = ssl.create_default_context(cafile=str(ca_dir / "root.crt"))
        with urllib.request.urlopen(f"https://localhost:{port}/crl", context=trust) as response:
            crl = x509.load_der_x509_crl(response.read())
        crl_pem = HOME / "fleet-crl.pem"
        crl_pem.write_bytes(crl.public_bytes(Encoding.PEM))
        next_update = f"{crl.next_update_utc:%Y-%m-%d %H:%M}Z"
        print(f"GET /crl -> {len(list(crl))} entry, next update {next_update}")
        for entry in crl:
            reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason.value
            print(f"  serial {entry.serial_number:x}  {reason}")
        for device_id in (DEVICES[0], victim):
            result = subprocess.run(
                [
                    "openssl",
                    "verify",
                    "-crl_check",
                    "-CAfile",
                    str(ca_dir / "chain.pem"),
                    "-CRLfile",
                    str(crl_pem),
                    str(HOME / "devices" / device_id / "device.crt"),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            verdict = "valid" if result.returncode == 0 else "REJECTED (certificate revoked)"
            print(f"  openssl verify {device_id}: {verdict}")

        step(f"8. The audit trail for {victim}")
        run("audit", "--device", victim)
    finally:
        server.terminate()
        server.wait(10)
        log.close()

    print(
        f"\nDemo complete. Data directory: {HOME} (service log: {HOME / 'enrollment-service.log'})"
    )


if __name__ == "__main__":
    main()
