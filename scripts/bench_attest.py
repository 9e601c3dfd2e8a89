"""Attested enrollment, step by step: a TPM on swtpm and a PIV card on the virtual card.

``make bench-attest`` runs this. It makes a throw-away data directory (CA, one station, the
device ids), a virtual TPM (swtpm + tpm2-abrmd, EK certificate from a bench-only manufacturer)
and a virtual card (pcscd + vpcd + the PIV applet, attested by a bench-only card maker), puts
both makers' CAs in the trust stores, starts ``fleetgate serve enrollment`` as its own process,
and enrolls ``--runs`` device ids through each with the SDK's station code (``enroll_tpm``,
``enroll_smartcard``), one after another, after ``--warmup`` unrecorded ones.

Where each enrollment's time goes:

- **hardware**: every ESAPI command (``tpm2_pytss.ESAPI`` methods, connecting through
  tpm2-abrmd included), and for the card every APDU exchange (``PivCard.transmit``) and the
  PC/SC connect; the steps shown are ``enroll_tpm``'s timers (key generation: EK certificate
  read, device key and AK created; credential activation; certify; the CSR's signature) and
  the card's own calls;
- **service**: every EST round trip (``EstClient`` calls: TLS handshake, HTTP, the
  enrollment server's work: chain and CRL checks, MakeCredential, issuance, the registry);
- **station**: the rest of the wall time, i.e. the station's own code (TLS context set-up,
  JSON/base64, the CSR build around the card signature, checks, key store files).

Every other recorded enrollment runs with the makers' CRLs in the trust stores (the default
``hardware_crl = "if-present"`` then checks each manufacturer-issued certificate of the chain),
the others without: interleaved, so both halves see the same noise; the difference of their
medians is the cost of the revocation check.

``station_overhead_pct`` is the station's share of both enrollments' total (medians). The
server's CPU time per enrollment is printed as well. swtpm answers in microseconds where a
discrete TPM takes tens to hundreds of milliseconds per command, so the hardware share here is
a lower bound and the station's share an upper bound of what real hardware would show.

The last line is machine-readable::

    tpm_enroll_ms=<median> card_enroll_ms=<median> station_overhead_pct=<n>
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import functools
import inspect
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from bench_enroll import (
    PASSPHRASE,
    SERVER_NAME,
    STATION,
    prepare_data_dir,
    start_server,
    stop_server,
    wait_until_serving,
)
from benchlib import cpu_seconds, free_port, percentile
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from tpm2_pytss import ESAPI  # type: ignore[import-untyped]

from device_sdk import est as est_module
from device_sdk import piv as piv_module
from device_sdk.est import client_context
from device_sdk.piv_provisioning import enroll_smartcard
from device_sdk.smartcard_keystore import SmartcardKeyStore
from device_sdk.tpm_keystore import TpmKeyStore
from device_sdk.tpm_provisioning import enroll_tpm
from firmware_sim.vcard import CardManufacturer, PcscDaemon, VirtualCard
from firmware_sim.vtpm import DbusSession, TpmManufacturer, VirtualTpm

PIN = "123456"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30, help="recorded enrollments per kind")
    parser.add_argument("--warmup", type=int, default=3, help="unrecorded enrollments per kind")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument(
        "--profile", action="store_true", help="cProfile the recorded runs; print the top rows"
    )
    args = parser.parse_args()
    if args.runs < 1 or args.warmup < 0:
        parser.error("--runs must be at least 1 and --warmup at least 0")
    return args


class Stopwatch:
    """Seconds spent in wrapped callables, by label, since the last :meth:`reset`; a call
    inside another call of the same label is not counted twice."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = defaultdict(float)
        self._depth: dict[str, int] = defaultdict(int)

    def wrap(self, owner: Any, name: str, label: str) -> None:
        original: Callable[..., Any] = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self._depth[label]:
                return original(*args, **kwargs)
            self._depth[label] += 1
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.spent[label] += time.perf_counter() - start
                self._depth[label] -= 1

        setattr(owner, name, timed)

    def reset(self) -> dict[str, float]:
        spent, self.spent = dict(self.spent), defaultdict(float)
        return spent


