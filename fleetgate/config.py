"""Configuration: one data directory, one TOML file, ``FLEETGATE_*`` environment overrides.

The data directory (``./fleet-data`` unless ``FLEETGATE_HOME`` says otherwise) holds
``fleetgate.toml``, the registry database, CA material and logs. Every setting has a default that
works on localhost, so an empty directory is a valid configuration. An environment variable
``FLEETGATE_<SECTION>_<KEY>`` (e.g. ``FLEETGATE_ENROLLMENT_PORT``) overrides the file.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetgate.errors import ConfigError

CONFIG_FILE = "fleetgate.toml"
PASSPHRASE_ENV = "FLEETGATE_CA_PASSPHRASE"  # noqa: S105 - a variable name, not a secret


@dataclass(frozen=True)
class CASettings:
    """How the CA issues: curves, lifetimes and the URLs printed into certificates."""

    root_curve: str = "P-256"
    passphrase_file: str = ""
    device_validity_days: int = 90
    station_validity_days: int = 7  # short-lived: stations renew over EST (simplereenroll)
    server_validity_days: int = 365
    crl_next_update_hours: int = 24
    ocsp_validity_minutes: int = 60
    crl_url: str = "https://localhost:8443/crl"
    ocsp_url: str = "https://localhost:8443/ocsp"
    # Where the CA keys live: "file" (encrypted PEM under ca/) or "pkcs11" (a token; the PIN from
    # FLEETGATE_PKCS11_PIN or pkcs11_pin_file, never the command line or this file).
    key_store: str = "file"
    pkcs11_module: str = ""
    pkcs11_token_label: str = ""
    pkcs11_key_label: str = "fleetgate-issuing"
    pkcs11_root_key_label: str = ""  # empty: the root key stays in an encrypted file
    pkcs11_pin_file: str = ""
    # How often a running enrollment service and broker look for a rotated CA in the registry.
    authority_poll_interval_s: float = 1.0


@dataclass(frozen=True)
class EnrollmentSettings:
    """The EST (RFC 7030) HTTPS endpoint. Client certificates are optional there (``cacerts`` is
    public), so anyone who reaches the port gets these bounds (issue 11; docs/threat-model.md):
    deadlines for each stage of a connection, and caps on the connections held at once.

    ``max_connections`` of 0 means "derived from the open-file limit" (it minus a reserve for
    the database, logs and CA files), so the process never runs out of descriptors to accept.
    """

    host: str = "127.0.0.1"
    port: int = 8443
    server_names: tuple[str, ...] = ("localhost", "127.0.0.1")
    max_body_bytes: int = 16384
    tls_handshake_timeout_s: float = 10.0
    idle_timeout_s: float = 15.0
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 0
    max_connections_per_address: int = 128


@dataclass(frozen=True)
class DeviceLimits:
    """What one device may hold in and demand of a broker (issue 11: a stolen device with a valid
    certificate must not exhaust it). Sizes are bytes; rates are per second, with a burst.

    ``connect_*`` applies before the registry is asked, so before the group is known: only the
    ``[broker.limits]`` defaults count for it. ``max_queued_messages`` is further capped by
    ``[broker] max_queued_messages``, the broker-wide ceiling.

    ``overflow_policy`` is what a full queue of a device's session does with one more QoS 1/2
    message (:data:`OVERFLOW_POLICIES`; docs/threat-model.md says why ``backpressure`` is the
    default); ``max_backpressure_s`` bounds how long its full queue may hold a publisher.
    ``receive_maximum`` is the Receive Maximum a device is granted (MQTT 5 CONNACK, capped by
    ``[broker] receive_maximum``): its QoS 1/2 PUBLISHes unacknowledged at once, which bounds
    what it has in flight toward a slow subscriber (broker/limits.py, "Receive Maximum").
    """

    max_subscriptions: int = 100
    max_topic_bytes: int = 1024
    max_topic_levels: int = 16
    max_retained_messages: int = 100
    max_retained_bytes: int = 1024 * 1024
    max_queued_messages: int = 1000
    max_queued_bytes: int = 8 * 1024 * 1024
    max_inflight: int = 64
    publish_rate: float = 1000.0
    publish_burst: int = 1000
    connect_rate: float = 1.0
    connect_burst: int = 20
    overflow_policy: str = "backpressure"
    max_backpressure_s: float = 10.0
    receive_maximum: int = 20


OVERFLOW_POLICIES = ("backpressure", "drop-new", "drop-oldest")
"""``[broker.limits] overflow_policy``: hold the publishers, refuse the newest, evict the oldest."""


@dataclass(frozen=True)
class LimitSettings:
    """``[broker.limits]`` (every group's defaults) and ``[broker.limits.groups.<group>]``
    (one group's overrides, the other keys inherited from the defaults)."""

    default: DeviceLimits = DeviceLimits()
    groups: tuple[tuple[str, DeviceLimits], ...] = ()

    def for_group(self, group: str) -> DeviceLimits:
        for name, limits in self.groups:
            if name == group:
                return limits
        return self.default


@dataclass(frozen=True)
class BrokerSettings:
    """The MQTT broker: a mutual-TLS listener, an optional plaintext test listener, /metrics.

    ``plaintext_port`` and ``metrics_port`` of 0 turn those listeners off; the plaintext one
    binds only to a loopback address and maps every client to ``plaintext_identity``.

    ``max_keep_alive_s`` caps an MQTT 5 client's keep-alive (CONNACK Server Keep Alive): one
    asking for more, or for none (0), is told this value and held to 1.5 times it, so a
    half-open connection (a device that lost power behind a NAT) ends, and its will goes out,
    within 15 minutes instead of whenever the kernel gives up on the socket. 600 leaves the
    usual 30-120 s keep-alives (paho's and the SDK's 60, a bridge's 30) alone; 0 is no cap.
    An MQTT 3.1.1 client cannot be told, so it keeps the keep-alive it asked for.

    ``node_name`` names this broker process in audit rows, logs and ``/metrics`` (several
    brokers share one registry, with or without ``[fabric]``); default ``<host>-<port>``, see
    :func:`node_name`.
    """

    node_name: str = ""
    host: str = "127.0.0.1"
    port: int = 8883
    server_names: tuple[str, ...] = ("localhost", "127.0.0.1")
    allow_tls12: bool = False
    tls_handshake_timeout_s: float = 10.0
    plaintext_host: str = "127.0.0.1"
    plaintext_port: int = 0
    plaintext_identity: str = ""
    metrics_port: int = 9883
    max_packet_size: int = 262144
    max_queued_messages: int = 1000
    receive_maximum: int = 64
    max_keep_alive_s: int = 600
    feed_poll_interval_s: float = 0.1
    limits: LimitSettings = LimitSettings()


@dataclass(frozen=True)
class AttestationSettings:
    """Hardware key attestation: whose TPMs and cards are trusted, and how long a nonce lives.

    Each trust store is a directory of PEM certificates (relative paths are under the data
    directory): the TPM manufacturers' EK-certificate CAs, and the card manufacturers'
    attestation CAs. An empty or missing directory trusts no hardware of that kind.
    The manufacturers' CRLs go in the same directories (``*.crl``, or PEM in ``*.pem``);
    ``hardware_crl`` says what a missing one means: "require" (refuse), "if-present" (accept,
    noted in the audit trail) or "ignore" (no revocation check). A stale CRL is refused unless
    "ignore". docs/threat-model.md says why "if-present" is the default.
    """

    tpm_manufacturer_cas: str = "trust/tpm-manufacturers"
    card_manufacturer_cas: str = "trust/card-manufacturers"
    challenge_ttl_s: int = 120
    hardware_crl: str = "if-present"


@dataclass(frozen=True)
class BridgeRule:
    """One topic mapping of a bridge: ``local`` filter <-> ``remote`` filter; ``{site}`` in
    either is the bridge's ``site``, and wildcards map to wildcards in order."""

    local: str
    remote: str


@dataclass(frozen=True)
class BridgeSettings:
    """One ``[[bridge]]``: store-and-forward to one upstream MQTT broker over mutual TLS 1.3.

    ``keystore`` is a device-SDK key store directory (``device.key``, ``device.crt``,
    ``ca.crt``) holding the bridge's client identity at the upstream; ``ca_file`` (default: the
    key store's ``ca.crt``) verifies the upstream's server certificate for ``server_name``
    (default: ``host``). Relative paths are under the data directory. Inbound messages are
    published locally under the ACL template of ``local_group``, with ``%d`` = ``name``.
    """

    name: str
    host: str
    port: int = 8883
    protocol: str = "5"
    keystore: str = ""
    ca_file: str = ""
    server_name: str = ""
    client_id: str = ""
    site: str = ""
    local_group: str = "bridges"
    out: tuple[BridgeRule, ...] = ()
    inbound: tuple[BridgeRule, ...] = ()
    queue_max_messages: int = 100_000
    queue_max_bytes: int = 64 * 1024 * 1024
    max_inflight: int = 64
    keepalive_s: int = 30
    session_expiry_s: int = 86400
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    connect_timeout_s: float = 10.0


@dataclass(frozen=True)
class DatabaseSettings:
    """The registry database; an empty URL means SQLite in the data directory."""

    url: str = ""


@dataclass(frozen=True)
class LogSettings:
    """Structured logs: JSON lines on stderr and in ``logs/fleetgate.log``."""

    level: str = "INFO"


@dataclass(frozen=True)
class FabricSettings:
    """``[fabric]``: this broker node is one of several sharing a NATS cluster (issue 12).

    Without the section the broker is one process with everything in memory. ``servers`` are
    NATS URLs (``nats://`` or ``tls://``); the TLS files and ``credentials_file`` (a NATS
    ``.creds`` file) are paths resolved against the data directory. ``user`` with
    ``password_file`` logs in as a NATS user (the password is read from the file, owner-only,
    never from the command line or the environment). ``node_name`` is the older spelling of
    ``[broker] node_name`` (used when that is empty); ``replicas`` is the copy count of the
    fabric's JetStream streams and KV buckets. ``nkey_seed_file`` logs in with a bare NATS user
    nkey (its seed, ``SU…``, owner-only) instead. ``stream_max_bytes`` and ``stream_max_age_s``
    bound ``FG_MSGS``, the stored copies of QoS 1/2 messages: when it is full, new ones are
    refused (0x97) rather than old ones dropped, so a device cannot fill the NATS servers'
    disks and nothing acknowledged is lost. ``local`` has the broker start and supervise one
    nats-server (R1, store in the data directory, client port ``local_port`` on loopback, user
    ``fleetgate`` with a password made up on first start) instead of reaching ``servers``;
    ``local_binary`` names that server.
    """

    servers: tuple[str, ...] = ()
    node_name: str = ""
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    credentials_file: str = ""
    nkey_seed_file: str = ""
    user: str = ""
    password_file: str = ""
    replicas: int = 3
    stream_max_bytes: int = 4 * 1024**3
    stream_max_age_s: float = 24 * 3600.0
    connect_timeout_s: float = 5.0
    local: bool = False
    local_port: int = 4222
    local_binary: str = ""


_FABRIC_SECTION = "fabric"
MIN_STREAM_BYTES = 64 * 1024


def _build_fabric(raw: dict[str, Any], env: Any) -> FabricSettings | None:
    """The ``[fabric]`` section (or ``FLEETGATE_FABRIC_SERVERS``), checked; None without it."""
    if _FABRIC_SECTION not in raw and "FLEETGATE_FABRIC_SERVERS" not in env:
        return None
    fabric: FabricSettings = _build_section(
        _FABRIC_SECTION, FabricSettings, raw.get(_FABRIC_SECTION, {}), env
    )
    if fabric.local:
        if fabric.servers:
            raise ConfigError("[fabric] local = true runs its own nats-server: leave servers out")
        if not 1 <= fabric.local_port <= 65535:
            raise ConfigError("[fabric] local_port must be between 1 and 65535")
        fabric = dataclasses.replace(
            fabric,
            servers=(f"nats://127.0.0.1:{fabric.local_port}",),
            replicas=1,
            user=fabric.user or "fleetgate",
            password_file=fabric.password_file or "fabric/local.password",
        )
    if not fabric.servers:
        raise ConfigError('[fabric] needs servers, e.g. servers = ["nats://nats-1:4222"]')
    for url in fabric.servers:
        if not url.startswith(("nats://", "tls://")):
            raise ConfigError(f"[fabric] servers: {url!r} is not a nats:// or tls:// URL")
    if bool(fabric.tls_cert_file) != bool(fabric.tls_key_file):
        raise ConfigError("[fabric] tls_cert_file and tls_key_file go together")
    if bool(fabric.user) != bool(fabric.password_file):
        raise ConfigError("[fabric] user and password_file go together")
    logins = [fabric.user, fabric.credentials_file, fabric.nkey_seed_file]
    if sum(map(bool, logins)) > 1:
        raise ConfigError(
            "[fabric] user/password_file, credentials_file and nkey_seed_file are three ways "
            "to log in: give one, not both"
        )
    if fabric.stream_max_bytes < MIN_STREAM_BYTES:
        raise ConfigError(
            f"[fabric] stream_max_bytes must be at least {MIN_STREAM_BYTES} (64 KiB); "
            "size it as QoS 1/2 bytes per second x stream_max_age_s"
        )
    if fabric.stream_max_age_s <= 0:
        raise ConfigError("[fabric] stream_max_age_s must be > 0")
    if not 1 <= fabric.replicas <= 5:
        raise ConfigError("[fabric] replicas must be between 1 and 5")
    _check_node_name("fabric", fabric.node_name)
    if fabric.connect_timeout_s <= 0:
        raise ConfigError("[fabric] connect_timeout_s must be > 0")
    return fabric


@dataclass(frozen=True)
class Config:
    """The whole configuration, bound to its data directory."""

    home: Path
    ca: CASettings = field(default_factory=CASettings)
    enrollment: EnrollmentSettings = field(default_factory=EnrollmentSettings)
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    attestation: AttestationSettings = field(default_factory=AttestationSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    log: LogSettings = field(default_factory=LogSettings)
    bridges: tuple[BridgeSettings, ...] = ()
    fabric: FabricSettings | None = None  # None: one process, everything in memory

    @property
    def ca_dir(self) -> Path:
        return self.home / "ca"

    @property
    def stations_dir(self) -> Path:
        return self.home / "stations"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    def data_path(self, setting: str) -> Path:
        """A path setting resolved against the data directory unless it is absolute."""
        path = Path(setting)
        return path if path.is_absolute() else self.home / path

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{self.home / 'registry.db'}"

    def read_passphrase(self) -> bytes | None:
        """The CA passphrase from ``FLEETGATE_CA_PASSPHRASE`` or ``ca.passphrase_file``."""
        value = os.environ.get(PASSPHRASE_ENV)
        if value:
            return value.encode()
        if self.ca.passphrase_file:
            path = Path(self.ca.passphrase_file)
            if not path.is_absolute():
                path = self.home / path
            try:
                return path.read_bytes().strip() or None
            except OSError as exc:
                raise ConfigError(f"cannot read CA passphrase file {path}: {exc.strerror}") from exc
        return None


_SECTIONS: dict[str, type[Any]] = {
    "ca": CASettings,
    "enrollment": EnrollmentSettings,
    "broker": BrokerSettings,
    "attestation": AttestationSettings,
    "database": DatabaseSettings,
    "log": LogSettings,
}


def default_home() -> Path:
    return Path(os.environ.get("FLEETGATE_HOME", "fleet-data")).absolute()


def load_config(home: Path | None = None, environ: dict[str, str] | None = None) -> Config:
    """Read ``<home>/fleetgate.toml`` (optional) and apply ``FLEETGATE_*`` overrides."""
    home = (home or default_home()).absolute()
    env = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    path = home / CONFIG_FILE
    if path.exists():
        try:
            raw = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    unknown = set(raw) - set(_SECTIONS) - {_BRIDGE_SECTION, _FABRIC_SECTION}
    if unknown:
        raise ConfigError(
            f"{path}: unknown section(s) {sorted(unknown)}; "
            f"known: {sorted([*_SECTIONS, _BRIDGE_SECTION, _FABRIC_SECTION])}"
        )
    broker_table = raw.get("broker", {})
    limits_table: Any = {}
    if isinstance(broker_table, dict) and _LIMITS_KEY in broker_table:
        broker_table = dict(broker_table)
        limits_table = broker_table.pop(_LIMITS_KEY)
    raw["broker"] = broker_table
    sections = {
        name: _build_section(name, cls, raw.get(name, {}), env) for name, cls in _SECTIONS.items()
    }
    sections["broker"] = dataclasses.replace(
        sections["broker"], limits=_build_limits(limits_table, env)
    )
    _check_enrollment(sections["enrollment"])
    if sections["attestation"].hardware_crl not in _HARDWARE_CRL_POLICIES:
        raise ConfigError(
            f"[attestation] hardware_crl is {' or '.join(map(repr, _HARDWARE_CRL_POLICIES))}, "
            f"not {sections['attestation'].hardware_crl!r}"
        )
    _check_node_name("broker", sections["broker"].node_name)
    bridges = _build_bridges(raw.get(_BRIDGE_SECTION, []))
    return Config(home=home, **sections, bridges=bridges, fabric=_build_fabric(raw, env))


_LIMITS_KEY = "limits"
_HARDWARE_CRL_POLICIES = ("require", "if-present", "ignore")  # trust.CrlPolicy's values
_NODE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _check_node_name(section: str, name: str) -> None:
    if name and not _NODE_NAME.fullmatch(name):
        raise ConfigError(
            f"[{section}] node_name {name!r}: 1-64 of A-Z a-z 0-9 _ - (it becomes a NATS "
            "subject token)"
        )


def node_name(config: Config) -> str:
    """This broker process's name: ``[broker] node_name``, else ``[fabric] node_name``, else
    ``<host>-<port>`` (the host name's first label, as a subject token, and the MQTT port),
    which differs between brokers on one host and stays the same across restarts."""
    if config.broker.node_name:
        return config.broker.node_name
    if config.fabric is not None and config.fabric.node_name:
        return config.fabric.node_name
    host = socket.gethostname().split(".")[0]
    host = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in host)[:50] or "node"
    return f"{host}-{config.broker.port}"


def _check_enrollment(settings: EnrollmentSettings) -> None:
    """A deadline or per-address cap of 0 would refuse every client rather than bound them."""
    for name in (
        "tls_handshake_timeout_s",
        "idle_timeout_s",
        "header_timeout_s",
        "body_timeout_s",
        "max_connections_per_address",
    ):
        if getattr(settings, name) <= 0:
            raise ConfigError(f"[enrollment] {name} must be above 0, not {getattr(settings, name)}")
    if settings.max_connections < 0:
        raise ConfigError("[enrollment] max_connections must be 0 (automatic) or above")


def _build_limits(table: Any, env: Any) -> LimitSettings:
    """``[broker.limits]`` with ``FLEETGATE_BROKER_LIMITS_<KEY>`` overrides, then each
    ``[broker.limits.groups.<group>]`` on top of those defaults (no environment overrides: a
    group name is no part of a variable name). Every count and size is at least 1, every rate
    above 0: a limit of 0 would lock a device out rather than bound it."""
    if not isinstance(table, dict):
        raise ConfigError(f"[broker.limits] must be a table of settings, not {table!r}")
    table = dict(table)
    groups = table.pop("groups", {})
    if not isinstance(groups, dict) or not all(isinstance(g, dict) for g in groups.values()):
        raise ConfigError("[broker.limits.groups.<group>] must be tables of settings")
    default = _check_limits(
        "[broker.limits]", _build_section("broker.limits", DeviceLimits, table, env)
    )
    overrides = []
    for group, group_table in sorted(groups.items()):
        where = f"broker.limits.groups.{group}"
        changed = _build_section(where, DeviceLimits, group_table, {})
        values = {k: getattr(changed, k) for k in group_table}
        overrides.append(
            (group, _check_limits(f"[{where}]", dataclasses.replace(default, **values)))
        )
    return LimitSettings(default, tuple(overrides))


def _check_limits(where: str, limits: DeviceLimits) -> DeviceLimits:
    if limits.overflow_policy not in OVERFLOW_POLICIES:
        raise ConfigError(
            f"{where} overflow_policy must be one of {', '.join(OVERFLOW_POLICIES)}, "
            f"not {limits.overflow_policy!r}"
        )
    for fld in dataclasses.fields(DeviceLimits):
        value = getattr(limits, fld.name)
        if not isinstance(value, str) and value <= 0:
            raise ConfigError(f"{where} {fld.name} must be above 0, not {value}")
    return limits


_BRIDGE_SECTION = "bridge"
_BRIDGE_RULE_KEYS = {"out": "out", "in": "inbound"}  # TOML key -> BridgeSettings field


def _build_bridges(tables: Any) -> tuple[BridgeSettings, ...]:
    """``[[bridge]]`` tables, each with ``[[bridge.out]]`` / ``[[bridge.in]]`` rule tables.

    Bridges are a list, so they take no ``FLEETGATE_*`` overrides; the topic rules themselves
    are checked when the broker starts (:mod:`broker.bridge`).
    """
    if not isinstance(tables, list):
        raise ConfigError("bridges are [[bridge]] tables (an array of tables), not [bridge]")
    fields = {f.name: f for f in dataclasses.fields(BridgeSettings)}
    scalar = {k: f for k, f in fields.items() if k not in _BRIDGE_RULE_KEYS.values()}
    bridges: list[BridgeSettings] = []
    for index, table in enumerate(tables):
        where = f"[[bridge]] #{index + 1}"
        if not isinstance(table, dict):
            raise ConfigError(f"{where} must be a table of settings, not {table!r}")
        if not isinstance(table.get("name"), str) or not table.get("name"):
            raise ConfigError(f'{where} needs a name (name = "central")')
        where = f"[[bridge]] {table['name']}"
        known = set(scalar) | set(_BRIDGE_RULE_KEYS)
        unknown = set(table) - known
        if unknown:
            raise ConfigError(
                f"{where} has unknown key(s) {sorted(unknown)}; known: {sorted(known)}"
            )
        values: dict[str, Any] = {}
        for key, fld in scalar.items():
            if key not in table:
                continue
            if fld.default is dataclasses.MISSING:  # name, host: text without a default
                if not isinstance(table[key], str):
                    raise ConfigError(f"{where} {key}: {table[key]!r} is not a valid str")
                values[key] = table[key]
            else:
                values[key] = _coerce(f"{where} {key}", table[key], fld.default)
        for toml_key, field_name in _BRIDGE_RULE_KEYS.items():
            values[field_name] = _build_rules(f"{where} {toml_key}", table.get(toml_key, []))
        if "host" not in values:
            raise ConfigError(f"{where} needs the upstream broker's host")
        bridges.append(BridgeSettings(**values))
    names = [bridge.name for bridge in bridges]
    if len(set(names)) != len(names):
        raise ConfigError(f"bridge names must be unique, got {names}")
    return tuple(bridges)


def _build_rules(where: str, tables: Any) -> tuple[BridgeRule, ...]:
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"{where}: rules are tables with local and remote, e.g. [[bridge.out]]")
    rules = []
    for table in tables:
        if set(table) != {"local", "remote"} or not all(
            isinstance(v, str) and v for v in table.values()
        ):
            raise ConfigError(
                f"{where}: each rule has exactly a local and a remote topic filter, not {table!r}"
            )
        rules.append(BridgeRule(local=table["local"], remote=table["remote"]))
    return tuple(rules)


def _build_section(name: str, cls: type[Any], table: Any, env: Any) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"[{name}] must be a table of settings, not {table!r}")
    fields = {
        f.name: f for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(f.default)
    }  # a nested table (broker.limits) is built on its own
    unknown = set(table) - set(fields)
    if unknown:
        raise ConfigError(f"[{name}] has unknown key(s) {sorted(unknown)}; known: {sorted(fields)}")
    values: dict[str, Any] = {}
    for key, fld in fields.items():
        default = fld.default
        env_name = f"FLEETGATE_{name.replace('.', '_').upper()}_{key.upper()}"
        if env_name in env:
            values[key] = _coerce(env_name, env[env_name], default)
        elif key in table:
            values[key] = _coerce(f"[{name}] {key}", table[key], default)
    return cls(**values)


