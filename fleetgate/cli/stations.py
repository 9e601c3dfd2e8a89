"""``fleetgate station`` and ``fleetgate batch``: production-line stations and the device ids
each may enroll."""

from __future__ import annotations

import csv
import datetime as dt
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from sqlmodel import col, select

from device_sdk.est import EstClient, client_context, station_csr
from enrollment import ca as ca_module
from enrollment.csr import decode_est_body
from enrollment.registry import (
    Device,
    Registry,
    StationState,
    SubjectKind,
)
from fleetgate.cli.common import (
    JsonFlag,
    admin_actor,
    emit,
    home_config,
    open_registry,
    open_service,
    when,
)
from fleetgate.errors import EnrollmentRefused, NotFound
from fleetgate.ids import validate_id
from fleetgate.keyfiles import write_certificates, write_private_key

station_app = typer.Typer(no_args_is_help=True, help="Production-line stations allowed to enroll.")
batch_app = typer.Typer(no_args_is_help=True, help="Device ids a station may enroll.")


@station_app.command("add")
def station_add(
    name: str,
    csr: Annotated[
        Path | None,
        typer.Option(help="The station's CSR (PEM or DER), made on the station with its key."),
    ] = None,
    code_ttl: Annotated[
        int, typer.Option(help="Without --csr: minutes the one-time bootstrap code is valid.")
    ] = 60,
    out: Annotated[
        Path | None, typer.Option(help="With --csr: directory for the station's certificate.")
    ] = None,
) -> None:
    """Add a station. Its key never exists here: either sign the CSR it made (--csr), or print
    a one-time code with which it enrolls its own key over EST (fleetgate station enroll)."""
    config = home_config()
    service = open_service(config)
    if csr is None:
        if code_ttl < 1:
            raise typer.BadParameter("--code-ttl must be at least 1 minute")
        ttl = dt.timedelta(minutes=code_ttl)
        code = service.invite_station(name, actor=admin_actor(), ttl=ttl)
        typer.echo(
            f"station {name} added; its one-time bootstrap code (valid {code_ttl} min, shown "
            f"only now):\n{code}\n"
            f"on the station: fleetgate station enroll {name} --server https://HOST:PORT "
            "--root root.crt --code CODE"
        )
        return
    data = csr.read_bytes()
    der = decode_est_body(data) if data.lstrip().startswith(b"-----BEGIN") else data
    cert = service.add_station(name, der, actor=admin_actor())
    directory = out or config.stations_dir / name
    write_certificates(directory / "station.crt", [cert, ca_module.load_anchors(config).issuing])
    typer.echo(f"station {name} added; certificate in {directory / 'station.crt'}")


ServerOption = Annotated[str, typer.Option("--server", help="The EST server, https://host:port.")]
RootOption = Annotated[Path, typer.Option("--root", help="The fleet's root certificate.")]
DirOption = Annotated[
    Path, typer.Option("--dir", help="Where the station keeps its key and certificate.")
]


@station_app.command("enroll")
def station_enroll(
    name: str,
    server: ServerOption,
    root: RootOption,
    code: Annotated[
        str, typer.Option(envvar="FLEETGATE_STATION_CODE", help="The one-time bootstrap code.")
    ],
    directory: DirOption = Path("station"),
) -> None:
    """On the station: make its key (0600, never leaves), enroll it with the bootstrap code."""
    key = ec.generate_private_key(ec.SECP256R1())
    with EstClient(server, client_context(root)) as est:
        cert = est.station_enroll(station_csr(name, key), name, code)
        _keep(directory, key, [cert, *est.cacerts()[:1]])
    typer.echo(f"station {name} enrolled; key and certificate in {directory}")


@station_app.command("renew")
def station_renew(
    name: str, server: ServerOption, root: RootOption, directory: DirOption = Path("station")
) -> None:
    """On the station: renew its short-lived certificate over EST, with a new key."""
    key = ec.generate_private_key(ec.SECP256R1())
    credentials = (directory / "station.crt", directory / "station.key")
    with EstClient(server, client_context(root, *credentials)) as est:
        cert = est.simplereenroll(station_csr(name, key))
        _keep(directory, key, [cert, *est.cacerts()[:1]])
    typer.echo(f"station {name} renewed; valid until {cert.not_valid_after_utc:%Y-%m-%d %H:%M}Z")


