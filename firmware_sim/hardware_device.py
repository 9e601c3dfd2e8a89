"""One virtual hardware device of ``fleetgate sim --key-store tpm|smartcard``, in its own process.

A process per device, because the hardware stacks are per process: the tpm2-openssl provider
serves one TPM per process (and, once loaded, breaks software-key TLS in that process), and
libpcsclite reads its pcscd socket, and the pkcs11 engine its view of the card, once per process.
:mod:`firmware_sim.hardware_line` therefore runs this module twice per device, with that
device's hardware environment:

- ``enroll``: the station's step. The SDK (``enroll_tpm`` / ``enroll_smartcard``) makes the key
  in the hardware and enrolls it through the EST attestation endpoints.
- ``run``: the device. ``DeviceClient`` connects with the hardware key store, subscribes to its
  commands, publishes ``--messages`` QoS 1 messages and waits for one command; then it stays
  connected until stdin closes, reporting a session the broker ends (a revocation's kick) and
  how its reconnect fares.
- ``scenario``: the device in a scenario (:mod:`firmware_sim.hardware_fleet` drives it). It
  does what its shard asks on stdin (connect, subscribe, publish, disconnect), one JSON line
  each, and answers each; a session that ends is reported and not re-established: the shard
  decides when to reconnect (its backoff, the same for every key store).

Both speak JSON lines on stdout (``{"event": ...}``); times are wall clock (``time.time()``)
so the line can compare them with its own.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any, Literal

from cryptography import x509

from device_sdk.backoff import Backoff
from device_sdk.client import DeviceClient, Message, MqttVersion
from device_sdk.errors import AckTimeout, DeviceSdkError, NotConnected, PublishRefused
from device_sdk.piv import CardAbsent, PivCard
from device_sdk.piv_provisioning import enroll_smartcard
from device_sdk.smartcard_keystore import SmartcardKeyStore
from device_sdk.tpm_keystore import TpmKeyStore
from device_sdk.tpm_provisioning import enroll_tpm

KEY_STORES = ("tpm", "smartcard")
CONNECT_TIMEOUT_S = 20.0
ACK_TIMEOUT_S = 10.0
COMMAND_TIMEOUT_S = 10.0
CARD_TIMEOUT_S = 10.0
POLL_S = 0.002  # how often the kick watcher looks at the session: the latency's resolution


_emitting = threading.Lock()  # the scenario step emits from several threads


def emit(event: str, **fields: Any) -> None:
    line = json.dumps({"event": event, **fields})
    with _emitting:
        print(line, flush=True)


def _key_store(args: argparse.Namespace) -> TpmKeyStore | SmartcardKeyStore:
    if args.key_store == "tpm":
        return TpmKeyStore(args.dir, tcti=args.tcti)
    return SmartcardKeyStore(args.dir, pin=args.pin)


def enroll(args: argparse.Namespace) -> None:
    """Key generated in the hardware, attested, certificate installed: the station's step."""
    store = _key_store(args)
    store.set_trust_anchors(x509.load_pem_x509_certificates(args.fleet_root.read_bytes()))
    started = time.perf_counter()
    try:
        if isinstance(store, TpmKeyStore):
            cert = enroll_tpm(
                store,
                args.device_id,
                est_url=args.est_url,
                station_cert=args.station_cert,
                station_key=args.station_key,
                ek_chain=x509.load_pem_x509_certificates(args.ek_chain.read_bytes()),
            )
        else:
            _wait_for_card()
            try:
                cert = enroll_smartcard(
                    store,
                    args.device_id,
                    est_url=args.est_url,
                    station_cert=args.station_cert,
                    station_key=args.station_key,
                )
            finally:
                store.close()  # the device process opens the card itself
    except DeviceSdkError as exc:
        emit("refused", reason=str(exc))
        return
    emit("enrolled", ms=(time.perf_counter() - started) * 1000, serial=f"{cert.serial_number:x}")


