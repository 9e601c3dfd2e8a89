"""The station's side of ``station add --csr`` in one process (the simulator, tests, benchmarks).

The station makes its key where it keeps it and sends only a CSR; the CA signs that. Nothing
here writes a key on the CA's behalf: in production the two halves run on different hosts
(``fleetgate station enroll`` redeems a bootstrap code instead).
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from device_sdk.est import station_csr
from enrollment.service import EnrollmentService
from fleetgate.keyfiles import write_certificates, write_private_key


def new_station(
    service: EnrollmentService, station_id: str, *, actor: str
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A station key (made here, the station's side) and the certificate the CA signed for it."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = station_csr(station_id, key).public_bytes(Encoding.DER)
    return key, service.add_station(station_id, csr, actor=actor)


def provision_station(
    service: EnrollmentService, station_id: str, directory: Path, *, actor: str
) -> tuple[Path, Path, x509.Certificate]:
    """``station.crt`` (with its issuing CA) and ``station.key`` (0600) in ``directory``."""
    key, cert = new_station(service, station_id, actor=actor)
    cert_path, key_path = directory / "station.crt", directory / "station.key"
    write_private_key(key_path, key)
    write_certificates(cert_path, [cert, service.ca.anchors.issuing])
    return cert_path, key_path, cert