def _keep(directory: Path, key: ec.EllipticCurvePrivateKey, chain: list[x509.Certificate]) -> None:
    """The station's key (0600, PKCS#8) and its certificate chain."""
    write_private_key(directory / "station.key", key)
    write_certificates(directory / "station.crt", chain)


@station_app.command("list")
def station_list(as_json: JsonFlag = False) -> None:
    """List stations."""
    registry = open_registry(home_config())
    rows = []
    for station in registry.stations():
        certs = registry.certificates_of(SubjectKind.STATION, station.id)
        rows.append(
            {
                "id": station.id,
                "state": station.state.value,
                "certificate": certs[-1].serial if certs else "-",
                "expires": when(certs[-1].not_after) if certs else "-",
            }
        )
    emit(rows, as_json)


@station_app.command("revoke")
def station_revoke(
    name: str, reason: Annotated[str, typer.Option(help="RFC 5280 reason.")] = "keyCompromise"
) -> None:
    """Revoke a station: it can enroll nothing more; the CRL is regenerated."""
    open_service(home_config()).revoke_station(name, reason=reason, actor=admin_actor())
    typer.echo(f"station {name} revoked ({reason}); CRL regenerated")


# -- batches -----------------------------------------------------------------------------------


@batch_app.command("add")
def batch_add(
    station: str,
    device_ids: list[str],
    group: Annotated[str, typer.Option(help="Device group (selects ACL templates).")] = "default",
    label: Annotated[str, typer.Option(help="Free-text label, e.g. a work order.")] = "",
) -> None:
    """Allow STATION to enroll DEVICE_IDS (all are added, or none)."""
    batch_id = open_registry(home_config()).add_batch(
        station, device_ids, group=group, label=label, actor=admin_actor()
    )
    typer.echo(f"batch {batch_id}: station {station} may enroll {len(device_ids)} device(s)")


@batch_app.command("import")
def batch_import(csv_file: Path) -> None:
    """Import batches from CSV with columns station,device_id[,group]."""
    by_key: dict[tuple[str, str], list[str]] = {}
    with csv_file.open(newline="") as handle:
        for line, row in enumerate(csv.DictReader(handle), start=2):
            if not row.get("station") or not row.get("device_id"):
                raise typer.BadParameter(
                    f"{csv_file}:{line}: needs 'station' and 'device_id' columns"
                )
            key = (row["station"].strip(), (row.get("group") or "default").strip())
            by_key.setdefault(key, []).append(row["device_id"].strip())
    registry = open_registry(home_config())
    _check_import(csv_file, registry, by_key)
    for (station, group), ids in by_key.items():
        batch_id = registry.add_batch(
            station, ids, group=group, label=csv_file.name, actor=admin_actor()
        )
        typer.echo(
            f"batch {batch_id}: station {station} may enroll {len(ids)} device(s) in group {group}"
        )


def _check_import(
    csv_file: Path, registry: Registry, by_key: dict[tuple[str, str], list[str]]
) -> None:
    """Refuse the whole file up front, so a bad row in a later batch adds no earlier one."""
    ids = [validate_id(d) for batch in by_key.values() for d in batch]
    for station, group in by_key:
        validate_id(group, kind="group")
        if registry.station(station).state != StationState.ACTIVE:
            raise NotFound(f"{csv_file}: station {station} is revoked")
    twice = sorted(d for d, n in Counter(ids).items() if n > 1)
    if twice:
        raise EnrollmentRefused(f"{csv_file}: device id(s) listed twice: {', '.join(twice[:10])}")
    with registry.transaction() as s:
        taken = sorted(s.exec(select(Device.id).where(col(Device.id).in_(ids))).all())
    if taken:
        raise EnrollmentRefused(
            f"{csv_file}: device id(s) already registered: {', '.join(taken[:10])}; "
            "ids are never reused; nothing was imported"
        )
