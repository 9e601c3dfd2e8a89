"""Hardware-key groups inside a scenario: ``key_store = "tpm"`` or ``"smartcard"``.

The coordinator makes each such device's stand-in before the run (:class:`HardwareFleet`: one
swtpm + tpm2-abrmd or one pcscd + PIV applet card per device, from manufacturer CAs made for
this run only, which the run's EST service alone trusts). In the shard, each device is a
process of :mod:`firmware_sim.hardware_device` (the hardware stacks are bound to a process):
:class:`HardwareLink` enrolls it (key made in the TPM or card, attested over EST) and connects
it, and :class:`HardwareClient` is its session with the same face as
:class:`firmware_sim.mqtt_client.SimClient`, so the shard schedules, counts and checks a
hardware device exactly as it does a file-key one.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.mqtt import Publish, QoS, ReasonCode
from firmware_sim.deployment import Target
from firmware_sim.hardware_line import (
    CardBench,
    TpmBench,
    identity_args,
    install_manufacturer,
    trust_dir,
)
from firmware_sim.mqtt_client import Refused, SessionClosed, Unacked
from firmware_sim.scenario import Group, KeyStore
from firmware_sim.vcard import VirtualCardError
from firmware_sim.vtpm import VirtualTpmError

ENROLL_TIMEOUT_S = 90.0  # attested enrollment: key generation, credential activation, EST
CONNECT_TIMEOUT_S = 30.0  # the device process gives up after 20 s itself
CLOSE_TIMEOUT_S = 10.0
TRUST_ENV = {
    KeyStore.TPM: "FLEETGATE_ATTESTATION_TPM_MANUFACTURER_CAS",
    KeyStore.SMARTCARD: "FLEETGATE_ATTESTATION_CARD_MANUFACTURER_CAS",
}
_CODE = re.compile(r"\(0x([0-9a-f]{2})\)")


@dataclass(frozen=True)
class HardwareAccess:
    """How one device's process reaches its TPM or card; picklable for shard processes."""

    key_store: str
    directory: Path  # the device's key store directory (certificate, TPM key blob)
    env: Mapping[str, str]
    access: tuple[str, ...]  # --tcti ... or --pin ...
    enroll_extra: tuple[str, ...]  # --ek-chain ... for a TPM


class HardwareFleet:
    """The run's virtual TPMs and cards; :meth:`close` stops every process it started."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir / "hardware"
        self.benches: dict[KeyStore, TpmBench | CardBench] = {}
        self._sockets: Path | None = None  # D-Bus and pcscd sockets: paths under 108 bytes

    def manufacture(self, devices: Mapping[str, KeyStore]) -> dict[str, HardwareAccess]:
        """One stand-in per device (``device id -> key store``). From the main thread: pcscd
        and the card applets are bound to the thread that starts them."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self._sockets is None:
            self._sockets = Path(tempfile.mkdtemp(prefix="fleetgate-sim-hw-"))
        made: dict[str, HardwareAccess] = {}
        counts: dict[KeyStore, int] = {}
        for device_id, kind in devices.items():
            bench = self.benches.get(kind)
            if bench is None:
                make = TpmBench if kind == KeyStore.TPM else CardBench
                bench = self.benches[kind] = make(self.workdir, self._sockets)
            index = counts[kind] = counts.get(kind, -1) + 1
            try:
                env, access, extra = bench.make(index)
            except (VirtualTpmError, VirtualCardError) as exc:
                raise RuntimeError(
                    f"cannot make the virtual {kind} for {device_id}: {exc}"
                ) from exc
            directory = self.workdir / "devices" / device_id
            made[device_id] = HardwareAccess(kind, directory, env, tuple(access), tuple(extra))
        for kind, bench in self.benches.items():
            install_manufacturer(self.workdir, kind, bench.root)
        return made

    def service_env(self) -> dict[str, str]:
        """The EST service's attestation trust stores: this run's manufacturers, and only
        theirs (never the data directory's own stores)."""
        env = {}
        for kind, name in TRUST_ENV.items():
            store = trust_dir(self.workdir, kind)
            store.mkdir(parents=True, exist_ok=True)
            env[name] = str(store)
        return env

    def descriptions(self) -> dict[str, str]:
        return {str(kind): bench.description for kind, bench in self.benches.items()}

    def close(self) -> None:
        for bench in self.benches.values():
            bench.stop()
        if self._sockets is not None:
            shutil.rmtree(self._sockets, ignore_errors=True)


def hardware_devices(groups: list[Group], ids: Mapping[str, list[str]]) -> dict[str, KeyStore]:
    """``device id -> key store`` of every device in a hardware group."""
    return {
        device_id: group.key_store
        for group in groups
        if group.key_store != KeyStore.FILE
        for device_id in ids[group.name]
    }


