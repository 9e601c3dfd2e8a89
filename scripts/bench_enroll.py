"""End-to-end EST enrollment throughput: HTTPS keep-alive, mutual TLS 1.3, SQLite registry.

``make bench-enroll`` runs this. It builds a throw-away data directory (CA, one station, N device
ids), pre-generates every device key and CSR (that is the device's work, not the server's),
starts ``fleetgate serve enrollment`` pinned to core 0 and drives it from an asyncio load
generator pinned to core 1: C kept-alive TLS connections with the station certificate, each
sending raw pre-built ``POST /.well-known/est/simpleenroll`` requests one after another. Each
connection makes one TLS handshake for the whole run (TLS session resumption would save nothing
more), so the generator's cost per request is parsing one response: ~80-95 us, a ceiling above
10,000 requests/s on its core.

It reports enrollments per second, latency, the server's CPU time per enrollment, the
generator's own CPU cost (so one can tell whether the generator was the limit), the server's
own split of its time (CSR checks, signing, database; the rest is TLS, HTTP, authentication and
logging) and how many enrollments each of its transactions carried (group commit).
``--profile`` runs the server under cProfile and prints where its time goes.

The last line is machine-readable::

    enroll_per_s=<n> p99_ms=<n> server_cpu_us_per_enroll=<n> generator_ceiling_per_s=<n>
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import pstats
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import cpu_seconds, free_port, percentile
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, pkcs7
from cryptography.x509.oid import NameOID

from device_sdk.est import client_context, device_csr, station_csr
from enrollment.registry import DeviceState, Registry
from fleetgate.keyfiles import write_private_key

REPO = Path(__file__).resolve().parents[1]

PASSPHRASE = "bench-passphrase-0123"
STATION = "bench"
ENROLL_PATH = "/.well-known/est/simpleenroll"
SERVER_CORE = 0
GENERATOR_CORE = 1
HOST = "127.0.0.1"
SERVER_NAME = "localhost"  # in the server certificate's SAN (enrollment.server_names)

# The server process. ``fleetgate serve enrollment`` with one change: the fleetgate.server logger
# stays at INFO while everything else follows FLEETGATE_LOG_LEVEL (WARNING here), so the
# "enrollment service stopped" line carrying stage_seconds is still written, without paying
# for a JSON log line per enrollment. Optionally under cProfile, dumped when the server exits on
# SIGTERM: the event loop's thread and, merged into the same statistics, the service threads
# (each thread has its own profiler; the server joins its threads before it returns).
SERVER_BOOT = """\
import logging, sys
logging.getLogger("fleetgate.server").setLevel(logging.INFO)
from fleetgate.cli import main
sys.argv = ["fleetgate", "serve", "enrollment", "--port", sys.argv[1], "--workers", sys.argv[2]]
profile_out = {profile_out!r}
if not profile_out:
    main()
