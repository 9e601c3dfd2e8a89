"""``[fabric]`` in fleetgate.toml: absent means one in-memory process; present, it is checked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fleetgate.config import FabricSettings, load_config
from fleetgate.errors import ConfigError


def _load(tmp_path: Path, toml: str, environ: dict[str, str] | None = None) -> Any:
    (tmp_path / "fleetgate.toml").write_text(toml)
    return load_config(tmp_path, environ=environ or {}).fabric


def test_without_the_section_the_broker_is_embedded(tmp_path: Path) -> None:
    assert _load(tmp_path, "[broker]\nport = 8883\n") is None


def test_the_section_is_read(tmp_path: Path) -> None:
    fabric = _load(
        tmp_path,
        """
[fabric]
servers = ["tls://nats-1:4222", "tls://nats-2:4222"]
node_name = "gate-1"
tls_ca_file = "fabric/ca.crt"
tls_cert_file = "fabric/node.crt"
tls_key_file = "fabric/node.key"
credentials_file = "fabric/node.creds"
replicas = 5
""",
    )
    assert fabric == FabricSettings(
        servers=("tls://nats-1:4222", "tls://nats-2:4222"),
        node_name="gate-1",
        tls_ca_file="fabric/ca.crt",
        tls_cert_file="fabric/node.crt",
        tls_key_file="fabric/node.key",
        credentials_file="fabric/node.creds",
        replicas=5,
    )


def test_the_environment_alone_can_turn_it_on(tmp_path: Path) -> None:
    environ = {"FLEETGATE_FABRIC_SERVERS": "nats://a:4222, nats://b:4222"}
    fabric = _load(tmp_path, "", environ)
    assert fabric is not None and fabric.servers == ("nats://a:4222", "nats://b:4222")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("", "needs servers"),
        ('servers = ["http://nats:4222"]', "not a nats:// or tls:// URL"),
        ('servers = ["nats://n:4222"]\ntls_cert_file = "c"', "go together"),
        ('servers = ["nats://n:4222"]\nreplicas = 0', "between 1 and 5"),
        ('servers = ["nats://n:4222"]\nreplicas = 7', "between 1 and 5"),
        ('servers = ["nats://n:4222"]\nnode_name = "a.b"', "node_name"),
        ('servers = ["nats://n:4222"]\nconnect_timeout_s = 0', "connect_timeout_s"),
        ('servers = ["nats://n:4222"]\nurl = "x"', "unknown key"),
        ('servers = ["nats://n:4222"]\nuser = "fleetgate"', "go together"),
        ('servers = ["nats://n:4222"]\npassword_file = "p"', "go together"),
        (
            'servers = ["nats://n:4222"]\nuser = "u"\npassword_file = "p"\ncredentials_file = "c"',
            "not both",
        ),
        ('local = true\nservers = ["nats://n:4222"]', "leave servers out"),
        ("local = true\nlocal_port = 0", "local_port"),
    ],
)
def test_mistakes_are_refused(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, f"[fabric]\n{body}\n")


def test_a_local_fabric_is_one_loopback_server_with_one_replica(tmp_path: Path) -> None:
    fabric = _load(tmp_path, "[fabric]\nlocal = true\nlocal_port = 4333\n")
    assert fabric.servers == ("nats://127.0.0.1:4333",)
    assert fabric.replicas == 1
    assert (fabric.user, fabric.password_file) == ("fleetgate", "fabric/local.password")
