"""First enrollment of a smartcard device at the station: key made on the card, attested, issued.

The station selects the card's PIV application and verifies the PIN, has the card generate the
device key in slot 9A, signs the CSR with it (on the card), reads the card's attestation of that
key and the attestation key's certificate, and sends all three to the enrollment service's
``fleetgate/piv/enroll``. The service checks the attestation chains to a card manufacturer it
trusts and vouches for the CSR's key before it issues. The certificate is then written to the
card and to the key store's directory.
"""

from __future__ import annotations

import base64
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from device_sdk.est import device_csr
from device_sdk.provisioning import est_session, install_issued, station_context
from device_sdk.smartcard_keystore import SmartcardKeyStore

PIV_ENROLL = "fleetgate/piv/enroll"


def attestation_payload(
    csr: x509.CertificateSigningRequest,
    attestation: x509.Certificate,
    attestation_intermediate: x509.Certificate,
) -> dict[str, str]:
    """The JSON body of ``fleetgate/piv/enroll`` (standard base64 of DER)."""

    def b64(der: bytes) -> str:
        return base64.b64encode(der).decode()

    return {
        "csr": b64(csr.public_bytes(Encoding.DER)),
        "attestation_certificate": b64(attestation.public_bytes(Encoding.DER)),
        "attestation_intermediate": b64(attestation_intermediate.public_bytes(Encoding.DER)),
    }


def enroll_smartcard(
    keystore: SmartcardKeyStore,
    device_id: str,
    *,
    est_url: str,
    station_cert: Path,
    station_key: Path,
    timeout: float = 30.0,
) -> x509.Certificate:
    """Enroll ``device_id`` with a key generated and attested on the card in ``keystore``.

    Card problems raise :class:`~device_sdk.piv.PivError` subclasses (``WrongPin`` with the tries
    left, ``PinBlocked``, ``CardAbsent`` when the card is pulled midway, ``NoReader``); a refusal
    by the service or an unreachable service raises :class:`EnrollmentError`. Nothing is written
    to the directory unless the service issued a certificate.
    """
    context = station_context(keystore, station_cert, station_key)
    card = keystore.card()  # selected, PIN verified
    key = keystore.new_key()
    csr = device_csr(device_id, key)
    payload = attestation_payload(csr, card.attest(), card.attestation_certificate())
    trust = keystore.trust_anchors_path
    refused = f"enroll smartcard device {device_id}"
    with est_session(est_url, context, refused=refused, trust=trust, timeout=timeout) as est:
        ca_certs = est.cacerts()
        cert = est.attested_enroll(PIV_ENROLL, payload)
    install_issued(keystore, key, cert, ca_certs, device_id=device_id)
    return cert
