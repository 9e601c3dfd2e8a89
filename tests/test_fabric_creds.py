"""NATS credentials files and nkey seeds (issue 12, "no way around the gate"): on a nats-server
in operator/JWT mode, as `nsc` sets one up, a broker node with its account's user credentials
(a ``.creds`` file: user JWT + nkey seed) starts and carries traffic; one with a revoked,
expired, unknown or mismatched user, or no file, does not start and says why; a file its group
or others may read is refused. A bare user nkey seed logs in on a server that lists it. No
secret reaches an error or a log line. The operator, account and users are minted here
(tests/nats_jwt.py)."""

# ruff: noqa: F811 - the tests take the `pair` fixture imported from test_broker_delivery

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nkeys
import pytest
from broker_helpers import Creds
from conftest import Fleet
from nats_cluster import NatsCluster
from nats_jwt import Account, Operator, new_key, public, seed, write_creds
from test_broker_delivery import connected, pair  # noqa: F401 (pair: sensor-1, ops-1)
from test_fabric_auth import AuthNode
from test_fabric_node import await_route

from broker.fabric.node import FabricUnavailable
from fleetgate.config import load_config
from fleetgate.errors import ConfigError

OPERATOR = Operator()
FLEET = Account("FLEET")
GATE_JWT, GATE_KEY = FLEET.user("fleetgate-nodes")
REVOKED_JWT, REVOKED_KEY = FLEET.user("retired-gate")
FLEET.revoke(REVOKED_KEY)
REFUSED_BY_SERVER = "Authorization Violation|Connection reset by peer"
"""nats-server answers -ERR 'Authorization Violation' and closes; now and then the close's
reset reaches nats-py before the answer does (seen on main's test_fabric_auth too, 2 in 4)."""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    """One nats-server trusting only OPERATOR, with its FLEET account preloaded."""
    directory = tmp_path_factory.mktemp("nats-operator")
    extra = OPERATOR.server_block(directory / "trust", [FLEET])
    with NatsCluster(directory, size=1, extra=extra) as running:
        yield running


def creds(fleet: Fleet, name: str, jwt: str, key: Any, mode: int = 0o600) -> str:
    """A .creds file in the fleet's data directory; its path as [fabric] names it."""
    path = write_creds(fleet.config.home / "fabric" / f"{name}.creds", jwt, key, mode)
    return str(path.relative_to(fleet.config.home))


