"""`make demo`: the whole story on the embedded defaults (SQLite, loopback, virtual TPMs).

A CA and a production-line station; 20 devices enrolled over EST and streaming telemetry to
the broker over mutual TLS through the device SDK; one device revoked from the CLI and thrown
off the broker within a second; its reconnects refused; a summary. Then a second line of
meters whose keys are made in their TPMs (swtpm behind tpm2-abrmd) and proven by attestation
before they get certificates. Each admin step runs the real `fleetgate` command, printed before
it runs. Last, if a nats-server >= 2.10 is installed (`scripts/get-nats-server.sh`, which
`make demo` runs), a short scale-out part: two broker nodes on a 3-node NATS cluster.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from device_sdk import DeviceClient, FileKeyStore, Message
from device_sdk.backoff import Backoff
from device_sdk.est import EstClient, EstError, client_context, device_csr
from device_sdk.provisioning import enroll
from device_sdk.tpm_keystore import TpmKeyStore
from device_sdk.tpm_provisioning import enroll_tpm
from enrollment.registry import Registry
from firmware_sim.vtpm import DbusSession, TpmManufacturer, VirtualTpm, quiet_tss_env
from fleetgate.config import load_config

ROOT = Path(__file__).resolve().parent.parent
HOME = ROOT / "demo-data"
FLEETGATE = str(Path(sys.executable).with_name("fleetgate"))
DEVICES = [f"sensor-{n:02d}" for n in range(1, 21)]
VICTIM = "sensor-07"
METERS = ["meter-01", "meter-02"]


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def run(*args: str, show: bool = True) -> str:
    print("$ fleetgate " + " ".join(args), flush=True)
    result = subprocess.run([FLEETGATE, *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"demo failed: {result.stderr.strip()}")
    if show:
        print(result.stdout.rstrip())
    return result.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, what: str, deadline_s: float = 20.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"demo failed: {what} did not come up on port {port} (see {HOME}/*.log)")


def start_service(name: str, port: int) -> subprocess.Popen[bytes]:
    log = (HOME / f"{name}.log").open("w")
    process = subprocess.Popen([FLEETGATE, "serve", name], stdout=log, stderr=log)
    wait_for_port(port, f"the {name} service")
    return process


def main() -> None:
    shutil.rmtree(HOME, ignore_errors=True)
    HOME.mkdir()
    ports = {name: free_port() for name in ("enrollment", "broker", "metrics")}
    os.environ.update(
        FLEETGATE_HOME=str(HOME),
        # A throwaway passphrase for this demo's CA; a real deployment keeps it in a secret store.
        FLEETGATE_CA_PASSPHRASE=secrets.token_urlsafe(24),
        FLEETGATE_ENROLLMENT_PORT=str(ports["enrollment"]),
        FLEETGATE_BROKER_PORT=str(ports["broker"]),
        FLEETGATE_BROKER_METRICS_PORT=str(ports["metrics"]),
        FLEETGATE_LOG_LEVEL="WARNING",
    )
    est_url = f"https://localhost:{ports['enrollment']}"
    in_token = os.environ.get("FLEETGATE_CA_KEY_STORE") == "pkcs11"
    if in_token:  # `FLEETGATE_CA_KEY_STORE=pkcs11 make demo`: the issuing key in SoftHSM2
        demo_token()

    where = "the issuing key in a SoftHSM2 token" if in_token else "keys encrypted at rest"
    step(f"1. Create the fleet CA (root + issuing, {where})")
    run("ca", "init")

    step("2. A production-line station, the ids it may enroll, and a dashboard identity")
    code = run("station", "add", "line-1").splitlines()[1]  # one-time; its key is made on it
    run("batch", "add", "line-1", *DEVICES, "--group", "sensors", "--label", "WO-1001")
    run("batch", "add", "line-1", "dashboard", "--group", "dashboards")
    run("acl", "set", "dashboards", "--publish", "devices/+/commands/#",
        "--subscribe", "devices/+/telemetry")  # fmt: skip
    run("acl", "show", "sensors")

    step("3. Start the EST enrollment service and the MQTT broker (mutual TLS 1.3 only)")
    services = [start_service("enrollment", ports["enrollment"])]
    try:
        services.append(start_service("broker", ports["broker"]))
        print(f"EST on {est_url}, MQTT on localhost:{ports['broker']}")
        enroll_station(est_url, code)
        demo(est_url, ports)
        tpm_line(est_url, ports)
    finally:
        for process in services:
            process.terminate()
            process.wait(15)
    scale_out()
    print(f"\nDemo complete. Data directory: {HOME} (service logs: {HOME}/*.log)")


def demo_token() -> None:
    """A throw-away SoftHSM2 token under the demo's directory, and the settings naming it; the
    PIN goes through the environment, as it would from a secret store."""
    from enrollment.pkcs11 import PIN_ENV, softhsm_token

    pin = secrets.token_hex(8)
    token = softhsm_token(HOME / "softhsm", "fleetgate-demo", pin)
    os.environ.update(
        {
            "FLEETGATE_CA_PKCS11_MODULE": str(token.module),
            "FLEETGATE_CA_PKCS11_TOKEN_LABEL": token.token_label,
            PIN_ENV: pin,
        }
    )


def demo(est_url: str, ports: dict[str, int]) -> None:
    station = HOME / "stations" / "line-1"
    trust = x509.load_pem_x509_certificates((HOME / "ca" / "chain.pem").read_bytes())

    step("4. The station enrolls 20 devices over EST: each key is made on its device")
    stores: dict[str, FileKeyStore] = {}
    started = time.perf_counter()
    for device_id in [*DEVICES, "dashboard"]:
        store = FileKeyStore(HOME / "devices" / device_id)
        store.set_trust_anchors(trust)
        credentials = {
            "station_cert": station / "station.crt",
            "station_key": station / "station.key",
        }
        enroll(store, device_id, est_url=est_url, **credentials)
        stores[device_id] = store
    print(f"enrolled {len(stores)} identities in {time.perf_counter() - started:.2f} s")

    step("5. The devices connect with the SDK and stream telemetry; a dashboard subscribes")
    received: Counter[str] = Counter()
    lock = threading.Lock()

    def on_telemetry(message: Message) -> None:
        with lock:
            received[message.topic.split("/")[1]] += 1

    port = ports["broker"]
    dashboard = DeviceClient(stores["dashboard"], "dashboard", port=port).start()
    dashboard.wait_connected(15)
    dashboard.subscribe("devices/+/telemetry", on_telemetry).wait(15)
    clients = {d: DeviceClient(stores[d], d, port=port).start() for d in DEVICES}
    for client in clients.values():
        client.wait_connected(15)
    info = clients[DEVICES[0]].connection
    assert info is not None
    print(f"20 devices connected: MQTT {info.mqtt_version}, {info.tls_version}, {info.cipher}")
    stop = threading.Event()
    sent: Counter[str] = Counter()

    def stream(device_id: str) -> None:
        while not stop.is_set():
            clients[device_id].publish(f"devices/{device_id}/telemetry", b'{"t": 21.5}', qos=1)
            sent[device_id] += 1
            stop.wait(0.1)

    streams = [threading.Thread(target=stream, args=(d,), daemon=True) for d in DEVICES]
    for thread in streams:
        thread.start()
    time.sleep(2)
    with lock:
        print(f"after 2 s the dashboard has {sum(received.values())} messages "
              f"from {len(received)} devices")  # fmt: skip

    step("6. A device tries another device's topic: refused by the ACL")
    try:
        clients[DEVICES[0]].publish(f"devices/{DEVICES[1]}/telemetry", b"spoof").wait(10)
        sys.exit("demo failed: a publish to another device's topic was accepted")
    except Exception as exc:  # the SDK's PublishRefused, shown as the device sees it
        print(f"{DEVICES[0]} -> devices/{DEVICES[1]}/telemetry: {exc}")

    step(f"7. {VICTIM} is reported stolen: revoke it (registry, CRL, OCSP, live session)")
    victim = clients[VICTIM]
    run("device", "revoke", VICTIM, "--reason", "keyCompromise")
    while victim.connection is not None:
        time.sleep(0.005)
    kicked_at = dt.datetime.now(dt.UTC)
    registry = Registry(load_config(HOME).database_url)
    revoked_at = next(
        e.at for e in reversed(registry.audit_events(subject=VICTIM)) if e.action == "device.revoke"
    )
    latency_ms = (kicked_at - revoked_at.replace(tzinfo=dt.UTC)).total_seconds() * 1000
    print(f"{VICTIM}'s session was closed {latency_ms:.0f} ms after the revocation was committed")
    print(f"  the device was told: {victim.last_error}")

    step(f"8. {VICTIM} keeps trying to reconnect: every attempt is refused")
    time.sleep(2.5)
    print(f"  reconnect attempts so far: {len(victim.reconnect_delays)}; last: {victim.last_error}")
    with urllib.request.urlopen(f"http://127.0.0.1:{ports['metrics']}/metrics") as response:
        metrics = response.read().decode()
    for line in metrics.splitlines():
        if line.startswith(("fleetgate_broker_kicks", "fleetgate_broker_connect_refusals")):
            print(f"  /metrics: {line}")

    step("9. Summary")
    stop.set()
    for thread in streams:
        thread.join()
    for device_id, client in clients.items():
        if device_id != VICTIM:
            client.flush(15)
    time.sleep(0.5)
    for client in [*clients.values(), dashboard]:
        client.close()
    honest = [d for d in DEVICES if d != VICTIM]
    delivered = sum(received[d] for d in honest)
    print(f"  {len(honest)} devices sent {sum(sent[d] for d in honest)} messages; "
          f"the dashboard received {delivered}")  # fmt: skip
    print(f"  {VICTIM}: {received[VICTIM]} messages delivered before the revocation, none after")
    run("device", "show", VICTIM)
    run("audit", "--device", VICTIM)
    ocsp_check(ports["enrollment"])


def tpm_line(est_url: str, ports: dict[str, int]) -> None:
    """A second line whose meters carry TPMs: attested enrollment, then mTLS from the TPM key."""
    step("10. A line of meters with TPMs: each key is made in its TPM and proven by attestation")
    hardware = HOME / "hardware"
    maker = TpmManufacturer(hardware / "tpm-maker")
    bus = DbusSession(hardware / "dbus").start()
    tpms: list[VirtualTpm] = []
    try:
        os.environ.update(bus.environment)  # the tabrmd TCTI finds its resource manager here
        os.environ.update(quiet_tss_env())  # no ERROR lines for the EK indexes swtpm lacks
        for n, meter in enumerate(METERS):
            tpms.append(
                VirtualTpm.manufacture(
                    hardware / meter, manufacturer=maker, bus=bus, name=f"demo_meter_{n}"
                )
            )
        print(f"manufactured {len(tpms)} virtual TPMs with EK certificates from a test vendor CA")
        trust = HOME / "trust" / "tpm-manufacturers"
        trust.mkdir(parents=True, exist_ok=True)
        shutil.copy(maker.ca_certificate, trust / "demo-vendor.pem")
        print(f"trusting that vendor: {trust.relative_to(ROOT)}/demo-vendor.pem")
        run("group", "require", "meters", "tpm")
        run("batch", "add", "line-1", *METERS, "meter-99", "--group", "meters")
        enroll_meters(est_url, ports, tpms, maker)
    finally:
        for tpm in tpms:
            tpm.stop()
        bus.stop()


def enroll_station(est_url: str, code: str) -> None:
    """The station makes its own key and redeems its bootstrap code over EST."""
    os.environ["FLEETGATE_STATION_CODE"] = code  # not on a command line
    try:
        station, root = HOME / "stations" / "line-1", HOME / "ca" / "root.crt"
        run("station", "enroll", "line-1", "--server", est_url, "--root", str(root),
            "--dir", str(station))  # fmt: skip
    finally:
        del os.environ["FLEETGATE_STATION_CODE"]


def enroll_meters(
    est_url: str, ports: dict[str, int], tpms: list[VirtualTpm], maker: TpmManufacturer
) -> None:
    station = HOME / "stations" / "line-1"
    credentials = {"station_cert": station / "station.crt", "station_key": station / "station.key"}
    root = x509.load_pem_x509_certificates((HOME / "ca" / "root.crt").read_bytes())
    ek_chain = x509.load_pem_x509_certificates(maker.issuer_certificate.read_bytes())
    for meter, tpm in zip(METERS, tpms, strict=True):
        store = TpmKeyStore(HOME / "devices" / meter, tcti=tpm.tcti)
        store.set_trust_anchors(root)
        started = time.perf_counter()
        enroll_tpm(store, meter, est_url=est_url, ek_chain=ek_chain, **credentials)
        took = (time.perf_counter() - started) * 1000
        (store.directory / "device.toml").write_text(
            f'broker = "localhost:{ports["broker"]}"\ntcti = "{tpm.tcti}"\n'
        )
        print(f"{meter}: EK checked, credential activated, TPM2_Certify verified ({took:.0f} ms)")
    run("device", "show", METERS[0])

    print("meter-99, whose key is a file rather than in a TPM, asks for a certificate:")
    key = ec.generate_private_key(ec.SECP256R1())
    context = client_context(
        HOME / "ca" / "root.crt", station / "station.crt", station / "station.key"
    )
    try:
        with EstClient(est_url, context) as est:
            est.simpleenroll(device_csr("meter-99", key))
        print("  issued (this should not happen!)")
    except EstError as exc:
        print(f"  refused: {exc.message}")

    print(f"{METERS[0]} connects with its TPM key (tpm2-openssl) and publishes:")
    agent = subprocess.run(
        [FLEETGATE, "device", "run", str(HOME / "devices" / METERS[0]), "--count", "3",
         "--interval", "0.2"],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    print(f"  $ fleetgate device run demo-data/devices/{METERS[0]} --count 3")
    print(f"  {agent.stdout.strip()}")
    if agent.returncode != 0:
        print(agent.stderr[-2000:])
        raise SystemExit(f"the TPM meter's agent failed (exit {agent.returncode})")


def ocsp_check(port: int) -> None:
    """openssl asks the OCSP responder about the revoked device's certificate."""
    result = subprocess.run(
        ["openssl", "ocsp", "-issuer", str(HOME / "ca" / "issuing.crt"),
         "-cert", str(HOME / "devices" / VICTIM / "device.crt"),
         "-url", f"https://localhost:{port}/ocsp", "-CAfile", str(HOME / "ca" / "chain.pem")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    print("$ openssl ocsp ... -cert devices/sensor-07/device.crt")
    print("  " + "\n  ".join(result.stdout.strip().splitlines()))


# -- scale-out: two broker nodes on a NATS cluster (issue 12) ------------------------------------

FABRIC_DEVICE = "sensor-03"
RETAINED_TOPIC = "devices/sensor-04/commands/config"


def start_node(name: str, servers: list[str], port: int) -> subprocess.Popen[bytes]:
    """``fleetgate serve broker`` as one node of the fabric, on the demo's data directory."""
    env = dict(os.environ)
    env.update(
        FLEETGATE_FABRIC_SERVERS=",".join(servers),
        FLEETGATE_FABRIC_NODE_NAME=name,
        FLEETGATE_BROKER_PORT=str(port),
        FLEETGATE_BROKER_METRICS_PORT=str(free_port()),
    )
    log = (HOME / f"broker-{name}.log").open("a")
    process = subprocess.Popen([FLEETGATE, "serve", "broker"], env=env, stdout=log, stderr=log)
    wait_for_port(port, f"broker node {name}", 60)
    return process


def stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        process.wait(30)


def wait_until(condition: Callable[[], bool], what: str, deadline_s: float = 30.0) -> float:
    """Seconds until ``condition`` held; the demo fails naming ``what`` after ``deadline_s``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > deadline_s:
            sys.exit(f"demo failed: {what} did not happen within {deadline_s:.0f} s")
        time.sleep(0.02)
    return time.monotonic() - started


def scale_out() -> None:
    """3 NATS servers and 2 broker nodes on loopback: a device on node 1 and a dashboard on
    node 2 talk; node 1 is killed and the device resumes its session on node 2 with what was
    queued; a revocation kicks it there; a retained message outlives both nodes."""
    from firmware_sim.nats_cluster import NatsCluster, nats_server_binary

    try:
        nats_server_binary()
    except RuntimeError as exc:
        print(f"\n(scale-out part skipped: {exc})")
        return
    with tempfile.TemporaryDirectory(prefix="fleetgate-demo-nats-") as scratch:
        step("11. Scale out: 3 NATS servers (JetStream, R3) and 2 broker nodes on loopback")
        with NatsCluster(Path(scratch)) as cluster:
            ports = [free_port(), free_port()]
            nodes = [start_node(f"node-{i + 1}", cluster.urls, p) for i, p in enumerate(ports)]
            print(f"NATS on {', '.join(cluster.urls)}; brokers node-1 :{ports[0]}, "
                  f"node-2 :{ports[1]}")  # fmt: skip
            try:
                fabric_story(nodes, ports, cluster.urls)
            finally:
                for process in nodes:
                    stop(process)


def fabric_story(
    nodes: list[subprocess.Popen[bytes]], ports: list[int], servers: list[str]
) -> None:
    stores = {d: FileKeyStore(HOME / "devices" / d) for d in (FABRIC_DEVICE, "sensor-04")}
    stores["dashboard"] = FileKeyStore(HOME / "devices" / "dashboard")
    telemetry: list[str] = []
    commands: list[str] = []
    dashboard = DeviceClient(stores["dashboard"], "dashboard", port=ports[1]).start()
    dashboard.wait_connected(15)
    dashboard.subscribe("devices/+/telemetry", lambda m: telemetry.append(m.payload.decode()))
    dashboard.flush(15)
    device = DeviceClient(
        stores[FABRIC_DEVICE], FABRIC_DEVICE, port=ports[0], session_expiry=3600,
        backoff=Backoff(initial=0.2, maximum=1.0),
    ).start()  # fmt: skip
    device.wait_connected(15)
    device.subscribe(
        f"devices/{FABRIC_DEVICE}/commands/#", lambda m: commands.append(m.payload.decode())
    ).wait(15)
    while not telemetry:  # the dashboard's interest reaches node 1's NATS server
        device.publish(f"devices/{FABRIC_DEVICE}/telemetry", b'{"t": 20.0}').wait(10)
        time.sleep(0.1)
    print(f"{FABRIC_DEVICE} on node-1 -> dashboard on node-2: {telemetry[-1]}")
    time.sleep(1.5)  # node-1 checkpoints the session's record in FG_SESSIONS once a second

    step(f"12. node-1 is killed (SIGKILL) while {FABRIC_DEVICE} has a persistent session")
    stop(nodes[0], signal.SIGKILL)
    wait_until(lambda: device.connection is None, f"{FABRIC_DEVICE} noticing")
    for n in range(1, 4):
        dashboard.publish(f"devices/{FABRIC_DEVICE}/commands/set", f"setpoint-{n}").wait(15)
    print(f"the dashboard queued 3 commands for {FABRIC_DEVICE} while it is away")
    device.port = ports[1]  # its broker address now names node-2
    took = wait_until(lambda: len(commands) >= 3, "the resumed session's queue", 45)
    info = device.connection
    present = info.session_present if info is not None else "?"
    print(f"{FABRIC_DEVICE} resumed on node-2 (session present: {present}) and got "
          f"{', '.join(commands)} {took * 1000:.0f} ms after it turned to node-2")  # fmt: skip

    step(f"13. {FABRIC_DEVICE} is revoked: the node that holds it now closes its session")
    run("device", "revoke", FABRIC_DEVICE, "--reason", "keyCompromise", show=False)
    wait_until(lambda: "0x87" in (device.last_error or ""), "the kick and a refused reconnect", 15)
    print(f"node-2 closed its session (0x98, above); reconnecting it is told: {device.last_error}")
    device.close(5)

    step("14. A retained message outlives a restart of both broker nodes")
    dashboard.publish(RETAINED_TOPIC, "interval=60", retain=True).wait(15)
    dashboard.close()
    stop(nodes[1])
    nodes[:] = [start_node(f"node-{i + 1}", servers, p) for i, p in enumerate(ports)]
    retained: list[str] = []
    meter = DeviceClient(stores["sensor-04"], "sensor-04", port=ports[0]).start()
    meter.wait_connected(15)
    meter.subscribe("devices/sensor-04/commands/#", lambda m: retained.append(m.payload.decode()))
    wait_until(lambda: bool(retained), "the retained message", 15)
    print(f"both nodes restarted; sensor-04 subscribed on node-1 and got {retained[0]!r}")
    meter.close()


if __name__ == "__main__":
    main()