def instrument(watch: Stopwatch) -> None:
    """Time the SDK's own calls (no copy of its steps): round trips, APDUs, card steps."""
    for name in ("cacerts", "attestation_json", "attested_enroll"):
        watch.wrap(est_module.EstClient, name, "service")
    watch.wrap(piv_module.PivCard, "transmit", "hardware")
    watch.wrap(piv_module.PivCard, "open", "hardware")  # PC/SC connect and SELECT
    # Every ESAPI command (and connecting through tpm2-abrmd): the SDK's step timers leave out
    # the storage key re-created and the keys loaded around activation and certify.
    for name, member in vars(ESAPI).items():
        if inspect.isfunction(member) and (name == "__init__" or not name.startswith("_")):
            watch.wrap(ESAPI, name, "tpm")
    for name, step in (
        ("generate_key", "keygen"),
        ("sign_digest", "csr"),
        ("attest", "certify"),
        ("attestation_certificate", "certify"),
        ("put_certificate", "store"),
        ("verify_pin", "pin"),
    ):
        watch.wrap(piv_module.PivCard, name, f"card:{step}")
    watch.wrap(est_module.EstClient, "attested_enroll", "step:issue")


def crl_pem(cert: Path, key: Path) -> bytes:
    """An empty week-long CRL of the CA in ``cert`` (``swtpm_localca`` keys are certtool text,
    then the PEM)."""
    ca = x509.load_pem_x509_certificate(cert.read_bytes())
    text = key.read_bytes()
    signer = serialization.load_pem_private_key(text[text.index(b"-----BEGIN") :], None)
    assert not isinstance(signer, bytes)
    now = dt.datetime.now(dt.UTC)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(now + dt.timedelta(days=7))
        .sign(cast(CertificateIssuerPrivateKeyTypes, signer), hashes.SHA256())
    )
    return crl.public_bytes(serialization.Encoding.PEM)


def main() -> int:
    args = parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fleetgate-bench-attest-"))
    home = tmp / "fleet-data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETGATE_")}
    env.update(
        FLEETGATE_HOME=str(home), FLEETGATE_CA_PASSPHRASE=PASSPHRASE, FLEETGATE_LOG_LEVEL="WARNING"
    )
    per_kind = args.runs + args.warmup
    ids = {kind: [f"bench-{kind}-{i:04d}" for i in range(per_kind)] for kind in ("tpm", "card")}
    stoppers: list[Callable[[], None]] = []
    proc = None
    try:
        prepare_data_dir(home, env, ids["tpm"] + ids["card"])
        started = time.perf_counter()
        bus = DbusSession(tmp / "dbus").start()
        stoppers.append(bus.stop)
        os.environ.update({**bus.environment, "TSS2_LOG": "all+none"})
        tpm_maker = TpmManufacturer(tmp / "tpm-maker")
        vtpm = VirtualTpm.manufacture(tmp / "tpm", manufacturer=tpm_maker, bus=bus)
        stoppers.append(vtpm.stop)
        pcscd = PcscDaemon(tmp / "pcscd").start()
        stoppers.append(pcscd.stop)
        os.environ.update(pcscd.env())
        card_maker = CardManufacturer.create(tmp / "card-maker", name="bench card maker")
        state = card_maker.manufacture(tmp / "card.json", serial=4242, pin=PIN)
        card = VirtualCard(pcscd, state).insert()
        stoppers.append(card.remove)
        for store, ca in (
            ("trust/tpm-manufacturers", tpm_maker.ca_certificate),
            ("trust/card-manufacturers", card_maker.cert_path),
        ):
            (home / store).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ca, home / store / "bench-maker.pem")
        crls = {
            home / "trust/tpm-manufacturers" / "bench-maker-crls.pem": crl_pem(
                tpm_maker.issuer_certificate, tpm_maker.issuer_key
            )
            + crl_pem(
                tpm_maker.ca_certificate, tpm_maker.directory / "swtpm-localca-rootca-privkey.pem"
            ),
            home / "trust/card-manufacturers" / "bench-maker.crl": crl_pem(
                card_maker.cert_path, card_maker.key_path
            ),
        }
        print(f"set-up: swtpm + tpm2-abrmd, pcscd + card in {time.perf_counter() - started:.1f} s")

        station_cert = home / "stations" / STATION / "station.crt"
        station_key = home / "stations" / STATION / "station.key"
        root = home / "ca" / "root.crt"
        port = free_port()
        stderr_path = tmp / "server.stderr"
        proc = start_server(env, port, stderr_path, None, pin=False)
        wait_until_serving(proc, port, client_context(root, station_cert, station_key), stderr_path)
        url = f"https://{SERVER_NAME}:{port}"
        anchors = x509.load_pem_x509_certificates(root.read_bytes())
        ek_chain = x509.load_pem_x509_certificates(tpm_maker.issuer_certificate.read_bytes())

        watch = Stopwatch()
        instrument(watch)
        results: dict[str, list[dict[str, float]]] = {"tpm": [], "card": []}
        server_cpu: dict[str, float] = {}

        def tpm_once(device_id: str) -> dict[str, float]:
            keys = TpmKeyStore(tmp / "devices" / device_id, tcti=vtpm.tcti)
            keys.set_trust_anchors(anchors)
            steps: dict[str, float] = {}
            start = time.perf_counter()
            enroll_tpm(
                keys,
                device_id,
                est_url=url,
                station_cert=station_cert,
                station_key=station_key,
                ek_chain=ek_chain,
                timings=steps,
            )
            total = time.perf_counter() - start
            spent = watch.reset()
            return {**steps, "total": total, "hardware": spent["tpm"], "service": spent["service"]}

        def card_once(device_id: str) -> dict[str, float]:
            keys = SmartcardKeyStore(tmp / "devices" / device_id, pin=PIN)
            keys.set_trust_anchors(anchors)
            start = time.perf_counter()
            try:
                enroll_smartcard(
                    keys, device_id, est_url=url, station_cert=station_cert, station_key=station_key
                )
            finally:
                keys.close()
            total = time.perf_counter() - start
            spent = watch.reset()
            steps = {k.split(":", 1)[1]: v for k, v in spent.items() if ":" in k}
            return {
                **steps,
                "total": total,
                "hardware": spent["hardware"],
                "service": spent["service"],
            }

        for kind, once in (("tpm", tpm_once), ("card", card_once)):
            for device_id in ids[kind][: args.warmup]:
                once(device_id)
            profiler = cProfile.Profile() if args.profile else None
            if profiler is not None:
                profiler.enable()
            cpu_before = cpu_seconds(proc.pid)
            for index, device_id in enumerate(ids[kind][args.warmup :]):
                with_crls = index % 2 == 1
                for path, pem in crls.items():
                    if with_crls:
                        path.write_bytes(pem)
                    else:
                        path.unlink(missing_ok=True)
                results[kind].append({**once(device_id), "crl": float(with_crls)})
            server_cpu[kind] = (cpu_seconds(proc.pid) - cpu_before) / args.runs
            if profiler is not None:
                profiler.disable()
                print(f"\n-- {kind}: where the station's process spends its time (cumulative)")
                pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
    finally:
        if proc is not None:
            stop_server(proc)
        for stop in reversed(stoppers):
            stop()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    return report(results, server_cpu, args.runs)


