"""The EST server's limits (issue 11, item 4), over real TLS sockets on loopback.

Client certificates are optional on the EST port, so these hold for anyone who reaches it:
deadlines for headers, bodies and idle keep-alive connections; caps on connections in all and
per source address; accept errors (EMFILE, caused for real with a low RLIMIT_NOFILE in a
subprocess) logged at most once a second; security headers and no ``Server`` banner; ChaCha20
for a client that lists it first.
"""

from __future__ import annotations

import dataclasses
import http.client
import os
import select
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest
from conftest import Fleet, RunningServer, StationCredentials

from device_sdk.ciphers import set_tls13_suites
from device_sdk.est import client_context

CACERTS = "/.well-known/est/cacerts"
REQUEST = f"GET {CACERTS} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()


def wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


@pytest.fixture
def limited(fleet: Fleet) -> Iterator[RunningServer]:
    """The EST server with deadlines short enough to watch: headers 1 s, idle 3 s, body 1 s."""
    settings = dataclasses.replace(
        fleet.config.enrollment, header_timeout_s=1.0, idle_timeout_s=3.0, body_timeout_s=1.0
    )
    server = RunningServer(dataclasses.replace(fleet.config, enrollment=settings)).start()
    yield server
    server.stop()


def tls_connect(server: RunningServer, fleet: Fleet, source: str = "127.0.0.1") -> ssl.SSLSocket:
    address = ("127.0.0.1", server.port)
    raw = socket.create_connection(address, timeout=10, source_address=(source, 0))
    return client_context(fleet.chain).wrap_socket(raw, server_hostname="localhost")


def closed_after(tls: ssl.SSLSocket, send: bytes = b"", interval: float = 0.2) -> float:
    """Send ``send`` a byte per ``interval`` until the server closes; seconds that took."""
    start = time.monotonic()
    pending = memoryview(send)
    while time.monotonic() - start < 30:
        if pending:
            try:
                tls.sendall(pending[:1])
            except OSError:
                break
            pending = pending[1:]
        readable, _, _ = select.select([tls], [], [], interval)
        if readable:
            try:
                if not tls.recv(65536):
                    break
            except (OSError, ssl.SSLError):
                break
    return time.monotonic() - start


def read_response(tls: ssl.SSLSocket) -> http.client.HTTPResponse:
    response = http.client.HTTPResponse(tls)  # type: ignore[arg-type]
    response.begin()
    return response


def test_headers_sent_a_byte_at_a_time_are_cut_off_at_the_header_deadline(limited, fleet):
    tls = tls_connect(limited, fleet)
    elapsed = closed_after(tls, REQUEST, interval=0.2)  # 40 bytes would take 8 s
    assert 1.0 <= elapsed < 2.5, elapsed  # the header deadline (1 s), not idle (3 s)


def test_an_idle_keep_alive_connection_is_closed_at_the_idle_deadline(limited, fleet):
    tls = tls_connect(limited, fleet)
    tls.sendall(REQUEST)
    response = read_response(tls)
    assert response.status == 200 and response.read()
    assert 2.5 <= closed_after(tls) < 5.0
    silent = tls_connect(limited, fleet)  # a connection that never sends a request at all
    assert 2.5 <= closed_after(silent) < 5.0


def test_a_slow_request_body_gets_408_and_the_connection_closes(limited, fleet):
    tls = tls_connect(limited, fleet)
    start = time.monotonic()
    tls.sendall(
        b"POST /.well-known/est/simpleenroll HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Type: application/pkcs10\r\nContent-Length: 600\r\n\r\nMIIB"
    )
    response = read_response(tls)
    assert response.status == 408
    assert b"body_timeout" in response.read()
    assert 1.0 <= time.monotonic() - start < 3.0
    assert closed_after(tls) < 1.0


def test_responses_carry_hsts_and_nosniff_and_no_server_banner(est_server, fleet):
    for path in (CACERTS, "/no-such-page"):
        conn = http.client.HTTPSConnection(
            "localhost", est_server.port, context=client_context(fleet.chain), timeout=10
        )
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        conn.close()
        assert response.getheader("Strict-Transport-Security") == "max-age=31536000"
        assert response.getheader("X-Content-Type-Options") == "nosniff"
        assert response.getheader("Server") is None, response.getheader("Server")


@pytest.mark.parametrize(
    ("suites", "expected"),
    [
        (
            ("TLS_CHACHA20_POLY1305_SHA256", "TLS_AES_256_GCM_SHA384"),
            "TLS_CHACHA20_POLY1305_SHA256",
        ),
        (("TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"), "TLS_AES_256_GCM_SHA384"),
    ],
)
def test_a_client_preferring_chacha20_gets_it(est_server, fleet, suites, expected):
    """The client's suites set as the SDK's cipher policy sets them (device_sdk.ciphers)."""
    context = client_context(fleet.chain)
    set_tls13_suites(context, suites)
    raw = socket.create_connection(("127.0.0.1", est_server.port), timeout=10)
    with context.wrap_socket(raw, server_hostname="localhost") as tls:
        assert tls.cipher()[:2] == (expected, "TLSv1.3")