class HardwareLink:
    """One hardware device's process (``hardware_device scenario``), started at its first
    connect and kept for the run; its events go to the waiting call or the current session."""

    def __init__(self, device_id: str, access: HardwareAccess, target: Target) -> None:
        self.device_id = device_id
        self.access = access
        self.target = target
        self.logs = target.workdir / "devices"
        self.process: asyncio.subprocess.Process | None = None
        self.reader: asyncio.Task[None] | None = None
        self.session: HardwareClient | None = None
        self.waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}  # event name (or id)

    def _identity(self) -> list[str]:
        access = self.access
        return identity_args(access.key_store, access.directory, self.device_id, access.access)

    async def _spawn(self, step: str, *arguments: str) -> asyncio.subprocess.Process:
        self.logs.mkdir(parents=True, exist_ok=True)
        with (self.logs / f"{self.device_id}.{step}.log").open("ab") as log:
            return await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "firmware_sim.hardware_device",
                step,
                *arguments,
                *self._identity(),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                env={**os.environ, "TSS2_LOG": "all+none", **self.access.env},
            )

    async def enroll(self) -> tuple[bool, str, float]:
        """Key made in the hardware, attested, certificate installed: (enrolled, why not, ms)."""
        target = self.target
        process = await self._spawn(
            "enroll",
            "--est-url",
            target.est_url,
            "--fleet-root",
            str(target.root),
            "--station-cert",
            str(target.station_cert),
            "--station-key",
            str(target.station_key),
            *self.access.enroll_extra,
        )
        try:
            out, _ = await asyncio.wait_for(process.communicate(), ENROLL_TIMEOUT_S)
        except TimeoutError:
            process.kill()
            await process.wait()
            return False, f"no answer within {ENROLL_TIMEOUT_S} s", 0.0
        events = [json.loads(line) for line in out.splitlines() if line.startswith(b"{")]
        if events and events[-1]["event"] == "enrolled":
            return True, "", float(events[-1]["ms"])
        reason = events[-1].get("reason", "") if events else f"exit {process.returncode}"
        return False, str(reason), 0.0

    async def connect(
        self, host: str, port: int, group: Group, *, session_expiry: int, keepalive: int
    ) -> HardwareClient:
        """One connection attempt; :class:`Refused` for a CONNACK refusal, ``OSError`` for
        anything else (the SDK's words)."""
        await self.start()
        answer = await self.ask(
            "connect",
            host=host,
            port=port,
            mqtt="5" if group.mqtt == 5 else "3.1.1",
            session_expiry=session_expiry,
            keepalive=keepalive,
            timeout=CONNECT_TIMEOUT_S,
        )
        if answer["event"] != "connected":
            reason = str(answer.get("reason", ""))
            code = _CODE.search(reason)
            if "refused the connection" in reason and code is not None:
                raise Refused(ReasonCode(int(code[1], 16)))
            raise OSError(reason.split("; ")[0])
        self.session = HardwareClient(self, bool(answer["session_present"]))
        return self.session

    async def start(self) -> None:
        """The device's process, started (once) and ready: its imports (~1 s) are not counted
        as the first connect's time."""
        if self.process is not None and self.process.returncode is None:
            return
        ready: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiting["ready"] = ready
        self.process = await self._spawn("scenario")
        self.reader = asyncio.create_task(self._read(self.process))
        try:
            event = await asyncio.wait_for(ready, CONNECT_TIMEOUT_S)
        except TimeoutError:
            event = {"event": "timeout"}
        finally:
            self.waiting.pop("ready", None)
        if event["event"] != "ready":
            raise OSError(f"{self.device_id}'s process did not start ({event['event']})")

    async def ask(self, op: str, *, timeout: float, key: str = "", **fields: Any) -> dict[str, Any]:
        """Send an order and wait for its answer (``key``: which answer; the op's by default)."""
        key = key or op
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiting[key] = future
        await self.send(op, **fields)
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return {"event": "timeout", "reason": f"no answer to {op} within {timeout} s"}
        finally:
            self.waiting.pop(key, None)

    async def send(self, op: str, **fields: Any) -> None:
        process = self.process
        if process is None or process.stdin is None or process.stdin.is_closing():
            raise OSError(f"{self.device_id}'s process is not running")
        process.stdin.write(json.dumps({"op": op, **fields}).encode() + b"\n")
        await process.stdin.drain()

    async def _read(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        while line := await process.stdout.readline():
            event: dict[str, Any] = json.loads(line)
            name = event["event"]
            key = {"connect_failed": "connect", "connected": "connect"}.get(name, name)
            if name == "puback":
                key = f"publish {event['id']}"
            future = self.waiting.get(key)
            session = self.session
            if future is not None and not future.done():
                future.set_result(event)
            elif name == "message" and session is not None and session.on_message is not None:
                payload = bytes.fromhex(event["payload"])
                session.on_message(
                    Publish(topic=event["topic"], payload=payload, qos=QoS(event["qos"]))
                )
            elif name == "closed" and session is not None:
                session.end(session_end(str(event["reason"])))
        exited = f"the device process exited ({await process.wait()})"
        for future in self.waiting.values():
            if not future.done():
                future.set_result({"event": "exited", "reason": exited})
        if self.session is not None:
            self.session.end(exited)

    async def close(self) -> None:
        """End the process: stdin closed is its cue; killed (by its PID) if it lingers."""
        process = self.process
        if process is None:
            return
        if process.stdin is not None and not process.stdin.is_closing():
            process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), CLOSE_TIMEOUT_S)
        except TimeoutError:
            process.kill()
            await process.wait()
        if self.reader is not None:
            await asyncio.gather(self.reader, return_exceptions=True)