def report(
    results: dict[str, list[dict[str, float]]], server_cpu: dict[str, float], runs: int
) -> int:
    def med(kind: str, key: str) -> float:
        return statistics.median(r.get(key, 0.0) for r in results[kind]) * 1000

    print(f"\n{runs} enrollments per kind, sequential; medians in ms (p90 of the total)")
    columns = {
        "tpm": ("keygen", "challenge", "activation", "certify", "csr", "issue"),
        "card": ("pin", "keygen", "csr", "certify", "issue", "store"),
    }
    shares: dict[str, tuple[float, float]] = {}
    for kind in ("tpm", "card"):
        row = "  ".join(f"{step}={med(kind, step):.2f}" for step in columns[kind])
        totals = [r["total"] * 1000 for r in results[kind]]
        station = [(r["total"] - r["hardware"] - r["service"]) * 1000 for r in results[kind]]
        total, station_ms = statistics.median(totals), statistics.median(station)
        shares[kind] = (total, station_ms)
        print(f"{kind:>4}: {row}")
        print(
            f"      total={total:.1f} (p90 {percentile(totals, 0.9):.1f})  "
            f"hardware={med(kind, 'hardware'):.1f}  "
            f"service round trips={med(kind, 'service'):.1f}  "
            f"station={station_ms:.1f} ({100 * station_ms / total:.1f} %)  "
            f"server CPU={server_cpu[kind] * 1000:.1f}/enrollment"
        )
    for kind in ("tpm", "card"):
        halves = [
            statistics.median(r["total"] * 1000 for r in results[kind] if r["crl"] == flag)
            for flag in (0.0, 1.0)
            if any(r["crl"] == flag for r in results[kind])
        ]
        if len(halves) == 2:
            print(
                f"{kind:>4}: without CRLs {halves[0]:.1f}, with the makers' CRLs checked "
                f"{halves[1]:.1f} (interleaved halves, medians)"
            )
    print(
        "      (card: certify = INS F9 attestation + reading the F9 certificate; "
        "no credential activation exists for a card)"
    )
    overhead = 100 * sum(s for _, s in shares.values()) / sum(t for t, _ in shares.values())
    print(
        f"tpm_enroll_ms={shares['tpm'][0]:.1f} card_enroll_ms={shares['card'][0]:.1f} "
        f"station_overhead_pct={overhead:.1f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