else:
    import cProfile, pstats, threading
    thread_profilers = []
    unprofiled_run = threading.Thread.run
    def profiled_run(self):
        profiler = cProfile.Profile()
        thread_profilers.append(profiler)
        profiler.enable()
        try:
            unprofiled_run(self)
        finally:
            profiler.disable()
    threading.Thread.run = profiled_run
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        main()
    except SystemExit:
        pass
    finally:
        profiler.disable()
        stats = pstats.Stats(profiler)
        for other in thread_profilers:
            stats.add(other)
        stats.dump_stats(profile_out)
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=6000, help="device ids to enroll (N)")
    parser.add_argument("--connections", type=int, default=8, help="kept-alive TLS connections")
    parser.add_argument("--warmup", type=int, default=200, help="enrollments not counted")
    parser.add_argument("--profile", action="store_true", help="run the server under cProfile")
    parser.add_argument("--profile-out", type=Path, help="also keep the .prof file here")
    parser.add_argument("--top", type=int, default=25, help="profile rows to print")
    parser.add_argument(
        "--log-level",
        default="WARNING",
        help="server FLEETGATE_LOG_LEVEL (INFO logs every request)",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="server processes (more than 1: PostgreSQL)"
    )
    parser.add_argument(
        "--database-url", help="a PostgreSQL registry (empty database) instead of SQLite"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary data directory")
    parser.add_argument("--timeout", type=float, default=150.0, help="give up on the load after s")
    args = parser.parse_args()
    if args.devices <= args.warmup:
        parser.error(f"--devices ({args.devices}) must exceed --warmup ({args.warmup})")
    if args.connections < 1:
        parser.error("--connections must be at least 1")
    return args


# -- set-up ------------------------------------------------------------------------------------


def run_cli(env: dict[str, str], *argv: str) -> None:
    fleetgate = Path(sys.executable).with_name("fleetgate")
    result = subprocess.run(
        [str(fleetgate), *argv], env=env, cwd=REPO, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"fleetgate {' '.join(argv)} failed:\n{result.stdout}{result.stderr}")


def prepare_data_dir(home: Path, env: dict[str, str], device_ids: list[str]) -> None:
    run_cli(env, "ca", "init")
    # The station's side: its key is made here and only its CSR goes to `station add`.
    key = ec.generate_private_key(ec.SECP256R1())
    csr = home / "station.csr"
    csr.write_bytes(station_csr(STATION, key).public_bytes(Encoding.PEM))
    run_cli(env, "station", "add", STATION, "--csr", str(csr))
    write_private_key(home / "stations" / STATION / "station.key", key)
    registry = Registry(database_url(home, env))
    try:
        for start in range(0, len(device_ids), 1000):
            registry.add_batch(
                STATION,
                device_ids[start : start + 1000],
                group="default",
                label="bench",
                actor="bench",
            )
    finally:
        registry.close()


@dataclass
class Enrollment:
    device_id: str
    key: ec.EllipticCurvePrivateKey
    request: bytes  # the whole HTTP/1.1 request, built once


def build_request(der: bytes) -> bytes:
    body = base64.encodebytes(der)
    head = (
        f"POST {ENROLL_PATH} HTTP/1.1\r\n"
        f"Host: {SERVER_NAME}\r\n"
        "Content-Type: application/pkcs10\r\n"
        f"Content-Length: {len(body)}\r\n"
        "\r\n"
    )
    return head.encode() + body


def pregenerate(device_ids: list[str]) -> list[Enrollment]:
    out = []
    for device_id in device_ids:
        key = ec.generate_private_key(ec.SECP256R1())
        der = device_csr(device_id, key).public_bytes(Encoding.DER)
        out.append(Enrollment(device_id, key, build_request(der)))
    return out


# -- the server process ------------------------------------------------------------------------


def start_server(
    env: dict[str, str],
    port: int,
    stderr_path: Path,
    profile_out: Path | None,
    pin: bool,
    workers: int = 1,
) -> subprocess.Popen[bytes]:
    code = SERVER_BOOT.format(profile_out=str(profile_out) if profile_out else "")
    argv = [sys.executable, "-c", code, str(port), str(workers)]
    if pin:
        argv = ["taskset", "-c", str(SERVER_CORE), *argv]
    with stderr_path.open("wb") as err:
        return subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)


def wait_until_serving(
    proc: subprocess.Popen[bytes], port: int, ctx: ssl.SSLContext, stderr_path: Path
) -> None:
    """Until a TLS handshake and a GET /cacerts succeed (a bare TCP probe would be audited)."""
    deadline = time.monotonic() + 30
    request = f"GET /.well-known/est/cacerts HTTP/1.1\r\nHost: {SERVER_NAME}\r\n\r\n".encode()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"the server exited with {proc.returncode}:\n{stderr_path.read_text()[-3000:]}"
            )
        try:
            with (
                socket.create_connection((HOST, port), timeout=2) as raw,
                ctx.wrap_socket(raw, server_hostname=SERVER_NAME) as tls,
            ):
                tls.sendall(request)
                if tls.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the server did not accept TLS within 30 s")
        time.sleep(0.1)


def database_url(home: Path, env: dict[str, str]) -> str:
    return env.get("FLEETGATE_DATABASE_URL") or f"sqlite:///{home / 'registry.db'}"


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of the server and its worker processes (``--workers``)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return cpu_seconds(pid) + sum(cpu_seconds(int(child)) for child in children)


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        print("warning: the server ignored SIGTERM for 60 s; killing it", file=sys.stderr)
        proc.kill()
        proc.wait()


