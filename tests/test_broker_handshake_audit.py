"""Refused TLS handshakes are audited through the refusal throttle, like every other refusal.

Found while building ``make soak``: each failed handshake wrote its own audit row, and failing
one needs no certificate, so any peer could grow the registry a row per connection attempt.
"""

from __future__ import annotations

import contextlib
import socket
import ssl

from broker_helpers import RunningBroker, running_broker, wait_for  # noqa: F401 (fixture)

PROBES = 25


def probe(broker: RunningBroker) -> None:
    """A port probe: connect, then EOF before any ClientHello; the broker closes too."""
    with socket.create_connection(("127.0.0.1", broker.port), timeout=5) as raw:
        raw.shutdown(socket.SHUT_WR)
        assert raw.recv(100) == b""


def no_certificate(broker: RunningBroker) -> None:
    """A TLS 1.3 client without a certificate: refused with the certificate-required alert."""
    context = ssl.create_default_context(cafile=str(broker.fleet.config.ca_dir / "chain.pem"))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    with (
        socket.create_connection(("127.0.0.1", broker.port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
        contextlib.suppress(ssl.SSLError, ConnectionError),
    ):
        tls.recv(100)  # TLS 1.3: the alert arrives after the client's side finished


def test_a_loop_of_failed_handshakes_writes_one_audit_row_per_kind(broker: RunningBroker) -> None:
    for _ in range(PROBES):
        probe(broker)
        no_certificate(broker)
    wait_for(
        lambda: (
            broker.metric("tls_handshake_failures_total", 'reason="other"') == PROBES
            and broker.metric("tls_handshake_failures_total", 'reason="no_client_certificate"')
            == PROBES
        ),
        what="every refused handshake counted",
    )
    rows = broker.audit_events(action="mqtt.tls_handshake", outcome="refused")
    reasons = sorted(row.reason for row in rows)
    assert len(rows) == 2, reasons  # one per kind (a probe, no certificate), not 2 x 25
    assert any("client presented no certificate" in r for r in reasons), reasons
    assert all(row.actor.startswith("peer:127.0.0.1:") for row in rows)
    assert broker.metric("audit_refusals_suppressed_total") == 2 * (PROBES - 1)