def _wait_for_card() -> None:
    """pcscd polls its reader, so a card just inserted shows up a moment later."""
    deadline = time.monotonic() + CARD_TIMEOUT_S
    while True:
        try:
            PivCard.open().close()
            return
        except CardAbsent:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def run(args: argparse.Namespace) -> None:
    """Connect, subscribe, publish, take one command; then watch the session until stdin ends."""
    commands: queue.SimpleQueue[Message] = queue.SimpleQueue()
    client = DeviceClient(
        _key_store(args),
        args.device_id,
        port=args.port,
        backoff=Backoff(initial=0.2, maximum=1.0),
        connect_timeout=CONNECT_TIMEOUT_S,
    )
    started = time.perf_counter()
    with client:
        try:
            info = client.wait_connected(CONNECT_TIMEOUT_S)
            connect_ms = (time.perf_counter() - started) * 1000
            client.subscribe(f"devices/{args.device_id}/commands/#", commands.put).wait(
                ACK_TIMEOUT_S
            )
        except DeviceSdkError as exc:
            emit("refused", reason=f"connect: {exc} (last error: {client.last_error})")
            return
        leaving = threading.Event()
        watcher = threading.Thread(target=_watch, args=(client, leaving), daemon=True)
        watcher.start()
        emit("ready", connect_ms=connect_ms, tls=info.tls_version, cipher=info.cipher)
        ack_ms: list[float] = []
        refused: list[str] = []
        for seq in range(args.messages):
            payload = json.dumps({"t": time.time(), "seq": seq})
            sent = time.perf_counter()
            try:
                client.publish(f"devices/{args.device_id}/telemetry", payload).wait(ACK_TIMEOUT_S)
                ack_ms.append((time.perf_counter() - sent) * 1000)
            except PublishRefused as exc:
                refused.append(f"publish own telemetry: {exc.reason}")
            except AckTimeout:
                refused.append(f"publish own telemetry: no PUBACK within {ACK_TIMEOUT_S} s")
        try:
            commands.get(timeout=COMMAND_TIMEOUT_S)
            command = True
        except queue.Empty:
            command = False
        emit("published", ack_ms=ack_ms, refused=refused, command=command)
        sys.stdin.read()  # the line closes stdin when the run is over
        leaving.set()  # our own disconnect is no news


def _watch(client: DeviceClient, leaving: threading.Event) -> None:
    """Report the first end of the session, then the first reconnect attempt's outcome."""
    while client.connection is not None:
        if leaving.wait(POLL_S):
            return
    at = time.time()
    reason = client.last_error
    emit("session_closed", at=at, reason=reason)
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while time.monotonic() < deadline:
        if client.connection is not None:
            emit("reconnected")
            return
        if client.last_error != reason:
            emit("reconnect_failed", reason=client.last_error)
            return
        time.sleep(POLL_S)
    emit("reconnect_failed", reason=f"no reconnect attempt finished within {CONNECT_TIMEOUT_S} s")


