"""Attested enrollment of a TPM-held device key over fleetgate's EST extension.

Two round trips (``docs/architecture.md``, "TPM attestation"): the station (or, for a key
rotation, the device itself) sends the EK certificate and a fresh attestation key (AK) to
``fleetgate/tpm/challenge``; the server answers a nonce and a secret wrapped to the EK for the
AK's name. The TPM unwraps the secret (ActivateCredential) and certifies the new device key with
the AK over the nonce (Certify); ``fleetgate/tpm/enroll`` gets the secret, the Certify
statement, the key's public area and the CSR signed in the TPM, and answers the certificate.
The key store switches to key and certificate only then, as in :mod:`device_sdk.provisioning`.
"""

from __future__ import annotations

import base64
import binascii
import ssl
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from device_sdk.errors import EnrollmentError
from device_sdk.est import EstClient, EstError, device_csr
from device_sdk.keystore import device_id_of
from device_sdk.provisioning import _issuers
from device_sdk.tls import trusting_context
from device_sdk.tpm import Tpm, TpmPrivateKey

if TYPE_CHECKING:
    from device_sdk.tpm_keystore import TpmKeyStore

__all__ = ["CHALLENGE", "ENROLL", "enroll_tpm", "rotate_tpm_key"]

CHALLENGE = "fleetgate/tpm/challenge"
ENROLL = "fleetgate/tpm/enroll"


def enroll_tpm(
    keystore: TpmKeyStore,
    device_id: str,
    *,
    est_url: str,
    station_cert: Path,
    station_key: Path,
    ek_chain: Sequence[x509.Certificate] = (),
    timeout: float = 30.0,
    timings: dict[str, float] | None = None,
) -> x509.Certificate:
    """First certificate for a new key in the device's TPM, attested, as station ``station_cert``.

    ``ek_chain``: the certificates between the EK certificate and the manufacturer's root, if
    the service's trust store holds only the root; kept in the store for later key rotations.
    ``timings``, if given, receives the seconds spent in each step (for ``bench-attest``).
    """
    context = trusting_context(keystore)
    try:
        context.load_cert_chain(station_cert, station_key)
    except (OSError, ssl.SSLError) as exc:
        raise EnrollmentError(
            f"cannot load the station credentials {station_cert} / {station_key}: {exc}"
        ) from exc
    cert = _attested_enroll(keystore, device_id, est_url, context, ek_chain, timeout, timings)
    keystore.set_ek_chain(ek_chain)
    return cert


def rotate_tpm_key(
    keystore: TpmKeyStore, device_id: str, *, est_url: str, timeout: float = 30.0
) -> x509.Certificate:
    """A new TPM key, attested again, authenticated by the device's current certificate."""
    context = trusting_context(keystore)
    keystore.load_identity(context)
    return _attested_enroll(
        keystore, device_id, est_url, context, keystore.ek_chain(), timeout, None
    )


def _attested_enroll(
    keystore: TpmKeyStore,
    device_id: str,
    est_url: str,
    context: ssl.SSLContext,
    ek_chain: Sequence[x509.Certificate],
    timeout: float,
    timings: dict[str, float] | None,
) -> x509.Certificate:
    steps = timings if timings is not None else {}
    with Tpm(keystore.tcti) as tpm, _est(est_url, context, device_id, timeout) as est:
        with _timed(steps, "keygen"):
            endorsement = tpm.endorsement()
            key = tpm.create_device_key()
            ak = tpm.create_attestation_key()
        with _timed(steps, "challenge"):
            ca_certs = est.cacerts()
            challenge = est.attestation_json(
                CHALLENGE,
                {
                    "device_id": device_id,
                    "ek_certificate": _b64(endorsement.certificate),
                    "ek_chain": [_b64(c.public_bytes(Encoding.DER)) for c in ek_chain],
                    "ak_public": _b64(ak.public),
                },
            )
        with tpm.loaded(ak, key) as (ak_handle, key_handle):
            with _timed(steps, "activation"):
                secret = tpm.activate_credential(
                    ak_handle,
                    endorsement,
                    _field(challenge, "credential_blob"),
                    _field(challenge, "encrypted_secret"),
                )
            with _timed(steps, "certify"):
                certification = tpm.certify(key_handle, ak_handle, _field(challenge, "nonce"))
            with _timed(steps, "csr"):
                csr = device_csr(device_id, tpm.signer(key_handle))
        with _timed(steps, "issue"):
            cert = est.attested_enroll(
                ENROLL,
                {
                    "challenge_id": challenge.get("challenge_id"),
                    "activated_secret": _b64(secret),
                    "csr": _b64(csr.public_bytes(Encoding.DER)),
                    "key_public": _b64(key.public),
                    "certify_info": _b64(certification.info),
                    "certify_signature": _b64(certification.signature),
                },
            )
    issued_for = device_id_of(cert)
    if issued_for != device_id:
        raise EnrollmentError(
            f"the EST server issued a certificate for {issued_for}, not {device_id}; "
            "nothing was installed"
        )
    keystore.install(TpmPrivateKey(key, keystore.tcti), [cert, *_issuers(cert, ca_certs)])
    return cert


@contextmanager
def _est(
    est_url: str, context: ssl.SSLContext, device_id: str, timeout: float
) -> Iterator[EstClient]:
    """An EST connection whose failures become :class:`EnrollmentError` with the server's reason."""
    try:
        with EstClient(est_url, context, timeout=timeout) as est:
            yield est
    except EstError as exc:
        raise EnrollmentError(
            f"the EST server at {est_url} refused the attested enrollment of {device_id}: "
            f"{exc.message}"
        ) from exc
    except ssl.SSLCertVerificationError as exc:
        raise EnrollmentError(
            f"the EST server at {est_url} did not verify against the key store's trust anchors "
            f"({exc.verify_message})"
        ) from exc
    except ssl.SSLError as exc:
        raise EnrollmentError(
            f"TLS with the EST server at {est_url} failed ({exc.reason or exc}): the server did "
            "not accept the station's (or, for a rotation, the device's) certificate"
        ) from exc
    except OSError as exc:
        raise EnrollmentError(f"cannot reach the EST server at {est_url}: {exc}") from exc


@contextmanager
def _timed(timings: dict[str, float], step: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[step] = timings.get(step, 0.0) + time.perf_counter() - start


def _field(answer: dict[str, Any], name: str) -> bytes:
    value = answer.get(name)
    try:
        if not isinstance(value, str):
            raise ValueError(f"it is {type(value).__name__}")
        return base64.b64decode(value, validate=True)
    except (ValueError, binascii.Error) as exc:
        raise EnrollmentError(
            f"the challenge's {name!r} is not standard base64 ({exc}): is the EST server a "
            "fleetgate enrollment service with TPM attestation?"
        ) from exc


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