def _coerce(where: str, value: Any, default: Any) -> Any:
    """Convert a TOML or environment value to the type of the field's default."""
    try:
        if isinstance(default, bool):
            return value if isinstance(value, bool) else str(value).lower() in {"1", "true", "yes"}
        if isinstance(value, bool):  # TOML true/false is no number or text
            raise TypeError(value)
        if isinstance(default, int):
            if isinstance(value, float):  # int() would silently truncate 8443.5
                raise TypeError(value)
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, tuple):
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(str(item).strip() for item in items if str(item).strip())
        if not isinstance(value, str):  # str() would turn a list into "['...']"
            raise TypeError(value)
        return value
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {value!r} is not a valid {type(default).__name__}") from exc


DEFAULT_CONFIG_TOML = """\
# fleetgate configuration. Every key is optional; FLEETGATE_<SECTION>_<KEY> overrides it.
# The CA passphrase is never stored here: set FLEETGATE_CA_PASSPHRASE or ca.passphrase_file.

[ca]
root_curve = "P-256"          # or "P-384"
device_validity_days = 90
crl_next_update_hours = 24
crl_url = "https://localhost:8443/crl"
ocsp_url = "https://localhost:8443/ocsp"
key_store = "file"            # or "pkcs11": CA keys in a token (docs/operations.md)
# pkcs11_module = "/usr/lib/softhsm/libsofthsm2.so"
# pkcs11_token_label = "fleetgate"
# pkcs11_key_label = "fleetgate-issuing"
# pkcs11_pin_file = "pkcs11.pin"   # or FLEETGATE_PKCS11_PIN

[enrollment]
host = "127.0.0.1"
port = 8443
server_names = ["localhost", "127.0.0.1"]
max_body_bytes = 16384
tls_handshake_timeout_s = 10.0
idle_timeout_s = 15.0         # a kept-alive connection with no request is closed after this
header_timeout_s = 10.0       # from a request's first byte to the end of its headers
body_timeout_s = 30.0         # to read a request's body once its headers are in
max_connections = 0           # 0: the open-file limit minus a reserve
max_connections_per_address = 128

[broker]
host = "127.0.0.1"            # 0.0.0.0 to accept devices on every interface
port = 8883                   # MQTT over mutual TLS; TLS 1.3 unless allow_tls12 = true
server_names = ["localhost", "127.0.0.1"]
allow_tls12 = false
plaintext_port = 0            # test suites only: loopback, every client = plaintext_identity
plaintext_identity = ""
metrics_port = 9883           # Prometheus /metrics on 127.0.0.1; 0 turns it off
max_packet_size = 262144
max_queued_messages = 1000    # per session, QoS 1/2 while the device is away
max_keep_alive_s = 600        # MQTT 5 clients asking more (or 0, none) are told this; 0: no cap
feed_poll_interval_s = 0.1    # how often revocations are read from the registry

[broker.limits]               # per device; docs/threat-model.md says why each default
max_subscriptions = 100
max_topic_bytes = 1024        # a topic filter or published topic name, UTF-8 bytes
max_topic_levels = 16
max_retained_messages = 100   # retained messages a device published that the broker holds
max_retained_bytes = 1048576
max_queued_messages = 1000    # per session, also capped by [broker] max_queued_messages
max_queued_bytes = 8388608
max_inflight = 64             # QoS 1/2 sent to the device and not yet acknowledged
publish_rate = 1000.0         # messages/s; a faster device is slowed (not read), not refused
publish_burst = 1000
connect_rate = 1.0            # CONNECTs/s per device id, before the registry is asked
connect_burst = 20
overflow_policy = "backpressure"  # a full queue holds its publishers; or drop-new, drop-oldest
max_backpressure_s = 10.0     # then that queue drops new messages until it has drained
receive_maximum = 20          # QoS 1/2 a device may have unacknowledged (MQTT 5 CONNACK)

# [broker.limits.groups.controllers]   # one group's overrides; other keys as above
# max_subscriptions = 1000

[database]
url = ""                      # empty: SQLite at <home>/registry.db; or postgresql+psycopg://...
"""
