"""DeviceClient: a fleetgate device's MQTT session over mutual TLS 1.3, on paho-mqtt 2.x.

paho's sharp edges are kept inside. paho calls ``on_publish`` while holding its message lock, so
a callback that takes an application lock deadlocks against a thread publishing under that lock;
its reconnect backoff has no jitter; its own offline queue is lost with the client object, which
must be replaced to change the TLS context. So the paho callbacks here only post events; one
worker thread owns the connection, the offline queue and the in-flight window; a fresh paho client
(with the current TLS context) serves each connection; handlers for received messages run on
their own thread, where they may publish, subscribe or block without stalling keep-alives.

QoS 1 messages stay in the client's queue until the broker acknowledges them, so nothing in the
queue is lost when the broker goes away or the certificate is renewed: unacknowledged messages
are sent again, in order, on the next connection (at least once).
"""

from __future__ import annotations

import enum
import logging
import queue
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, cast, runtime_checkable

import paho.mqtt.client as mqtt
from cryptography import x509
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from device_sdk import provisioning
from device_sdk.backoff import Backoff
from device_sdk.ciphers import CipherPolicy
from device_sdk.errors import (
    AckTimeout,
    ClientClosed,
    DeviceSdkError,
    EnrollmentError,
    KeyStoreError,
    NotConnected,
    PublishRefused,
    QueueFull,
    SubscribeRefused,
)
from device_sdk.keystore import KeyStore, RenewingKeyStore, device_id_of
from device_sdk.provisioning import RenewalPolicy, renewal_due
from device_sdk.tls import device_context

log = logging.getLogger("fleetgate.device_sdk")

MqttVersion = Literal["5", "3.1.1"]

_WINDOW = 20  # QoS 1 messages handed to paho at once; the rest wait in the client's queue
_NOT_ADMITTED = "the broker does not admit this device: check it is enrolled, active, not revoked"
_CONNACK_HINTS = {  # MQTT 5 reason codes; paho maps MQTT 3.1.1 return codes onto them
    0x85: "the client id must be the device id named in the certificate",
    0x86: _NOT_ADMITTED,
    0x87: _NOT_ADMITTED,
    0x88: "the broker is unavailable; the client keeps retrying",
    0x89: "the broker is busy; the client keeps retrying",
}


@dataclass(frozen=True)
class Message:
    """A message received on a subscription."""

    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(frozen=True)
class ConnectionInfo:
    """What the current session was established with."""

    mqtt_version: MqttVersion
    tls_version: str
    cipher: str
    certificate_serial: int
    session_present: bool


class Ack:
    """Settles when the broker acknowledges a PUBLISH (QoS 1) or SUBSCRIBE."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._event = threading.Event()
        self._error: DeviceSdkError | None = None

    @property
    def done(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> None:
        """Block until acknowledged; raise the broker's refusal, or :class:`AckTimeout`."""
        if not self._event.wait(timeout):
            raise AckTimeout(f"{self._what} was not acknowledged within {timeout} s")
        if self._error is not None:
            raise self._error

    def _settle(self, error: DeviceSdkError | None = None) -> None:
        if not self._event.is_set():
            self._error = error
            self._event.set()


Handler = Callable[[Message], None]


@dataclass
class _Outgoing:
    topic: str
    payload: bytes
    retain: bool
    ack: Ack


@dataclass
class _Subscription:
    topic_filter: str
    qos: int
    handler: Handler
    ack: Ack


@runtime_checkable
class TlsConnection(Protocol):
    """A live TLS connection: what ``ssl.SSLSocket`` tells of itself, beside paho's socket calls."""

    def version(self) -> str | None: ...

    def cipher(self) -> tuple[str, str, int] | None: ...


class ClientTlsContext(Protocol):
    """The client side of ``ssl.SSLContext``, for keys Python's ``ssl`` cannot use.

    paho takes it through its public ``tls_set_context`` as it takes a stdlib context: it makes
    the TCP connection, wraps it with ``server_hostname`` and, with ``check_hostname`` true,
    leaves the name check to the context. What ``wrap_socket`` returns must also offer the
    calls paho makes on an ``ssl.SSLSocket`` (``settimeout``, ``do_handshake``, ``recv``,
    ``send``, ``pending``, ``fileno``, ``setblocking``, ``close``); tests/test_sdk_paho_tls.py
    holds paho to that list.
    """

    @property
    def check_hostname(self) -> bool: ...

    def wrap_socket(
        self,
        sock: socket.socket,
        *,
        server_hostname: str | None = None,
        do_handshake_on_connect: bool = True,
    ) -> TlsConnection: ...