class _ScenarioDevice:
    """One device under a shard's orders: at most one ``DeviceClient`` (one session) at a time."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.client: DeviceClient | None = None
        self.closing = threading.Event()  # our own disconnect: no news

    def serve(self) -> None:
        emit("ready")  # imported: the shard's clock for its first connect starts after this
        while line := sys.stdin.readline():
            order: dict[str, Any] = json.loads(line)
            getattr(self, f"do_{order.pop('op')}")(**order)
        self.do_disconnect()

    def do_connect(
        self, host: str, port: int, mqtt: MqttVersion, session_expiry: int, keepalive: int
    ) -> None:
        """One connection attempt: connected (then watched) or failed, with the SDK's words."""
        self.do_disconnect()
        self.closing.clear()
        client = DeviceClient(
            _key_store(self.args),
            self.args.device_id,
            host=host,
            port=port,
            mqtt_version=mqtt,
            keepalive=keepalive,
            session_expiry=session_expiry,
            backoff=Backoff(initial=3600.0, maximum=3600.0),  # never: the shard reconnects
            connect_timeout=CONNECT_TIMEOUT_S,
        )
        started = time.perf_counter()
        client.start()
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while client.connection is None and client.last_error is None:
            if time.monotonic() > deadline:
                break
            time.sleep(POLL_S)
        info = client.connection
        if info is None:
            reason = client.last_error or f"not connected within {CONNECT_TIMEOUT_S} s"
            client.close()
            emit("connect_failed", reason=reason)
            return
        self.client = client
        emit(
            "connected",
            session_present=info.session_present,
            ms=(time.perf_counter() - started) * 1000,
            tls=info.tls_version,
            cipher=info.cipher,
        )
        threading.Thread(target=self._watch, args=(client,), daemon=True).start()

    def _watch(self, client: DeviceClient) -> None:
        """Report the session's end (a kick, a lost connection) and let the client go."""
        while client.connection is not None:
            if self.closing.wait(POLL_S):
                return
        if not self.closing.is_set():
            emit("closed", reason=client.last_error or "the session ended")
            client.close(timeout=2.0)

    def do_subscribe(self, filter: str, qos: Literal[0, 1]) -> None:
        client = self.client

        def received(message: Message) -> None:
            emit("message", topic=message.topic, payload=message.payload.hex(), qos=message.qos)

        def wait() -> None:
            try:
                assert client is not None
                client.subscribe(filter, received, qos=qos).wait(ACK_TIMEOUT_S)
                emit("subscribed", ok=True)
            except (DeviceSdkError, AssertionError) as exc:
                emit("subscribed", ok=False, reason=str(exc))

        threading.Thread(target=wait, daemon=True).start()

    def do_publish(self, id: int, topic: str, payload: str, qos: Literal[0, 1]) -> None:
        """Publish on a thread (its PUBACK may take a while); the answer names ``id``."""
        client = self.client

        def wait() -> None:
            try:
                if client is None:
                    raise NotConnected(f"{self.args.device_id} is not connected", None)
                client.publish(topic, bytes.fromhex(payload), qos=qos).wait(ACK_TIMEOUT_S)
            except PublishRefused as exc:
                emit("puback", id=id, code=exc.code)
            except DeviceSdkError as exc:  # closed, not connected, no PUBACK in time
                emit("puback", id=id, error=str(exc))
            else:
                emit("puback", id=id, code=0)

        threading.Thread(target=wait, daemon=True).start()

    def do_disconnect(self) -> None:
        client, self.client = self.client, None
        self.closing.set()
        if client is not None:
            client.close(timeout=5.0)
            emit("closed", reason="DISCONNECT NORMAL_DISCONNECTION")


def scenario(args: argparse.Namespace) -> None:
    _ScenarioDevice(args).serve()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m firmware_sim.hardware_device")
    steps = parser.add_subparsers(dest="step", required=True)
    for name in ("enroll", "run", "scenario"):
        step = steps.add_parser(name)
        step.add_argument("--key-store", choices=KEY_STORES, required=True)
        step.add_argument("--dir", type=Path, required=True)
        step.add_argument("--device-id", required=True)
        step.add_argument("--tcti", default="", help="TPM: the resource manager's TCTI")
        step.add_argument("--pin", default="", help="smartcard: the card's PIN")
    enrolling = steps.choices["enroll"]
    enrolling.add_argument("--est-url", required=True)
    enrolling.add_argument("--fleet-root", type=Path, required=True)
    enrolling.add_argument("--station-cert", type=Path, required=True)
    enrolling.add_argument("--station-key", type=Path, required=True)
    enrolling.add_argument("--ek-chain", type=Path, help="TPM: PEM certificates above the EK's")
    running = steps.choices["run"]
    running.add_argument("--port", type=int, required=True)
    running.add_argument("--messages", type=int, required=True)
    args = parser.parse_args(argv)
    {"enroll": enroll, "run": run, "scenario": scenario}[args.step](args)


if __name__ == "__main__":
    main()
