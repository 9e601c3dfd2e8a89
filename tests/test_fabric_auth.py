"""No way around the gate (issue 12): on a nats-server with the fleet's account and users
(docs/operations.md), a NATS client without fleetgate's credentials can neither read nor write
device subjects, while NATS-native services with granted permissions can: a telemetry reader
gets device telemetry at its mapped subject, a command writer reaches a device through a
fleetgate node. A node without valid credentials refuses to start and says why."""

# ruff: noqa: F811 - the tests take the `pair` fixture imported from test_broker_delivery

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import queue
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from broker_helpers import Creds, Paho, RunningBroker, ThreadedBroker
from conftest import Fleet
from nats_cluster import FabricUsers, NatsCluster, accounts_block, tls_block
from test_broker_delivery import connected, pair  # noqa: F401 (pair: sensor-1, ops-1)
from test_fabric_node import await_route
from typer.testing import CliRunner

from broker.fabric.node import FabricUnavailable
from enrollment.ca import init_ca
from fleetgate.cli import app
from fleetgate.cli.ca import issue_fabric_certificate
from fleetgate.config import FabricSettings, load_config
from fleetgate.errors import ConfigError

USERS = FabricUsers(*(secrets.token_urlsafe(18) for _ in range(3)))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    """One nats-server with the fleet's account (the permissions do not depend on routes)."""
    extra = accounts_block(USERS)
    with NatsCluster(tmp_path_factory.mktemp("nats-auth"), size=1, extra=extra) as running:
        yield running


def password_file(fleet: Fleet, password: str, mode: int = 0o600) -> str:
    path = fleet.config.home / "fabric" / f"password-{mode:o}"
    path.parent.mkdir(exist_ok=True)
    path.write_text(password + "\n")
    os.chmod(path, mode)
    return str(path.relative_to(fleet.config.home))


class AuthNode(RunningBroker):
    """A broker of ``fleet``'s data directory as a node of the fabric, logged in as told."""

    def __init__(self, fleet: Fleet, servers: list[str], name: str, **fabric: Any) -> None:
        settings = FabricSettings(
            servers=tuple(servers), node_name=name, replicas=1, connect_timeout_s=3.0, **fabric
        )
        ThreadedBroker.__init__(self, dataclasses.replace(fleet.config, fabric=settings))
        self.fleet = fleet


@pytest.fixture
def nodes(fleet: Fleet, server: NatsCluster) -> Iterator[tuple[AuthNode, AuthNode]]:
    login = {"user": "fleetgate", "password_file": password_file(fleet, USERS.fleetgate)}
    a = AuthNode(fleet, server.urls, "node-a", **login).start()
    b = AuthNode(fleet, server.urls, "node-b", **login).start()
    yield a, b
    a.stop()
    b.stop()


async def native(url: str, user: str, password: str) -> Any:
    return await nats.connect(
        url, user=user, password=password, allow_reconnect=False, connect_timeout=3
    )


async def forbidden(url: str, user: str, password: str, action: str, subject: str) -> str:
    """Try one thing the user may not do; the server's answer (nats-py lower-cases it)."""
    errors: asyncio.Queue[str] = asyncio.Queue()

    async def on_error(exc: Exception) -> None:
        await errors.put(str(exc))

    nc = await nats.connect(
        url,
        user=user,
        password=password,
        allow_reconnect=False,
        connect_timeout=3,
        error_cb=on_error,
    )
    if action == "publish":
        await nc.publish(subject, b"forged")
    else:
        await nc.subscribe(subject)
    await nc.flush()
    answer = await asyncio.wait_for(errors.get(), 5)
    await nc.close()
    return answer


async def refused_login(url: str, **login: str) -> str:
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    with pytest.raises(Exception) as raised:
        await nats.connect(
            url, error_cb=on_error, allow_reconnect=False, connect_timeout=3, **login
        )
    return " ".join([*errors, str(raised.value)])


def test_clients_without_credentials_are_refused(server: NatsCluster) -> None:
    async def run() -> None:
        assert "Authorization Violation" in await refused_login(server.urls[0])
        wrong = await refused_login(server.urls[0], user="fleetgate", password="guess")
        assert "Authorization Violation" in wrong

    asyncio.run(run())


