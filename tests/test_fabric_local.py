"""``[fabric] local = true`` (issue 12, "one machine, durable"): ``fleetgate serve broker``
starts one nats-server with JetStream in the data directory, keeps QoS 1 messages there,
starts it again when it dies, stops it by PID when the broker stops, and refuses to start
without a nats-server binary, saying where to get one."""

# ruff: noqa: F811 - the tests take the `pair` fixture imported from test_broker_delivery

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import nats
import pytest
from broker_helpers import Creds, Paho, free_port, wait_for
from conftest import Fleet
from test_broker_delivery import pair  # noqa: F401 (pair: sensor-1, ops-1)

from broker.fabric.durable import STREAM
from broker.fabric.local import LocalNats
from broker.fabric.node import FabricUnavailable
from fleetgate.config import CONFIG_FILE, load_config

FLEETGATE = str(Path(sys.executable).with_name("fleetgate"))


class ServeBroker:
    """``fleetgate serve broker [args]`` on the fleet's data directory, with its log."""

    def __init__(self, fleet: Fleet, *args: str, metrics_port: int = 0) -> None:
        self.fleet = fleet
        self.port = free_port()
        self.log = fleet.config.home / f"serve-{self.port}.log"
        env = {
            **os.environ,
            "FLEETGATE_HOME": str(fleet.config.home),
            "FLEETGATE_BROKER_PORT": str(self.port),
            "FLEETGATE_BROKER_METRICS_PORT": str(metrics_port),
        }
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [FLEETGATE, "serve", "broker", *args],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_logged(self, message: str, count: int = 1, timeout: float = 30) -> None:
        def logged() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"serve broker exited:\n{self.text()[-3000:]}")
            return self.text().count(f'"msg": "{message}"') >= count

        wait_for(logged, timeout, f"{message!r} in the log")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            raise


def local_fabric(fleet: Fleet, **extra: Any) -> int:
    """Write ``[fabric] local = true`` (on a free port) into the fleet's fleetgate.toml."""
    port = free_port()
    lines = ["[fabric]", "local = true", f"local_port = {port}"]
    lines += [f"{key} = {value!r}".replace("'", '"') for key, value in extra.items()]
    (fleet.config.home / CONFIG_FILE).write_text("\n".join(lines) + "\n")
    return port


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(")")[1].split()[0] != "Z"


async def stored(port: int, password: str) -> int:
    """How many messages FG_MSGS of the local server holds (asked as the fleetgate user)."""
    nc = await nats.connect(f"nats://127.0.0.1:{port}", user="fleetgate", password=password)
    try:
        info = await nc.jetstream().stream_info(STREAM)
        return int(info.state.messages)
    finally:
        await nc.close()


def test_serve_broker_runs_supervises_and_stops_a_local_nats_server(
    fleet: Fleet, pair: tuple[Creds, Creds]
) -> None:
    sensor_creds, ops_creds = pair
    nats_port = local_fabric(fleet)
    served = ServeBroker(fleet)
    try:
        served.wait_logged("broker listening")
        home = fleet.config.home
        pid = int((home / "fabric" / "nats-local.pid").read_text())
        assert alive(pid)
        password_file = home / "fabric" / "local.password"
        assert password_file.stat().st_mode & 0o777 == 0o600
        assert (home / "fabric" / "nats-local.conf").stat().st_mode & 0o777 == 0o600
        password = password_file.read_text().strip()
        assert password not in served.text()

        sensor, ops = Paho(served, sensor_creds), Paho(served, ops_creds)
        assert sensor.connect()[0] == 0 and ops.connect()[0] == 0
        assert sensor.subscribe("devices/sensor-1/commands/#", 1) == [1]
        assert ops.publish("devices/sensor-1/commands/a", b"1", qos=1) == 0
        assert sensor.message().payload == b"1"
        assert asyncio.run(stored(nats_port, password)) == 1
        assert (home / "fabric" / "jetstream").is_dir()

        # Nobody else on this machine gets in without the password.
        with pytest.raises(Exception, match="Authorization Violation"):
            asyncio.run(nats.connect(f"nats://127.0.0.1:{nats_port}", allow_reconnect=False))

        os.kill(pid, signal.SIGKILL)  # the server dies: started again, the store kept
        served.wait_logged("local nats-server restarted")
        assert '"msg": "local nats-server exited: restarting"' in served.text()
        new_pid = int((home / "fabric" / "nats-local.pid").read_text())
        assert new_pid != pid and alive(new_pid)
        wait_for(lambda: ops.publish("devices/sensor-1/commands/b", b"2", qos=1) == 0, 30)
        assert asyncio.run(stored(nats_port, password)) >= 2
        sensor.close()
        ops.close()
    finally:
        code = served.stop()
    assert code == 0, served.text()[-3000:]
    assert not alive(new_pid)
    assert not (fleet.config.home / "fabric" / "nats-local.pid").exists()
    assert '"msg": "local nats-server stopped"' in served.text()


def test_without_a_nats_server_binary_serve_broker_says_where_to_get_one(fleet: Fleet) -> None:
    local_fabric(fleet, local_binary=str(fleet.config.home / "no-such-nats-server"))
    served = ServeBroker(fleet)
    assert served.process.wait(30) != 0
    text = served.text()
    assert "needs a nats-server 2.10 or newer" in text
    assert "scripts/get-nats-server.sh" in text


def test_a_server_left_running_by_a_killed_broker_is_stopped_first(fleet: Fleet) -> None:
    local_fabric(fleet)
    config = load_config(fleet.config.home)

    async def run() -> None:
        first = LocalNats(config)
        await first.start()
        assert first.pid is not None
        orphan = first.pid  # the broker "dies": nobody stops it
        second = LocalNats(config)
        try:
            await second.start()
            assert second.pid != orphan
            await asyncio.wait_for(first.process.wait(), 10)  # type: ignore[union-attr]
        finally:
            await second.stop()

    asyncio.run(run())


def test_a_local_server_that_cannot_start_is_reported(fleet: Fleet) -> None:
    """The port is taken: the server exits, and the reason from its log is in the error."""
    local_fabric(fleet)
    config = load_config(fleet.config.home)
    assert config.fabric is not None
    import socket

    with socket.create_server(("127.0.0.1", config.fabric.local_port)):

        async def run() -> None:
            with pytest.raises(FabricUnavailable, match="exited at start"):
                async with LocalNats(config):
                    pass

        asyncio.run(run())