# -- connection caps and accept errors, in a subprocess with a low open-file limit -------------

SERVE = """
import asyncio, logging, resource, sys
_soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), hard))
from enrollment.server import EnrollmentServer
from fleetgate.config import load_config
handler = logging.StreamHandler(sys.stderr)
handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s count=%(count)s",
                                       defaults={"count": "-"}))
logging.basicConfig(level=logging.WARNING, handlers=[handler])

async def main():
    server = EnrollmentServer(load_config(), port=0, threads=2)
    print(await server.start(), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop()

asyncio.run(main())
"""


class Subprocess:
    """The EST server in a child process whose RLIMIT_NOFILE is ``nofile``."""

    def __init__(self, fleet: Fleet, nofile: int, **settings: str) -> None:
        env = dict(os.environ)
        env.update({f"FLEETGATE_ENROLLMENT_{k.upper()}": v for k, v in settings.items()})
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVE, str(nofile)],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip().isdigit(), self.stop()
        self.port = int(line)

    def stop(self) -> str:
        """Stop the server; its stderr."""
        _out, err = self.proc.communicate(timeout=30)
        return err


def idle_connections(port: int, source: str, count: int) -> list[socket.socket]:
    return [
        socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
        for _ in range(count)
    ]


def reset_by_server(sockets: list[socket.socket]) -> int:
    """How many of ``sockets`` the server has closed (they send nothing, so EOF or a reset)."""
    readable, _, _ = select.select(sockets, [], [], 0)
    return len(readable)


def station_request(port: int, fleet: Fleet, station: StationCredentials, source: str) -> int:
    context = client_context(fleet.chain, station.cert, station.key)
    conn = http.client.HTTPSConnection(
        "localhost", port, context=context, timeout=10, source_address=(source, 0)
    )
    try:
        conn.request("GET", CACERTS)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def station_request_fails(
    port: int, fleet: Fleet, station: StationCredentials, source: str
) -> bool:
    try:
        station_request(port, fleet, station, source)
    except (OSError, ssl.SSLError, http.client.HTTPException):
        return True
    return False


def test_idle_connections_over_the_caps_do_not_lock_a_station_out(fleet):
    """RLIMIT_NOFILE 128: the total cap is derived as 128 - 64 = 64, the per-address cap is 40."""
    station = fleet.add_station()
    server = Subprocess(fleet, 128, max_connections_per_address="40", tls_handshake_timeout_s="6")
    held: list[socket.socket] = []
    try:
        one = idle_connections(server.port, "127.0.0.1", 100)  # one attacker address
        held += one
        wait_for(lambda: reset_by_server(one) == 60)
        assert station_request(server.port, fleet, station, "127.0.0.2") == 200
        assert reset_by_server(one) == 60  # the 40 admitted ones are still held

        many = idle_connections(server.port, "127.0.0.3", 40)  # the total cap: 64 - 40 = 24
        held += many
        wait_for(lambda: reset_by_server(many) == 16)
        assert station_request_fails(server.port, fleet, station, "127.0.0.4")
        for sock in held:  # the idle ones go (or time out): the server takes stations again
            sock.close()
        held = []
        wait_for(lambda: not station_request_fails(server.port, fleet, station, "127.0.0.4"))
    finally:
        for sock in held:
            sock.close()
        err = server.stop()
    assert "Traceback" not in err, err[-3000:]
    refusals = [line for line in err.splitlines() if "over the connection cap" in line]
    assert 1 <= len(refusals) <= 10, refusals  # 76 refused, at most one line a second
    assert sum(int(line.rsplit("count=", 1)[1]) for line in refusals) <= 76


def test_running_out_of_descriptors_logs_once_a_second_and_recovers(fleet):
    """Caps set above RLIMIT_NOFILE (100), so accept() fails with EMFILE for real."""
    station = fleet.add_station()
    server = Subprocess(
        fleet,
        100,
        max_connections="5000",
        max_connections_per_address="5000",
        tls_handshake_timeout_s="30",
    )
    held: list[socket.socket] = []
    start = time.monotonic()
    try:
        held = idle_connections(server.port, "127.0.0.1", 150)
        assert station_request_fails(server.port, fleet, station, "127.0.0.2")
        for sock in held:
            sock.close()
        held = []
        wait_for(lambda: not station_request_fails(server.port, fleet, station, "127.0.0.2"))
        # ...and stays recovered while asyncio's last accept retries (1 s apart) run out.
        recovered = time.monotonic()
        while time.monotonic() - recovered < 2.0:
            assert station_request(server.port, fleet, station, "127.0.0.2") == 200
    finally:
        for sock in held:
            sock.close()
        err = server.stop()
    elapsed = time.monotonic() - start
    assert "Traceback" not in err, err[-3000:]
    failures = [line for line in err.splitlines() if "accept failed" in line]
    assert 1 <= len(failures) <= elapsed + 2, (elapsed, failures)
    assert len(err) < 20_000, len(err)