def test_granted_services_read_telemetry_and_write_commands_but_nothing_else(
    nodes: tuple[AuthNode, AuthNode], pair: tuple[Creds, Creds], server: NatsCluster
) -> None:
    a, b = nodes
    sensor_creds, ops_creds = pair
    sensor = connected(a, sensor_creds)
    assert sensor.subscribe("devices/sensor-1/commands/#") == [0]
    ops = connected(b, ops_creds)
    assert ops.subscribe("devices/+/telemetry/#") == [0]

    async def run() -> None:
        url = server.urls[0]
        reader = await native(url, "telemetry", USERS.telemetry)
        writer = await native(url, "commands", USERS.commands)
        got: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()

        async def on_message(msg: Any) -> None:
            await got.put((msg.subject, msg.data))

        # The reader reads device telemetry at the mapped subject.
        await reader.subscribe("devices.*.telemetry.>", cb=on_message)
        await reader.flush()
        while True:  # until the subscription is in place
            await asyncio.to_thread(sensor.publish, "devices/sensor-1/telemetry/t", b"21")
            try:
                assert await asyncio.wait_for(got.get(), 0.3) == (
                    "devices.sensor-1.telemetry.t",
                    b"21",
                )
                break
            except TimeoutError:
                continue

        # The writer reaches the device through a fleetgate node.
        loop = asyncio.get_running_loop()

        def command(payload: bytes) -> None:
            asyncio.run_coroutine_threadsafe(
                writer.publish("devices.sensor-1.commands.reboot", payload), loop
            ).result(5)

        await asyncio.to_thread(
            await_route, command, lambda timeout: sensor.message(timeout).payload
        )
        await writer.publish("devices.sensor-1.commands.reboot", b"now")
        message = await asyncio.to_thread(sensor.message)
        assert (message.topic, message.payload) == ("devices/sensor-1/commands/reboot", b"now")

        await reader.close()
        await writer.close()
        # Neither can do anything else with device subjects, nor with fleetgate's own.
        for user, password, action, subject in [
            ("telemetry", USERS.telemetry, "publish", "devices.sensor-1.telemetry.t"),
            ("telemetry", USERS.telemetry, "publish", "devices.sensor-1.commands.reboot"),
            ("telemetry", USERS.telemetry, "subscribe", "devices.sensor-1.commands.>"),
            ("commands", USERS.commands, "publish", "devices.sensor-1.telemetry.t"),
            ("commands", USERS.commands, "subscribe", "devices.>"),
            ("commands", USERS.commands, "subscribe", "$FG.>"),
            ("commands", USERS.commands, "publish", "$FG.q.devices.sensor-1.commands.x"),
        ]:
            answer = await forbidden(url, user, password, action, subject)
            kind = "publish" if action == "publish" else "subscription"
            assert f'permissions violation for {kind} to "{subject.lower()}"' in answer, answer

    asyncio.run(run())
    for client in (ops, sensor):  # nothing forged reached the MQTT side
        assert b"forged" not in drain(client)
    sensor.close()
    ops.close()


def drain(client: Paho) -> list[bytes]:
    payloads = []
    with contextlib.suppress(queue.Empty):
        while True:
            payloads.append(client.message(0.5).payload)
    return payloads


def test_a_node_without_the_fabric_credentials_does_not_start(
    fleet: Fleet, server: NatsCluster
) -> None:
    anonymous = AuthNode(fleet, server.urls, "anonymous")
    with pytest.raises(FabricUnavailable, match="Authorization Violation"):
        anonymous.start()
    anonymous.stop()
    wrong = AuthNode(
        fleet, server.urls, "wrong", user="fleetgate", password_file=password_file(fleet, "guess")
    )
    with pytest.raises(FabricUnavailable, match="Authorization Violation") as raised:
        wrong.start()
    wrong.stop()
    assert "guess" not in str(raised.value)