def session_end(text: str) -> str:
    """The SDK's words for a session's end in the simulator's: ``the broker ended the session:
    Administrative action (0x98)`` -> ``DISCONNECT ADMINISTRATIVE_ACTION (0x98)``."""
    code = _CODE.search(text)
    if "ended the session" in text and code is not None:
        return f"DISCONNECT {ReasonCode(int(code[1], 16)).name} (0x{code[1]})"
    return text


class HardwareClient:
    """A hardware device's session, with the face of :class:`SimClient` that the shard uses."""

    def __init__(self, link: HardwareLink, session_present: bool) -> None:
        self.link = link
        self.session_present = session_present
        self.closed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.on_message: Any = None  # Callable[[Publish], None] | None, as SimClient's
        self._ids = 0
        self._leaving: asyncio.Future[None] | None = None

    def end(self, reason: str) -> None:
        if not self.closed.done():
            self.closed.set_result(reason)

    async def subscribe(self, topic_filter: str, qos: QoS = QoS.AT_LEAST_ONCE) -> ReasonCode:
        answer = await self.link.ask(
            "subscribe",
            key="subscribed",
            filter=topic_filter,
            qos=min(int(qos), 1),
            timeout=CONNECT_TIMEOUT_S,
        )
        if not answer.get("ok"):
            raise SessionClosed(str(answer.get("reason", "no SUBACK")))
        return ReasonCode(min(int(qos), 1))

    async def publish(self, topic: str, payload: bytes, qos: QoS = QoS.AT_LEAST_ONCE) -> ReasonCode:
        """Publish through the device's SDK; its PUBACK's reason code. A session that ends
        first raises :class:`SessionClosed` with the message to send again."""
        packet_id = None if qos == QoS.AT_MOST_ONCE else 1
        packet = Publish(topic=topic, payload=payload, qos=qos, packet_id=packet_id)
        if self.closed.done():
            raise SessionClosed(self.closed.result(), Unacked(packet))
        self._ids += 1
        fields = {"id": self._ids, "topic": topic, "payload": payload.hex(), "qos": int(qos)}
        answer = asyncio.ensure_future(
            self.link.ask("publish", key=f"publish {self._ids}", timeout=60.0, **fields)
        )
        await asyncio.wait((answer, self.closed), return_when=asyncio.FIRST_COMPLETED)
        if answer.done() and "code" in answer.result():
            return ReasonCode(answer.result()["code"])
        if not answer.done():
            answer.cancel()
        elif not self.closed.done():  # no PUBACK (a timeout): the session is as good as gone
            await self.disconnect()
            self.end(str(answer.result().get("error") or answer.result().get("reason")))
        raise SessionClosed(self.closed.result(), Unacked(packet))

    async def resend(self, unacked: Unacked) -> ReasonCode:
        """What a dropped session left unacknowledged, as a new message (a new SDK client)."""
        packet = unacked.packet
        return await self.publish(packet.topic, packet.payload, packet.qos)

    async def disconnect(self) -> None:
        """DISCONNECT (the SDK's close); callers at once share one (a poke and the session's
        own end both ask)."""
        if self._leaving is None:
            self._leaving = asyncio.ensure_future(self._leave())
        await asyncio.shield(self._leaving)

    async def _leave(self) -> None:
        if self.closed.done():
            return
        try:
            await self.link.ask("disconnect", key="closed", timeout=CLOSE_TIMEOUT_S)
        except OSError as exc:
            self.end(str(exc))
        self.end("DISCONNECT NORMAL_DISCONNECTION")


__all__ = [
    "HardwareAccess",
    "HardwareClient",
    "HardwareFleet",
    "HardwareLink",
    "hardware_devices",
    "session_end",
]
