"""A registry outage degrades cleanly (issue 11, item 7), proven by stopping a real PostgreSQL
server under a running broker: CONNECTs are refused with 0x88 and audited once the database is
back, the broker says "unreachable" once and "reachable again" once (not a traceback per poll),
and an admin command fails in seconds with one line naming the database.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from broker_helpers import RunningBroker, enroll, mosquitto, wait_for
from conftest import Fleet, RunningServer
from cryptography.hazmat.primitives.asymmetric import ec
from postgres_server import PostgresServer, server_for_tests
from registry_helpers import new_registry
from sqlalchemy.exc import IntegrityError, OperationalError

from device_sdk.est import EstError, device_csr
from enrollment.audit_writer import AuditWriter
from enrollment.ca import init_ca
from enrollment.registry import AuditRecord
from enrollment.registry.engine import CONNECT_TIMEOUT_S, display_url, unreachable
from fleetgate.config import Config, load_config
from fleetgate.outage import Ended, Ongoing, Outage, Started

FLEETGATE = Path(sys.executable).with_name("fleetgate")
_fleets = itertools.count(1)


@pytest.fixture(scope="module")
def pg_server() -> Iterator[PostgresServer]:
    """A server of this module's own: its tests stop and restart it."""
    yield from server_for_tests()


@pytest.fixture
def pg_fleet(home: Path, pg_server: PostgresServer, monkeypatch: pytest.MonkeyPatch) -> Fleet:
    """A data directory with a CA whose registry is a fresh PostgreSQL database."""
    monkeypatch.setenv(
        "FLEETGATE_DATABASE_URL", pg_server.create_database(f"fleet_{next(_fleets)}")
    )
    config = load_config(home)
    init_ca(config)
    new_registry(config.database_url).close()
    return Fleet(config)


def test_errors_and_logs_show_the_database_url_without_its_password() -> None:
    shown = display_url("postgresql+psycopg://fleet:s3cret@db.example:5432/fleet?sslmode=require")
    assert shown == "postgresql+psycopg://fleet@db.example:5432/fleet?sslmode=require"
    assert display_url("sqlite:////var/lib/fleetgate/registry.db") == (
        "sqlite:////var/lib/fleetgate/registry.db"
    )


def test_only_failures_to_reach_the_database_count_as_an_outage() -> None:
    assert unreachable(OperationalError("SELECT 1", {}, Exception("Connection refused")))
    assert unreachable(sqlite3.OperationalError("unable to open database file"))
    assert unreachable(sqlite3.OperationalError("database is locked"))
    assert not unreachable(sqlite3.OperationalError("no such table: alembic_version"))
    assert not unreachable(IntegrityError("INSERT", {}, Exception("duplicate key")))


def test_an_outage_is_reported_when_it_starts_once_a_minute_and_when_it_ends() -> None:
    outage = Outage(interval=60.0)
    assert outage.succeeded(0.0) is None
    assert outage.failed(10.0) == Started()
    assert [outage.failed(10.0 + i / 10) for i in range(1, 600)] == [None] * 599
    assert outage.failed(70.0) == Ongoing(60.0, 601)
    assert outage.failed(71.0) is None
    assert outage.succeeded(75.5) == Ended(65.5, 602)
    assert outage.succeeded(76.0) is None
    assert outage.failed(80.0) == Started()  # a new outage