def test_a_password_file_others_can_read_is_refused(fleet: Fleet, server: NatsCluster) -> None:
    loose = password_file(fleet, USERS.fleetgate, mode=0o644)
    node = AuthNode(fleet, server.urls, "loose", user="fleetgate", password_file=loose)
    with pytest.raises(ConfigError, match=r"readable by others .* chmod 600"):
        node.start()
    node.stop()
    assert Path(fleet.config.home / loose).exists()


# -- TLS 1.3 with client certificates from the fleet CA -------------------------------------------


def cli(fleet: Fleet, *args: str) -> None:
    result = CliRunner().invoke(app, ["--home", str(fleet.config.home), *args])
    assert result.exit_code == 0, result.output


@pytest.fixture
def tls_server(fleet: Fleet, tmp_path: Path) -> Iterator[NatsCluster]:
    """One nats-server with the fleet's account, requiring TLS 1.3 and a client certificate
    from the fleet CA; its own certificate comes from ``ca server-cert``."""
    out = tmp_path / "nats-tls"
    cli(fleet, "ca", "server-cert", "--name", "127.0.0.1", "--out", str(out))
    extra = accounts_block(USERS) + tls_block(out / "broker.crt", out / "broker.key", fleet.root)
    with NatsCluster(tmp_path / "nats", size=1, extra=extra) as running:
        yield running


def tls_login(fleet: Fleet, out: Path) -> dict[str, str]:
    return {
        "user": "fleetgate",
        "password_file": password_file(fleet, USERS.fleetgate),
        "tls_ca_file": str(out / "ca.crt"),
        "tls_cert_file": str(out / "fabric-node.crt"),
        "tls_key_file": str(out / "fabric-node.key"),
    }


def tls_urls(server: NatsCluster) -> list[str]:
    return [url.replace("nats://", "tls://") for url in server.urls]


def test_a_node_with_a_fabric_certificate_connects_over_tls_1_3(
    fleet: Fleet, tls_server: NatsCluster, tmp_path: Path
) -> None:
    out = tmp_path / "node-a"
    cli(fleet, "ca", "fabric-cert", "--node", "node-a", "--out", str(out))
    assert (out / "fabric-node.key").stat().st_mode & 0o777 == 0o600
    node = AuthNode(fleet, tls_urls(tls_server), "node-a", **tls_login(fleet, out)).start()
    try:
        connections = tls_server.nodes[0].http_json("/connz?auth=1")["connections"]
        ours = [c for c in connections if c.get("name") == "fleetgate-node-a"]
        assert ours and ours[0]["tls_version"] == "1.3"
        assert ours[0]["authorized_user"] == "fleetgate"
    finally:
        node.stop()


def test_a_node_without_a_fleet_client_certificate_is_refused(
    fleet: Fleet, tls_server: NatsCluster, tmp_path: Path
) -> None:
    out = tmp_path / "node-b"
    issue_fabric_certificate(fleet.config, "node-b", out)
    login = tls_login(fleet, out)
    del login["tls_cert_file"], login["tls_key_file"]
    stranger = tmp_path / "stranger"  # a node certificate from another fleet's CA
    other_fleet = load_config(tmp_path / "other-fleet", environ={})
    init_ca(other_fleet)
    issue_fabric_certificate(other_fleet, "node-b", stranger)
    # TLS 1.3 checks the client's certificate after the client's Finished: the client may be
    # writing when the server's alert closes the link, and see only that.
    for settings, reason in [
        (login, "certificate required|Broken pipe|Connection reset by peer"),
        (
            {
                **login,
                "tls_cert_file": str(stranger / "fabric-node.crt"),
                "tls_key_file": str(stranger / "fabric-node.key"),
            },
            "unknown ca|Broken pipe|Connection reset by peer",
        ),
    ]:
        node = AuthNode(fleet, tls_urls(tls_server), "node-b", **settings)
        with pytest.raises(FabricUnavailable, match=reason) as raised:
            node.start()
        node.stop()
        assert USERS.fleetgate not in str(raised.value)
    (out / "fabric-node.key").chmod(0o640)
    node = AuthNode(fleet, tls_urls(tls_server), "node-b", **tls_login(fleet, out))
    with pytest.raises(ConfigError, match=r"tls_key_file .* is readable by others"):
        node.start()
    node.stop()