def test_a_node_with_its_credentials_file_starts_and_carries_traffic(
    fleet: Fleet,
    server: NatsCluster,
    pair: tuple[Creds, Creds],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    login = {"credentials_file": creds(fleet, "gate", GATE_JWT, GATE_KEY)}
    a = AuthNode(fleet, server.urls, "node-a", **login).start()
    b = AuthNode(fleet, server.urls, "node-b", **login).start()
    try:
        sensor_creds, ops_creds = pair
        ops = connected(b, ops_creds)
        assert ops.subscribe("devices/+/telemetry/#", qos=1) == [1]
        sensor = connected(a, sensor_creds)
        await_route(
            lambda payload: sensor.publish("devices/sensor-1/telemetry/t", payload),
            lambda timeout: ops.message(timeout).payload,
        )
        while not sensor.events.published.empty():  # the QoS 0 probes' callbacks
            sensor.events.published.get_nowait()
        assert sensor.publish("devices/sensor-1/telemetry/t", b"stored", qos=1) == 0
        message = ops.message()
        assert (message.payload, message.qos) == (b"stored", 1)
        connections = server.nodes[0].http_json("/connz?auth=1")["connections"]
        ours = {c["name"]: c for c in connections if c.get("name", "").startswith("fleetgate-")}
        assert ours["fleetgate-node-a"]["authorized_user"] == public(GATE_KEY)
        assert ours["fleetgate-node-a"]["account"] == FLEET.public
        sensor.close()
        ops.close()
    finally:
        a.stop()
        b.stop()
    secret = seed(GATE_KEY)
    assert all(secret not in record.getMessage() for record in caplog.records)
    assert all(secret not in str(record.__dict__) for record in caplog.records)


def test_a_revoked_unknown_expired_or_mismatched_user_does_not_start(
    fleet: Fleet, server: NatsCluster
) -> None:
    stranger = Account("ELSEWHERE")  # an account these servers were never given
    stranger_jwt, stranger_key = stranger.user("fleetgate-nodes")
    expired_jwt, expired_key = FLEET.user("old-gate", expires=int(time.time()) - 60)
    violation = (FabricUnavailable, REFUSED_BY_SERVER)
    mismatch = f"nkey seed is of user {public(REVOKED_KEY)}, its JWT is of user {public(GATE_KEY)}"
    cases: list[tuple[str, tuple[type[Exception], str], Any]] = [
        (creds(fleet, "revoked", REVOKED_JWT, REVOKED_KEY), violation, REVOKED_KEY),
        (creds(fleet, "stranger", stranger_jwt, stranger_key), violation, stranger_key),
        (
            creds(fleet, "expired", expired_jwt, expired_key),
            (ConfigError, r"user JWT expired at .* UTC: issue new credentials"),
            expired_key,
        ),
        (creds(fleet, "mismatched", GATE_JWT, REVOKED_KEY), (ConfigError, mismatch), REVOKED_KEY),
        ("fabric/missing.creds", (ConfigError, "missing.creds: No such file"), None),
    ]
    for path, (error, reason), key in cases:
        node = AuthNode(fleet, server.urls, "refused", credentials_file=path)
        with pytest.raises(error, match=reason) as raised:
            node.start()
        node.stop()
        if key is not None:
            assert seed(key) not in str(raised.value)


def test_a_file_that_is_no_credentials_file_is_refused_with_what_it_lacks(
    fleet: Fleet, server: NatsCluster
) -> None:
    home = fleet.config.home
    for name, text, reason in [
        ("empty", "", "no user JWT"),
        ("jwt-only", f"-----BEGIN NATS USER JWT-----\n{GATE_JWT}\n", "no user nkey seed"),
        ("seed-only", f"-----BEGIN USER NKEY SEED-----\n{seed(GATE_KEY)}\n", "no user JWT"),
    ]:
        path = home / "fabric" / f"{name}.creds"
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        path.chmod(0o600)
        node = AuthNode(fleet, server.urls, "refused", credentials_file=str(path))
        with pytest.raises(ConfigError, match=f"not a NATS credentials file: {reason}"):
            node.start()
        node.stop()
    account_jwt = OPERATOR.account_jwt(FLEET)  # an account's JWT where the user's belongs
    path = creds(fleet, "account", account_jwt, GATE_KEY)
    node = AuthNode(fleet, server.urls, "refused", credentials_file=path)
    with pytest.raises(ConfigError, match="its JWT is a account JWT, not a user's"):
        node.start()
    node.stop()


@pytest.mark.parametrize("mode", [0o640, 0o604])
def test_credentials_group_or_others_may_read_are_refused(
    fleet: Fleet, server: NatsCluster, mode: int
) -> None:
    path = creds(fleet, f"loose-{mode:o}", GATE_JWT, GATE_KEY, mode)
    node = AuthNode(fleet, server.urls, "loose", credentials_file=path)
    with pytest.raises(ConfigError, match=r"credentials_file .* readable by others .* chmod 600"):
        node.start()
    node.stop()
    seed_path = fleet.config.home / "fabric" / f"loose-{mode:o}.nk"
    seed_path.write_text(seed(GATE_KEY))
    seed_path.chmod(mode)
    node = AuthNode(fleet, server.urls, "loose", nkey_seed_file=str(seed_path))
    with pytest.raises(ConfigError, match=r"nkey_seed_file .* readable by others"):
        node.start()
    node.stop()


# -- a bare user nkey ------------------------------------------------------------------------------


NKEY_USER = new_key(nkeys.PREFIX_BYTE_USER)


@pytest.fixture(scope="module")
def nkey_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    """One nats-server whose FLEET account admits one user, by its public nkey only."""
    extra = f"""
accounts {{
  FLEET {{
    jetstream: enabled
    users: [ {{ nkey: {public(NKEY_USER)} }} ]
  }}
}}
"""
    with NatsCluster(tmp_path_factory.mktemp("nats-nkey"), size=1, extra=extra) as running:
        yield running


def seed_file(fleet: Fleet, key: Any, name: str) -> str:
    path = fleet.config.home / "fabric" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(seed(key) + "\n")
    path.chmod(0o600)
    return str(path.relative_to(fleet.config.home))


def test_a_node_logs_in_with_a_bare_user_nkey_seed(fleet: Fleet, nkey_server: NatsCluster) -> None:
    node = AuthNode(
        fleet, nkey_server.urls, "node-a", nkey_seed_file=seed_file(fleet, NKEY_USER, "node.nk")
    ).start()
    try:
        connections = nkey_server.nodes[0].http_json("/connz?auth=1")["connections"]
        ours = [c for c in connections if c.get("name") == "fleetgate-node-a"]
        assert ours and ours[0]["authorized_user"] == public(NKEY_USER)
    finally:
        node.stop()
    for prefix, error, reason in [
        (nkeys.PREFIX_BYTE_USER, FabricUnavailable, REFUSED_BY_SERVER),  # unlisted
        (nkeys.PREFIX_BYTE_ACCOUNT, ConfigError, "not a user nkey seed"),
    ]:
        key = new_key(prefix)
        path = seed_file(fleet, key, f"{prefix}.nk")
        node = AuthNode(fleet, nkey_server.urls, "refused", nkey_seed_file=path)
        with pytest.raises(error, match=reason) as raised:
            node.start()
        node.stop()
        assert seed(key) not in str(raised.value)


# -- configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "logins",
    [
        'user = "u"\npassword_file = "p"\nnkey_seed_file = "s"',
        'credentials_file = "c"\nnkey_seed_file = "s"',
    ],
)
def test_one_login_at_a_time(tmp_path: Path, logins: str) -> None:
    (tmp_path / "fleetgate.toml").write_text(f'[fabric]\nservers = ["nats://n:4222"]\n{logins}\n')
    with pytest.raises(ConfigError, match="three ways to log in: give one"):
        load_config(tmp_path, environ={})
