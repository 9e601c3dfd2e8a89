"""Bulk TLS 1.3 throughput of the device SDK's client contexts: ChaCha20 policy vs AES policy.

A device uploads N MiB over loopback to a Python TLS server (mutual TLS, like the broker). The
client context is the SDK's own (``device_sdk.device_context`` with ``cipher_policy`` chacha20
or aes), so the figures include the per-context suite mechanism. Server and client are separate
processes pinned to cores 0 and 1 with ``taskset``. Each pair runs twice: with AES-NI masked for
both processes (``OPENSSL_ia32cap=~0x200000200000000:~0x0``, a CPU without AES instructions), and
natively. The issue's target is ChaCha20 >= 4x AES-GCM under the mask.

    python scripts/bench_chacha.py [--mib 256] [--repeat 3]

The last line is ``chacha_mb_s=... aes_mb_s=... chacha_over_aes=...`` for the masked run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import free_port
from cryptography.hazmat.primitives.asymmetric import ec

from device_sdk import FileKeyStore, device_context
from enrollment import profiles
from fleetgate.keyfiles import write_certificates, write_private_key

MASK = "~0x200000200000000:~0x0"  # AES-NI and PCLMUL off, AVX2/AVX-512 left on
TARGET = 4.0
CHUNK = 256 * 1024
OP_PRIORITIZE_CHACHA = 0x00200000  # not exported by Python 3.11's ssl


def make_pki(directory: Path) -> None:
    """A root CA, a server certificate for localhost, and an enrolled device key store."""
    now = dt.datetime.now(dt.UTC)
    day = dt.timedelta(days=1)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = profiles.build_certificate(
        profiles.ROOT,
        subject=profiles.Subject(common_name="bench root"),
        public_key=root_key.public_key(),
        issuer=profiles.Issuer(key=root_key, certificate=None),
        validity=day,
        now=now,
    )
    issuer = profiles.Issuer(key=root_key, certificate=root)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = profiles.build_certificate(
        profiles.SERVER,
        subject=profiles.server_subject(["localhost", "127.0.0.1"]),
        public_key=server_key.public_key(),
        issuer=issuer,
        validity=day,
        now=now,
    )
    write_private_key(directory / "server.key", server_key)
    write_certificates(directory / "server.crt", [server])
    write_certificates(directory / "ca.crt", [root])
    store = FileKeyStore(directory / "device")
    store.set_trust_anchors([root])
    device_key = store.new_key()
    device = profiles.build_certificate(
        profiles.DEVICE,
        subject=profiles.Subject(
            common_name="bench-device", uris=("urn:fleetgate:device:bench-device",)
        ),
        public_key=device_key.public_key(),
        issuer=issuer,
        validity=day,
        now=now,
    )
    store.install(device_key, [device])


def serve(directory: Path, port: int, connections: int) -> None:
    """Receive ``connections`` uploads: an 8-byte length, the bytes, then a 1-byte receipt."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(directory / "server.crt", directory / "server.key")
    context.load_verify_locations(directory / "ca.crt")
    context.verify_mode = ssl.CERT_REQUIRED
    context.options |= OP_PRIORITIZE_CHACHA  # honour a client that prefers ChaCha20
    buffer = bytearray(1 << 20)
    with socket.create_server(("127.0.0.1", port)) as listener:
        print("ready", flush=True)
        for _ in range(connections):
            raw, _ = listener.accept()
            with context.wrap_socket(raw, server_side=True) as tls:
                header = b""
                while len(header) < 8:
                    header += tls.recv(8 - len(header))
                remaining = int.from_bytes(header, "big")
                while remaining > 0:
                    received = tls.recv_into(buffer, min(len(buffer), remaining))
                    if not received:
                        raise ConnectionError("the client went away mid-upload")
                    remaining -= received
                tls.sendall(b"\x01")


def send(directory: Path, port: int, policy: str, mib: int) -> None:
    """Upload ``mib`` MiB with the SDK's context for ``policy``; print suite and MB/s as JSON."""
    context = device_context(FileKeyStore(directory / "device"), policy)  # type: ignore[arg-type]
    total = mib << 20
    payload = memoryview(bytes(CHUNK))
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        start = time.perf_counter()
        tls.sendall(total.to_bytes(8, "big"))
        for _ in range(total // CHUNK):
            tls.sendall(payload)
        if tls.recv(1) != b"\x01":
            raise ConnectionError("the server did not confirm the upload")
        seconds = time.perf_counter() - start
        cipher = tls.cipher()
        print(json.dumps({"cipher": cipher[0] if cipher else "", "mb_s": total / seconds / 1e6}))


def pinned(core: int) -> list[str]:
    pin = shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    return ["taskset", "-c", str(core)] if pin else []


def trial(
    directory: Path, policy: str, mask: str | None, mib: int, repeat: int
) -> tuple[str, float]:
    """Median MB/s of ``repeat`` uploads, and the suite negotiated."""
    env = {k: v for k, v in os.environ.items() if k != "OPENSSL_ia32cap"}
    if mask is not None:
        env["OPENSSL_ia32cap"] = mask
    port = free_port()
    me = [sys.executable, str(Path(__file__).resolve())]
    server = subprocess.Popen(
        [*pinned(0), *me, "serve", str(directory), str(port), str(repeat)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError("the benchmark server did not start")
        results = []
        for _ in range(repeat):
            out = subprocess.run(
                [*pinned(1), *me, "send", str(directory), str(port), policy, str(mib)],
                env=env,
                capture_output=True,
                text=True,
                check=True,
                timeout=300,
            )
            results.append(json.loads(out.stdout))
        server.wait(30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)
    suites = {r["cipher"] for r in results}
    if len(suites) != 1:
        raise RuntimeError(f"policy {policy} negotiated different suites: {suites}")
    return suites.pop(), statistics.median(r["mb_s"] for r in results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="MiB per upload (default 256)")
    parser.add_argument("--repeat", type=int, default=3, help="uploads per figure (median)")
    args = parser.parse_args()
    pin = "server on core 0, client on core 1" if pinned(0) else "unpinned (no taskset/2 cores)"
    print(f"TLS 1.3 upload over loopback, {args.mib} MiB x {args.repeat} (median), {pin}")
    print(f"Python {sys.version.split()[0]}, {ssl.OPENSSL_VERSION}")
    figures: dict[str | None, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-chacha-") as tmp:
        directory = Path(tmp)
        make_pki(directory)
        for mask in (MASK, None):
            label = f"OPENSSL_ia32cap={mask}" if mask else "native"
            print(f"\n{label}:")
            figures[mask] = {}
            for policy in ("chacha20", "aes"):
                suite, mb_s = trial(directory, policy, mask, args.mib, args.repeat)
                figures[mask][policy] = mb_s
                print(f"  policy {policy:8s}  {suite:30s} {mb_s:8.0f} MB/s")
            ratio = figures[mask]["chacha20"] / figures[mask]["aes"]
            print(f"  chacha20 / aes = {ratio:.2f}")
    masked = figures[MASK]
    ratio = masked["chacha20"] / masked["aes"]
    verdict = "met" if ratio >= TARGET else "NOT met"
    print(f"\ntarget ChaCha20 >= {TARGET:.0f}x AES-GCM without AES-NI: {verdict}")
    print(
        f"chacha_mb_s={masked['chacha20']:.0f} aes_mb_s={masked['aes']:.0f} "
        f"chacha_over_aes={ratio:.2f}"
    )
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    elif len(sys.argv) > 1 and sys.argv[1] == "send":
        send(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
    else:
        sys.exit(main())