def stopped_field(stderr_path: Path, name: str) -> dict[str, float] | None:
    """Field ``name`` (``stage_seconds``, ``enroll_commits``) of the server's "enrollment
    service stopped" log line."""
    for line in reversed(stderr_path.read_text(errors="replace").splitlines()):
        if "enrollment service stopped" not in line:
            continue
        with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
            raw = json.loads(line)[name]
            value = json.loads(raw) if isinstance(raw, str) else raw
            return {k: float(v) for k, v in value.items()}
    return None


# -- the load generator ------------------------------------------------------------------------


class HttpConnection(asyncio.Protocol):
    """One kept-alive connection: write a request, await one Content-Length response."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiter is None or self.waiter.done():
            return
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).lower()
        at = head.find(b"\r\ncontent-length:")
        if at < 0:
            self.waiter.set_exception(ConnectionError("a response without Content-Length"))
            return
        stop = head.find(b"\r\n", at + 2)
        length = int(head[at + 17 : stop if stop >= 0 else len(head)])
        total = end + 4 + length
        if len(self.buffer) < total:
            return
        status = int(head[9:12])
        body = bytes(self.buffer[end + 4 : total])
        del self.buffer[:total]
        self.waiter.set_result((status, body))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"the server closed the connection: {exc}"))

    async def request(self, data: bytes) -> tuple[int, bytes]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return await self.waiter


@dataclass
class Phase:
    ok: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)
    kept: dict[int, bytes] = field(default_factory=dict)  # index -> response body


async def drive(
    conns: list[HttpConnection], work: list[Enrollment], keep: set[int], phase: Phase
) -> None:
    items = iter(enumerate(work))
    perf = time.perf_counter

    async def worker(conn: HttpConnection) -> None:
        for index, item in items:
            started = perf()
            try:
                status, body = await conn.request(item.request)
            except ConnectionError as exc:
                phase.errors += 1
                if len(phase.error_samples) < 5:
                    phase.error_samples.append(f"{item.device_id}: {exc}")
                return  # this connection is gone; the others carry on
            phase.latencies.append(perf() - started)
            if status == 200:
                phase.ok += 1
                if index in keep:
                    phase.kept[index] = body
            else:
                phase.errors += 1
                if len(phase.error_samples) < 5:
                    phase.error_samples.append(
                        f"{item.device_id}: HTTP {status} {body.decode(errors='replace').strip()}"
                    )

    await asyncio.gather(*(worker(c) for c in conns))


@dataclass
class LoadResult:
    warmup: Phase
    timed: Phase
    wall_s: float
    generator_cpu_s: float
    server_cpu_warmup_s: float
    server_cpu_timed_s: float


async def run_load(
    port: int,
    ctx: ssl.SSLContext,
    work: list[Enrollment],
    args: argparse.Namespace,
    server_pid: int,
    keep: set[int],
) -> LoadResult:
    loop = asyncio.get_running_loop()
    conns = []
    for _ in range(args.connections):
        _, conn = await loop.create_connection(
            HttpConnection, HOST, port, ssl=ctx, server_hostname=SERVER_NAME
        )
        conns.append(conn)
    try:
        warmup, timed = Phase(), Phase()
        cpu0 = tree_cpu_seconds(server_pid)
        await asyncio.wait_for(drive(conns, work[: args.warmup], set(), warmup), args.timeout)
        cpu1 = tree_cpu_seconds(server_pid)
        gen0, wall0 = time.process_time(), time.perf_counter()
        await asyncio.wait_for(drive(conns, work[args.warmup :], keep, timed), args.timeout)
        wall = time.perf_counter() - wall0
        gen_cpu = time.process_time() - gen0
        cpu2 = tree_cpu_seconds(server_pid)
    finally:
        for conn in conns:
            if conn.transport is not None:
                conn.transport.close()
        await asyncio.sleep(0.2)  # let the close_notify go out before the server is stopped
    return LoadResult(warmup, timed, wall, gen_cpu, cpu1 - cpu0, cpu2 - cpu1)


# -- checks and report -------------------------------------------------------------------------


def check_certificates(
    kept: dict[int, bytes], work: list[Enrollment], issuing: x509.Certificate
) -> list[str]:
    problems = []
    for index, body in sorted(kept.items()):
        item = work[index]
        try:
            cert = pkcs7.load_der_pkcs7_certificates(base64.b64decode(body))[0]
            cert.verify_directly_issued_by(issuing)
        except (ValueError, TypeError, IndexError, InvalidSignature) as exc:
            problems.append(f"{item.device_id}: the issued certificate does not check out: {exc}")
            continue
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if not cn or cn[0].value != item.device_id:
            problems.append(f"{item.device_id}: certificate CN is {cn}")
        raw = (Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        if cert.public_key().public_bytes(*raw) != item.key.public_key().public_bytes(*raw):
            problems.append(f"{item.device_id}: certificate key differs from the CSR key")
    return problems


def print_profile(path: Path, top: int) -> None:
    """Top functions by cumulative time, fleetgate's own by cumulative, and by own time."""
    sections = (
        ("cumulative", None, "cumulative"),
        ("cumulative", f"{REPO}/(enrollment|device_sdk)/", "cumulative, fleetgate code only"),
        ("tottime", None, "own time (tottime)"),
    )
    for sort, restriction, title in sections:
        out = io.StringIO()
        stats = pstats.Stats(str(path), stream=out)
        if restriction is None:
            stats.strip_dirs()
            stats.sort_stats(sort).print_stats(top)
        else:
            stats.sort_stats(sort).print_stats(restriction, top)
        text = out.getvalue().replace(f"{REPO}/", "")
        start = text.find("   ncalls")
        print(f"\n== server profile: top {top} by {title} ==")
        print(text[start:].rstrip() if start >= 0 else text.rstrip())