def test_a_stopped_database_refuses_connects_keeps_their_audit_and_is_logged_once(
    pg_server: PostgresServer, pg_fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fleetgate")
    creds = enroll(pg_fleet, "sensor-1")
    pg_fleet.registry.close()
    broker = RunningBroker(pg_fleet).start()
    shown = display_url(pg_fleet.config.database_url)
    try:
        pg_server.stop()
        # Many failed polls (every 0.1 s), but one line: when the outage starts.
        wait_for(lambda: broker.broker.metrics.feed_errors >= 10, what="ten failed polls")
        refused = mosquitto("mosquitto_pub", broker, creds, "-t", "devices/sensor-1/t", "-m", "x")
        assert "CONNACK (136)" in refused.stdout + refused.stderr  # 0x88 server unavailable

        started = time.monotonic()
        cli = subprocess.run(
            [str(FLEETGATE), "device", "list"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        took = time.monotonic() - started
        assert cli.returncode == 1
        [line] = cli.stderr.splitlines()
        assert line.startswith(f"error: the registry at {shown} is unreachable: "), line
        assert line.endswith("Connection refused") and cli.stdout == ""
        assert took < 5, f"the CLI took {took:.1f} s to fail"

        pg_server.start()
        wait_for(lambda: _lines(caplog, "reachable again"), what="the outage's end")
        events = broker.audit_events("sensor-1", action="mqtt.connect", outcome="refused")
        assert len(events) == 1 and "registry is unavailable" in events[0].reason, events
        assert broker.metric("audit_events_dropped_total") == 0
    finally:
        broker.stop()
    unreachable = _lines(caplog, "is unreachable")
    assert len(unreachable) == 1 and shown in unreachable[0], unreachable
    assert len(_lines(caplog, "reachable again")) == 1
    assert not [r for r in caplog.records if r.exc_info and r.name.startswith("fleetgate")]


def test_enrollment_during_an_outage_answers_503_and_is_logged_once(
    pg_server: PostgresServer, pg_fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fleetgate")
    station = pg_fleet.add_station("line-1")
    pg_fleet.batch("line-1", "sensor-2", "sensor-3")
    pg_fleet.registry.close()
    server = RunningServer(pg_fleet.config).start()
    client = server.client(pg_fleet.root, station.cert, station.key)
    try:
        pg_server.stop()
        for device_id in ("sensor-2", "sensor-3"):
            with pytest.raises(EstError) as refused:
                client.simpleenroll(device_csr(device_id, ec.generate_private_key(ec.SECP256R1())))
            assert refused.value.status == 503 and "registry_unavailable" in str(refused.value)
        pg_server.start()
        client.simpleenroll(device_csr("sensor-2", ec.generate_private_key(ec.SECP256R1())))
    finally:
        server.stop()
    assert len(_lines(caplog, "is unreachable")) == 1
    assert _lines(caplog, "reachable again after")
    assert not [r for r in caplog.records if r.exc_info and r.name.startswith("fleetgate")]


def _record(n: int, reason: str = "test") -> AuditRecord:
    return AuditRecord(f"peer:{n}", "tls.handshake", "refused", None, reason)


def test_a_full_audit_queue_drops_new_events_counts_them_and_says_so_once(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    writer = AuditWriter(fleet.registry, capacity=2)

    async def scenario() -> None:
        for n in range(5):  # nothing drains the queue until the flush
            writer.submit(_record(n))
        await writer.flush()

    asyncio.run(scenario())
    assert (writer.counts.audit_written, writer.counts.audit_dropped) == (2, 3)
    assert len(_lines(caplog, "the audit queue is full (2 events)")) == 1
    assert _lines(caplog, "3 audit events were dropped while the audit queue was full")


def test_an_audit_event_the_database_refuses_is_dropped_alone_and_its_batch_is_kept(
    pg_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL refuses a NUL byte in text: a permanent error, not an outage."""
    registry = new_registry(pg_server.create_database("refused_audit"))
    writer = AuditWriter(registry)
    try:
        for record in (_record(1), _record(2, "nul \x00 byte"), _record(3)):
            writer.submit(record)
        asyncio.run(writer.flush())
        actors = [e.actor for e in registry.audit_events() if e.action == "tls.handshake"]
    finally:
        registry.close()
    assert sorted(actors) == ["peer:1", "peer:3"]
    assert (writer.counts.audit_written, writer.counts.audit_dropped) == (2, 1)
    [refused] = _lines(caplog, "refused by the database")
    assert "NUL" in refused
    assert not _lines(caplog, "unreachable")


def _lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def test_a_database_that_never_answers_fails_a_command_within_the_connect_timeout(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that accepts TCP and then says nothing (a hung host, a black-holing firewall):
    libpq's connect_timeout ends the wait, once, not once per attempt."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        url = f"postgresql://fleet@127.0.0.1:{silent.getsockname()[1]}/fleet"
        monkeypatch.setenv("FLEETGATE_DATABASE_URL", url)
        started = time.monotonic()
        cli = subprocess.run(
            [str(FLEETGATE), "device", "list"], capture_output=True, text=True, timeout=60
        )
        took = time.monotonic() - started
    assert cli.returncode == 1
    assert cli.stderr.splitlines() == [
        f"error: the registry at {url} is unreachable: connection timeout expired"
    ]
    assert took < CONNECT_TIMEOUT_S + 3, f"the CLI took {took:.1f} s to fail"