@runtime_checkable
class ContextKeyStore(Protocol):
    """A key store that makes its own TLS context instead of filling an ``ssl.SSLContext``
    (a smartcard, whose key OpenSSL reaches through PKCS#11 on M2Crypto)."""

    def tls_context(self, cipher_policy: CipherPolicy) -> ClientTlsContext: ...


@dataclass(frozen=True)
class _Identity:
    context: ssl.SSLContext | ClientTlsContext
    serial: int


# Worker events. paho's callbacks post them with the paho client they came from, so events from
# a connection that has since been replaced are recognised and ignored.
@dataclass(frozen=True)
class _Connack:
    client: mqtt.Client
    reason: ReasonCode
    session_present: bool


@dataclass(frozen=True)
class _Closed:
    client: mqtt.Client
    reason: ReasonCode
    by_broker: bool


@dataclass(frozen=True)
class _PubAck:
    client: mqtt.Client
    mid: int
    reason: ReasonCode


@dataclass(frozen=True)
class _SubAck:
    client: mqtt.Client
    mid: int
    reasons: list[ReasonCode]


@dataclass(frozen=True)
class _SocketError:
    """paho's words for a failed read or write; the _Closed that follows gets them."""

    client: mqtt.Client
    text: str


@dataclass(frozen=True)
class _Wake:
    """New messages or subscriptions are waiting."""


@dataclass(frozen=True)
class _NewIdentity:
    identity: _Identity


@dataclass(frozen=True)
class _Stop:
    pass


_Event = _Connack | _Closed | _PubAck | _SubAck | _SocketError | _Wake | _NewIdentity | _Stop


def _no_delay(_: mqtt.Client, __: Any, sock: Any) -> None:
    """TCP_NODELAY before CONNECT: otherwise Nagle holds each small MQTT packet behind the
    previous one's delayed ACK (about 40 ms per CONNACK and per QoS 1 round trip); paho does
    not set it."""
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _State(enum.Enum):
    WAITING = "waiting to reconnect"
    CONNECTING = "waiting for CONNACK"
    CONNECTED = "connected"
    DRAINING = "connected, switching certificates"
    CLOSED = "closed"