def main() -> int:
    args = parse_args()
    affinity = os.sched_getaffinity(0)
    pin = {SERVER_CORE, GENERATOR_CORE} <= affinity and shutil.which("taskset") is not None
    if not pin:
        print(f"warning: cannot pin to cores 0 and 1 (affinity {sorted(affinity)}); not pinning")

    tmp = Path(tempfile.mkdtemp(prefix="fleetgate-bench-"))
    home = tmp / "fleet-data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETGATE_")}
    env.update(
        FLEETGATE_HOME=str(home),
        FLEETGATE_CA_PASSPHRASE=PASSPHRASE,
        FLEETGATE_LOG_LEVEL=args.log_level,
    )
    if args.database_url:
        env["FLEETGATE_DATABASE_URL"] = args.database_url
    device_ids = [f"bench-{i:06d}" for i in range(args.devices)]
    proc: subprocess.Popen[bytes] | None = None
    try:
        t0 = time.perf_counter()
        prepare_data_dir(home, env, device_ids)
        t1 = time.perf_counter()
        work = pregenerate(device_ids)
        t2 = time.perf_counter()
        print(
            f"set-up: CA, station and {args.devices} device ids in {t1 - t0:.1f} s; "
            f"{args.devices} P-256 keys and CSRs in {t2 - t1:.1f} s ({home})"
        )

        ca_dir = home / "ca"
        ctx = client_context(
            ca_dir / "root.crt",
            home / "stations" / STATION / "station.crt",
            home / "stations" / STATION / "station.key",
        )
        issuing = x509.load_pem_x509_certificate((ca_dir / "issuing.crt").read_bytes())
        port = free_port()
        stderr_path = tmp / "server.stderr"
        profile_path = tmp / "server.prof" if args.profile else None
        proc = start_server(env, port, stderr_path, profile_path, pin, args.workers)
        wait_until_serving(proc, port, ctx, stderr_path)

        timed_count = args.devices - args.warmup
        step = max(1, timed_count // 50)
        keep = set(range(0, timed_count, step))
        if pin:
            os.sched_setaffinity(0, {GENERATOR_CORE})
        try:
            result = asyncio.run(run_load(port, ctx, work, args, proc.pid, keep))
        finally:
            if pin:
                os.sched_setaffinity(0, affinity)
        stop_server(proc)
        stages = stopped_field(stderr_path, "stage_seconds")
        commits = stopped_field(stderr_path, "enroll_commits")

        registry = Registry(database_url(home, env))
        try:
            active = len(registry.devices(state=DeviceState.ACTIVE))
        finally:
            registry.close()
        timed_work = work[args.warmup :]
        problems = check_certificates(result.timed.kept, timed_work, issuing)
        if active != args.devices:
            problems.append(f"the registry has {active} active devices, expected {args.devices}")

        timed = result.timed
        enroll_per_s = timed.ok / result.wall_s
        p50 = percentile(timed.latencies, 0.50) * 1000
        p99 = percentile(timed.latencies, 0.99) * 1000
        served = max(1, timed.ok + timed.errors)
        server_us = result.server_cpu_timed_s / served * 1e6
        gen_us = result.generator_cpu_s / served * 1e6
        ceiling = 1e6 / gen_us if gen_us > 0 else float("inf")

        mode = " (server under cProfile: figures are inflated)" if args.profile else ""
        print(f"\n== enrollment benchmark{mode} ==")
        print(
            f"devices {args.devices} (warm-up {args.warmup}, timed {timed_count}); "
            f"{args.connections} kept-alive TLS 1.3 connections; server log level {args.log_level}"
        )
        print(
            f"throughput:      {enroll_per_s:8.1f} enrollments/s "
            f"({timed.ok} in {result.wall_s:.2f} s)"
        )
        print(
            f"latency:         p50 {p50:.2f} ms, p99 {p99:.2f} ms, "
            f"max {max(timed.latencies, default=0) * 1000:.2f} ms, "
            f"mean {statistics.fmean(timed.latencies) * 1000 if timed.latencies else 0:.2f} ms"
        )
        print(
            f"server CPU:      {server_us:8.0f} us/enrollment ({result.server_cpu_timed_s:.2f} s;"
            f" {result.server_cpu_timed_s / result.wall_s * 100:.0f}% of core {SERVER_CORE})"
        )
        print(
            f"generator CPU:   {gen_us:8.0f} us/request ({result.generator_cpu_s:.2f} s) "
            f"-> ceiling {ceiling:.0f} requests/s"
        )
        if stages is not None:
            total = args.warmup + timed_count
            cpu_all = result.server_cpu_warmup_s + result.server_cpu_timed_s
            per = {k: v / total * 1e6 for k, v in stages.items()}
            other = cpu_all / total * 1e6 - sum(per.values())
            print(
                f"server split (us/enrollment over all {total}; stages are wall time, "
                "the rest is CPU minus stages):"
            )
            for name in ("csr", "sign", "db"):
                print(f"  {name:<6}         {per.get(name, 0.0):8.0f}")
            for name in sorted(set(per) - {"csr", "sign", "db"}):
                print(f"  {name:<6}         {per[name]:8.0f}")
            print(
                f"  TLS+HTTP       {other:8.0f}  (the remainder: also client-certificate "
                "authentication and its two registry reads, logging, PKCS#7 encoding)"
            )
        else:
            print(f"server split:    no stage_seconds line in {stderr_path}")
        if commits and commits.get("transactions"):
            per = commits["enrollments"] / commits["transactions"]
            print(
                f"group commit:    {commits['enrollments']:.0f} enrollments in "
                f"{commits['transactions']:.0f} transactions ({per:.1f} per transaction)"
            )
        if args.profile and profile_path is not None:
            if profile_path.exists():
                if args.profile_out:
                    shutil.copyfile(profile_path, args.profile_out)
                print_profile(profile_path, args.top)
            else:
                problems.append("the server wrote no profile")

        print(f"\nsanity: {len(result.timed.kept)} sampled certificates checked, {active} active")
        errors = result.warmup.errors + timed.errors
        if errors:
            print(f"ERRORS: {errors} requests failed, e.g.:")
            for sample in (result.warmup.error_samples + timed.error_samples)[:5]:
                print(f"  {sample}")
        for problem in problems[:10]:
            print(f"SANITY: {problem}")
        print(
            f"enroll_per_s={enroll_per_s:.1f} p99_ms={p99:.2f} "
            f"server_cpu_us_per_enroll={server_us:.0f} generator_ceiling_per_s={ceiling:.0f}"
        )
        return 1 if errors or problems else 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