class DeviceClient:
    """One device's MQTT session to the fleet broker, kept up until :meth:`close`.

    ``start()`` returns at once and connects in the background; ``wait_connected()`` blocks until
    the session is up. QoS 1 messages published while offline wait in a queue of at most
    ``max_queued`` messages (:class:`QueueFull` beyond); QoS 0 messages are sent now or refused
    with :class:`NotConnected`. With ``est_url`` set, the certificate is renewed over EST once
    ``renewal.fraction`` of its validity has passed, and the session moves to it.
    """

    def __init__(
        self,
        keystore: KeyStore,
        device_id: str,
        *,
        host: str = "localhost",
        port: int = 8883,
        mqtt_version: MqttVersion = "5",
        keepalive: int = 60,
        cipher_policy: CipherPolicy = "auto",
        backoff: Backoff = Backoff(),
        max_queued: int = 1000,
        connect_timeout: float = 10.0,
        session_expiry: int = 0,
        est_url: str | None = None,
        renewal: RenewalPolicy = RenewalPolicy(),
    ) -> None:
        if max_queued < 1:
            raise ValueError(f"max_queued must be at least 1, not {max_queued}")
        self.keystore = keystore
        self.device_id = device_id
        self.host = host
        self.port = port
        self.mqtt_version: MqttVersion = mqtt_version
        self.keepalive = keepalive
        self.cipher_policy: CipherPolicy = cipher_policy
        self.backoff = backoff
        self.max_queued = max_queued
        self.connect_timeout = connect_timeout
        self.session_expiry = session_expiry
        self.est_url = est_url
        self.renewal = renewal

        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # the queue emptied, or the client closed
        self._pending: deque[_Outgoing] = deque()  # guarded by _lock
        self._inflight: dict[int, _Outgoing] = {}  # mid -> message; guarded by _lock
        self._subscriptions: dict[str, _Subscription] = {}  # guarded by _lock
        self._closed = False
        self._events: queue.SimpleQueue[_Event] = queue.SimpleQueue()
        self._inbox: queue.SimpleQueue[Message | None] = queue.SimpleQueue()
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self._renew_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._info: ConnectionInfo | None = None
        self._last_error: str | None = None
        self.reconnect_delays: list[float] = []  # every backoff wait so far, for operators

        # Owned by the worker thread from start() on.
        self._identity: _Identity | None = None
        self._mqtt: mqtt.Client | None = None
        self._state = _State.WAITING
        self._deadline = 0.0  # monotonic; meaning depends on _state
        self._attempt = 0
        self._subscribed: dict[str, _Subscription] = {}  # filter -> what was last sent
        self._sub_mids: dict[int, _Subscription] = {}
        self._socket_error: str | None = None  # paho's last read/write error on it

    # -- lifecycle -------------------------------------------------------------------------

    def enroll(self, *, station_cert: Path, station_key: Path) -> x509.Certificate:
        """First certificate over EST ``simpleenroll``, authenticated by station credentials."""
        return provisioning.enroll(
            self.keystore,
            self.device_id,
            est_url=self._require_est_url("enroll"),
            station_cert=station_cert,
            station_key=station_key,
        )

    def start(self) -> DeviceClient:
        """Check the identity, then connect (and renew, with ``est_url``) in the background."""
        if self._closed:
            raise ClientClosed(f"{self.device_id}: start() after close()")
        if self._threads:
            raise RuntimeError("this DeviceClient was already started")
        self._identity = self._load_identity()
        self._deadline = time.monotonic()
        self._threads = [
            threading.Thread(target=self._run, name=f"fleetgate-mqtt-{self.device_id}"),
            threading.Thread(target=self._dispatch, name=f"fleetgate-handlers-{self.device_id}"),
        ]
        if self.est_url is not None:
            self._threads.append(
                threading.Thread(
                    target=self._renew_when_due, name=f"fleetgate-renewal-{self.device_id}"
                )
            )
        for thread in self._threads:
            thread.daemon = True
            thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Disconnect cleanly and stop the threads; unacknowledged messages fail ClientClosed."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._changed.notify_all()
        self._stopping.set()
        self._events.put(_Stop())
        self._inbox.put(None)
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout)
        with self._lock:
            leftovers = [*self._inflight.values(), *self._pending]
            self._inflight.clear()
            self._pending.clear()
            subscriptions = list(self._subscriptions.values())
        closed = ClientClosed(f"{self.device_id}: the client was closed before the broker acked")
        for ack in [*(m.ack for m in leftovers), *(s.ack for s in subscriptions)]:
            ack._settle(closed)

    def __enter__(self) -> DeviceClient:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- state -----------------------------------------------------------------------------

    @property
    def connection(self) -> ConnectionInfo | None:
        """The current session, or None while disconnected."""
        return self._info if self._connected.is_set() else None

    @property
    def tls_socket(self) -> ssl.SSLSocket | None:
        """The live TLS socket, for inspection (``cipher()``, ``version()``); None if offline."""
        client = self._mqtt
        sock = client.socket() if client is not None and self._connected.is_set() else None
        return sock if isinstance(sock, ssl.SSLSocket) else None

    @property
    def last_error(self) -> str | None:
        """Why the last connection attempt or session ended, in words."""
        return self._last_error

    @property
    def queued(self) -> int:
        """QoS 1 messages not yet acknowledged by the broker."""
        with self._lock:
            return len(self._pending) + len(self._inflight)

    def wait_connected(self, timeout: float) -> ConnectionInfo:
        """Block until the session is up; :class:`NotConnected` with the last error if not."""
        if not self._connected.wait(timeout):
            raise NotConnected(
                f"{self.device_id} is not connected to {self.host}:{self.port} after {timeout} s",
                self._last_error,
            )
        info = self._info
        assert info is not None
        return info

    def flush(self, timeout: float) -> None:
        """Block until every queued QoS 1 message is acknowledged, or raise :class:`AckTimeout`."""
        with self._lock:
            if not self._changed.wait_for(
                lambda: self._closed or not (self._pending or self._inflight), timeout
            ):
                raise AckTimeout(
                    f"{len(self._pending) + len(self._inflight)} QoS 1 messages are still "
                    f"unacknowledged after {timeout} s (last error: {self._last_error})"
                )
            if self._closed:
                raise ClientClosed(f"{self.device_id}: closed while flushing")

    # -- messaging -------------------------------------------------------------------------

    def publish(
        self, topic: str, payload: bytes | str, *, qos: Literal[0, 1] = 1, retain: bool = False
    ) -> Ack:
        """Send a message: QoS 1 is queued until acknowledged, QoS 0 is sent now or refused."""
        if not topic or "+" in topic or "#" in topic:
            raise ValueError(f"cannot publish to {topic!r}: a topic is non-empty, without + or #")
        data = payload.encode() if isinstance(payload, str) else bytes(payload)
        if qos == 0:
            return self._publish_now(topic, data, retain)
        if qos != 1:
            raise ValueError(
                f"qos must be 0 or 1, not {qos}: a resent QoS 2 message is not exactly-once"
            )
        ack = Ack(f"QoS 1 message on {topic!r}")
        with self._lock:
            if self._closed:
                raise ClientClosed(f"{self.device_id}: publish() after close()")
            if len(self._pending) + len(self._inflight) >= self.max_queued:
                raise QueueFull(self.max_queued)
            self._pending.append(_Outgoing(topic, data, retain, ack))
        self._events.put(_Wake())
        return ack

    def subscribe(self, topic_filter: str, handler: Handler, *, qos: Literal[0, 1] = 1) -> Ack:
        """Call ``handler`` (on the handler thread) for each message matching ``topic_filter``.

        The subscription is renewed on every new session; the Ack settles on the first SUBACK.
        """
        if not topic_filter:
            raise ValueError("cannot subscribe to an empty topic filter")
        ack = Ack(f"subscription to {topic_filter!r}")
        with self._lock:
            if self._closed:
                raise ClientClosed(f"{self.device_id}: subscribe() after close()")
            self._subscriptions[topic_filter] = _Subscription(topic_filter, qos, handler, ack)
        self._events.put(_Wake())
        return ack

    # -- renewal ---------------------------------------------------------------------------

    def renew(self) -> x509.Certificate:
        """Renew the certificate now (EST ``simplereenroll``) and move the session to it."""
        est_url = self._require_est_url("renew")
        with self._renew_lock:
            if isinstance(self.keystore, RenewingKeyStore):
                cert = self.keystore.renew(self.device_id, est_url=est_url)
            else:
                cert = provisioning.reenroll(self.keystore, self.device_id, est_url=est_url)
            self._events.put(_NewIdentity(self._load_identity()))
        log.info(
            "%s renewed its certificate: serial %x, valid until %s",
            self.device_id,
            cert.serial_number,
            cert.not_valid_after_utc.isoformat(),
        )
        return cert

    def _renew_when_due(self) -> None:
        policy = self.renewal
        while not self._stopping.is_set():
            try:
                due = renewal_due(self.keystore.certificates()[0], policy.fraction)
            except KeyStoreError as exc:
                log.warning("%s: renewal check failed: %s", self.device_id, exc)
                self._stopping.wait(policy.retry_interval)
                continue
            remaining = (due - policy.clock()).total_seconds()
            if remaining > 0:
                self._stopping.wait(min(remaining, policy.check_interval))
                continue
            try:
                self.renew()
            except DeviceSdkError as exc:
                log.warning(
                    "%s: renewal failed, retrying in %s s: %s",
                    self.device_id,
                    policy.retry_interval,
                    exc,
                )
                self._stopping.wait(policy.retry_interval)

    def _require_est_url(self, action: str) -> str:
        if self.est_url is None:
            raise EnrollmentError(
                f"cannot {action} {self.device_id}: construct the DeviceClient with est_url="
                "'https://<enrollment host>:<port>'"
            )
        return self.est_url

    def _load_identity(self) -> _Identity:
        leaf = self.keystore.certificates()[0]
        named = device_id_of(leaf)
        if named != self.device_id:
            raise KeyStoreError(
                f"the certificate in {self.keystore.certificate_path} is for {named}, "
                f"not {self.device_id}: use that device id or this device's key store"
            )
        if isinstance(self.keystore, ContextKeyStore):
            return _Identity(self.keystore.tls_context(self.cipher_policy), leaf.serial_number)
        return _Identity(device_context(self.keystore, self.cipher_policy), leaf.serial_number)

    # -- the worker: connection, queue, subscriptions --------------------------------------

    def _run(self) -> None:
        while self._state is not _State.CLOSED:
            try:
                self._step()
            except Exception:  # a bug here must not leave the device silently offline
                log.exception("%s: internal error in the MQTT worker; reconnecting", self.device_id)
                self._drop("internal error in the device SDK (logged)")

    def _step(self) -> None:
        """Wait for the next event or the state's deadline, and act on it."""
        timeout = None
        if self._state is not _State.CONNECTED:
            timeout = self._deadline - time.monotonic()
            if timeout <= 0:
                self._deadline_passed()
                return
        try:
            event = self._events.get(timeout=timeout)
        except queue.Empty:
            return
        self._handle(event)

    def _deadline_passed(self) -> None:
        if self._state is _State.WAITING:
            self._connect()
        elif self._state is _State.CONNECTING:
            self._drop(f"no CONNACK from {self.host}:{self.port} within {self.connect_timeout} s")
        elif self._state is _State.DRAINING:
            self._drop("switching to the renewed certificate", expected=True)

    def _handle(self, event: _Event) -> None:
        match event:
            case _Stop():
                self._shut_down()
            case _NewIdentity(identity):
                self._identity = identity
                if self._state in (_State.CONNECTED, _State.DRAINING):
                    self._state = _State.DRAINING
                    self._deadline = time.monotonic() + self.renewal.drain_timeout
                    self._drain_or_switch()
                elif self._state is _State.CONNECTING:
                    self._drop("switching to the renewed certificate", expected=True)
                else:
                    self._attempt, self._deadline = 0, time.monotonic()
            case _Wake():
                self._send()
            case _Connack(client) if client is self._mqtt:
                self._on_connack(event)
            case _Closed(client) if client is self._mqtt:
                if self._state is _State.DRAINING:
                    self._drop("switching to the renewed certificate", expected=True)
                else:
                    self._drop(self._describe_close(event))
            case _PubAck(client) if client is self._mqtt:
                self._on_puback(event)
            case _SubAck(client) if client is self._mqtt:
                self._on_suback(event)
            case _SocketError(client, text) if client is self._mqtt:
                self._socket_error = text
            case _:
                pass  # from a connection that has been replaced

    def _connect(self) -> None:
        identity = self._identity
        assert identity is not None
        client = self._new_paho_client(identity.context)
        try:
            if self.mqtt_version == "5":
                properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                properties.SessionExpiryInterval = self.session_expiry
                client.connect(
                    self.host,
                    self.port,
                    self.keepalive,
                    clean_start=self.session_expiry == 0,
                    properties=properties,
                )
            else:
                client.connect(self.host, self.port, self.keepalive)
        except (OSError, ValueError) as exc:  # ssl errors are OSErrors; bad names ValueErrors
            self._retry_later(self._describe_connect_error(exc))
            return
        client.loop_start()
        self._mqtt = client
        self._socket_error = None
        self._state = _State.CONNECTING
        self._deadline = time.monotonic() + self.connect_timeout

    def _new_paho_client(self, context: ssl.SSLContext | ClientTlsContext) -> mqtt.Client:
        v5 = self.mqtt_version == "5"
        options: dict[str, Any] = {
            "client_id": self.device_id,
            "clean_session": None if v5 else self.session_expiry == 0,
            "protocol": mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            "reconnect_on_failure": False,
        }
        client = mqtt.Client(CallbackAPIVersion.VERSION2, **options)
        # A ClientTlsContext is not an ssl.SSLContext, but offers all that paho uses of one.
        client.tls_set_context(cast(ssl.SSLContext, context))
        client.connect_timeout = self.connect_timeout
        client.max_inflight_messages_set(_WINDOW)
        client.on_connect = self._paho_on_connect
        client.on_disconnect = self._paho_on_disconnect
        client.on_publish = self._paho_on_publish
        client.on_subscribe = self._paho_on_subscribe
        client.on_message = self._paho_on_message
        client.on_log = self._paho_on_log
        client.on_socket_open = _no_delay
        return client

    # paho callbacks: run on paho's thread, under paho's locks; they only post.

    def _paho_on_connect(
        self, client: mqtt.Client, _: Any, flags: mqtt.ConnectFlags, reason: ReasonCode, __: Any
    ) -> None:
        self._events.put(_Connack(client, reason, bool(flags.session_present)))

    def _paho_on_disconnect(
        self,
        client: mqtt.Client,
        _: Any,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        __: Any,
    ) -> None:
        self._events.put(_Closed(client, reason, flags.is_disconnect_packet_from_server))

    def _paho_on_publish(
        self, client: mqtt.Client, _: Any, mid: int, reason: ReasonCode, __: Any
    ) -> None:
        self._events.put(_PubAck(client, mid, reason))

    def _paho_on_subscribe(
        self, client: mqtt.Client, _: Any, mid: int, reasons: list[ReasonCode], __: Any
    ) -> None:
        self._events.put(_SubAck(client, mid, reasons))

    def _paho_on_message(self, _: mqtt.Client, __: Any, message: mqtt.MQTTMessage) -> None:
        payload = bytes(message.payload)
        self._inbox.put(Message(message.topic, payload, message.qos, message.retain))

    def _paho_on_log(self, client: mqtt.Client, _: Any, level: int, text: str) -> None:
        if level == mqtt.MQTT_LOG_ERR:
            self._events.put(_SocketError(client, text))

    def _on_connack(self, event: _Connack) -> None:
        if event.reason.is_failure:
            code = event.reason.value
            hint = _CONNACK_HINTS.get(code, "see the broker's log")
            self._drop(
                f"the broker refused the connection: {event.reason.getName()} (0x{code:02x}); "
                f"{hint}"
            )
            return
        client = self._mqtt
        identity = self._identity
        assert client is not None and identity is not None
        sock = client.socket()
        if not isinstance(sock, TlsConnection):
            self._drop(f"the connection to {self.host}:{self.port} closed right after CONNACK")
            return
        cipher = sock.cipher()
        self._info = ConnectionInfo(
            mqtt_version=self.mqtt_version,
            tls_version=sock.version() or "",
            cipher=cipher[0] if cipher else "",
            certificate_serial=identity.serial,
            session_present=event.session_present,
        )
        self._state = _State.CONNECTED
        self._attempt = 0
        if not event.session_present:
            self._subscribed.clear()
        log.info(
            "%s connected to %s:%d (%s, %s, session present: %s)",
            self.device_id,
            self.host,
            self.port,
            self._info.tls_version,
            self._info.cipher,
            event.session_present,
        )
        self._connected.set()
        self._send()

    def _send(self) -> None:
        """Hand queued subscriptions and QoS 1 messages to paho, up to the in-flight window."""
        client = self._mqtt
        if self._state is not _State.CONNECTED or client is None:
            return
        with self._lock:
            subscriptions = [
                s for f, s in self._subscriptions.items() if self._subscribed.get(f) is not s
            ]
        for sub in subscriptions:
            result, mid = client.subscribe(sub.topic_filter, sub.qos)
            if result != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
                return  # the connection is going; _Closed follows
            self._subscribed[sub.topic_filter] = sub
            self._sub_mids[mid] = sub
        while True:
            with self._lock:
                if len(self._inflight) >= _WINDOW or not self._pending:
                    return
                message = self._pending.popleft()
            info = client.publish(message.topic, message.payload, qos=1, retain=message.retain)
            with self._lock:
                if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    self._pending.appendleft(message)  # the connection is going; _Closed follows
                    return
                self._inflight[info.mid] = message

    def _on_puback(self, event: _PubAck) -> None:
        with self._lock:
            message = self._inflight.pop(event.mid, None)
            if not (self._pending or self._inflight):
                self._changed.notify_all()
        if message is None:
            return  # a QoS 0 message's on_publish
        if event.reason.is_failure:
            message.ack._settle(
                PublishRefused(message.topic, event.reason.getName(), event.reason.value)
            )
        else:
            message.ack._settle()
        if self._state is _State.DRAINING:
            self._drain_or_switch()
        else:
            self._send()

    def _on_suback(self, event: _SubAck) -> None:
        sub = self._sub_mids.pop(event.mid, None)
        if sub is None:
            return
        reason = event.reasons[0]
        if reason.is_failure:
            self._subscribed.pop(sub.topic_filter, None)
            sub.ack._settle(SubscribeRefused(sub.topic_filter, reason.getName(), reason.value))
        else:
            sub.ack._settle()

    def _drain_or_switch(self) -> None:
        with self._lock:
            drained = not self._inflight
        if drained:
            self._drop("switching to the renewed certificate", expected=True)

    def _drop(self, reason: str, *, expected: bool = False) -> None:
        """End the current connection; requeue what it left unacknowledged; plan the next."""
        if not expected:  # first: whoever sees the session gone (``connection``) can read why
            self._last_error = reason
        client, self._mqtt = self._mqtt, None
        self._connected.clear()
        with self._lock:
            unacked = list(self._inflight.values())
            self._inflight.clear()
            self._pending.extendleft(reversed(unacked))
        for sub in self._sub_mids.values():  # never acknowledged: not in a resumed session
            if self._subscribed.get(sub.topic_filter) is sub:
                del self._subscribed[sub.topic_filter]
        self._sub_mids.clear()
        if client is not None:
            client.disconnect()
            client.loop_stop()
        if expected:
            log.info("%s: %s", self.device_id, reason)
            self._state, self._attempt, self._deadline = _State.WAITING, 0, time.monotonic()
        else:
            self._retry_later(reason)

    def _retry_later(self, reason: str) -> None:
        delay = self.backoff.delay(self._attempt)
        self._attempt += 1
        self._last_error = reason
        self.reconnect_delays.append(delay)
        log.warning("%s: %s; reconnecting in %.2f s", self.device_id, reason, delay)
        self._state = _State.WAITING
        self._deadline = time.monotonic() + delay

    def _shut_down(self) -> None:
        client, self._mqtt = self._mqtt, None
        self._connected.clear()
        if client is not None:
            client.disconnect()
            client.loop_stop()
        self._state = _State.CLOSED

    def _publish_now(self, topic: str, data: bytes, retain: bool) -> Ack:
        client = self._mqtt
        if client is None or not self._connected.is_set():
            raise NotConnected(
                f"{self.device_id}: QoS 0 messages are not queued while offline (use qos=1 to "
                "queue)",
                self._last_error,
            )
        info = client.publish(topic, data, qos=0, retain=retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise NotConnected(
                f"{self.device_id}: the connection closed while sending a QoS 0 message",
                mqtt.error_string(info.rc),
            )
        ack = Ack(f"QoS 0 message on {topic!r}")
        ack._settle()
        return ack

    # -- received messages -----------------------------------------------------------------

    def _dispatch(self) -> None:
        while (message := self._inbox.get()) is not None:
            with self._lock:
                handlers = [
                    s.handler
                    for s in self._subscriptions.values()
                    if mqtt.topic_matches_sub(s.topic_filter, message.topic)
                ]
            for handler in handlers:
                try:
                    handler(message)
                except Exception:
                    log.exception("%s: handler for %s failed", self.device_id, message.topic)

    # -- words for what went wrong ---------------------------------------------------------

    def _describe_connect_error(self, exc: Exception) -> str:
        where = f"{self.host}:{self.port}"
        if isinstance(exc, ssl.SSLCertVerificationError):
            return (
                f"the broker at {where} failed verification ({exc.verify_message}): it must "
                f"present a certificate from the fleet CA in {self.keystore.trust_anchors_path} "
                f"naming {self.host!r}"
            )
        if isinstance(exc, ssl.SSLError):
            return (
                f"TLS with {where} failed ({exc.reason or exc}): a broker that refuses the "
                "device certificate, or offers none of the policy's cipher suites, ends here"
            )
        if isinstance(exc, ConnectionRefusedError):
            return f"nothing accepts connections on {where}: is the broker running?"
        if isinstance(exc, TimeoutError):
            return f"{where} did not answer within {self.connect_timeout} s"
        return f"cannot connect to {where}: {exc}"

    def _describe_close(self, event: _Closed) -> str:
        if event.by_broker:
            return (
                f"the broker ended the session: {event.reason.getName()} "
                f"(0x{event.reason.value:02x})"
            )
        detail = f" ({self._socket_error})" if self._socket_error else ""
        if self._state is _State.CONNECTING:
            return (
                f"{self.host}:{self.port} closed the connection before CONNACK{detail}: with "
                "TLS 1.3 this is how a broker refuses the device certificate (expired, revoked, "
                "or not from the fleet CA)"
            )
        return f"the connection to {self.host}:{self.port} was lost{detail}"
