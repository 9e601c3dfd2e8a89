"""The station's and the device's side of a TPM 2.0, over tpm2-pytss (tss2 ESAPI).

What fleetgate needs from a TPM: a P-256 signing key that cannot leave it (``fixedTPM``,
``fixedParent``, ``sensitiveDataOrigin``; no ``decrypt``), kept as a ``TSS2 PRIVATE KEY`` PEM that
tpm2-openssl loads; the EK certificate and the EK itself; a restricted signing attestation key
(AK); ``TPM2_ActivateCredential`` (proves the AK sits beside the EK) and ``TPM2_Certify`` of the
device key by the AK over the server's nonce.

Keys live outside the TPM as blobs wrapped by the storage primary (SRK), which is recreated from
its template on demand; it is the same ECC P-256 template tpm2-openssl and tpm2-pytss's
``tsskey`` use for parent ``0x40000001``, so the PEM written here loads there. A TPM has only
three transient object slots and, without a resource manager, a crashed client's objects stay
loaded: every object is flushed as soon as it is no longer needed (:meth:`Tpm.loaded`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from tpm2_pytss import ESAPI, TSS2_Exception  # type: ignore[import-untyped]
from tpm2_pytss.constants import (  # type: ignore[import-untyped]
    ESYS_TR,
    TPM2_ALG,
    TPM2_ECC,
    TPM2_RH,
    TPM2_SE,
    TPMA_OBJECT,
)
from tpm2_pytss.cryptography import tpm_ecc_private_key  # type: ignore[import-untyped]
from tpm2_pytss.tsskey import TSSPrivKey  # type: ignore[import-untyped]
from tpm2_pytss.types import (  # type: ignore[import-untyped]
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPMS_ECC_PARMS,
    TPMT_ECC_SCHEME,
    TPMT_KDF_SCHEME,
    TPMT_PUBLIC,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF,
    TPMT_SYM_DEF_OBJECT,
    TPMU_PUBLIC_PARMS,
    TPMU_SYM_KEY_BITS,
    TPMU_SYM_MODE,
)
from tpm2_pytss.utils import NVReadEK, create_ek_template  # type: ignore[import-untyped]

from device_sdk.errors import DeviceSdkError

__all__ = [
    "DEVICE_KEY_ATTRIBUTES",
    "EK_KINDS",
    "Certification",
    "Endorsement",
    "Tpm",
    "TpmError",
    "TpmKey",
    "TpmPrivateKey",
    "TpmUnavailable",
]

# The device key: made in this TPM, never duplicable, usable with an empty password, signing only.
DEVICE_KEY_ATTRIBUTES = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.SIGN_ENCRYPT
)
_AK_ATTRIBUTES = DEVICE_KEY_ATTRIBUTES | TPMA_OBJECT.RESTRICTED
_SRK_ATTRIBUTES = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.NODA
    | TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.DECRYPT
)
# EK certificates in the order tried: RSA-2048 (low range), ECC P-256 (low), ECC P-384 (H-3),
# then the high-range RSA-2048 (H-1) and P-256 (H-2) (TCG EK Credential Profile 2.0 2.2.1.5).
# swtpm 0.7 writes RSA-2048 and P-384 only; many real TPMs have RSA-2048 and P-256.
EK_KINDS = {
    "EK-RSA2048": 0x01C00002,
    "EK-ECC256": 0x01C0000A,
    "EK-HIGH-ECC384": 0x01C00016,
    "EK-HIGH-RSA2048": 0x01C00012,
    "EK-HIGH-ECC256": 0x01C00014,
}
# ActivateCredential's answers to a credential made for another EK or AK name (handle and
# parameter bits stripped): TPM_RC_INTEGRITY, TPM_RC_VALUE (an RSA secret that does not decrypt),
# and TPM_RC_FAILURE, which libtpms (swtpm) answers for that RSA case while staying usable.
_RC_NOT_FOR_US = {0x09F, 0x084, 0x101}


class TpmError(DeviceSdkError):
    """A TPM command failed; the message names the step and what the TPM said."""


class TpmUnavailable(TpmError):
    """The TPM, or the resource manager in front of it, cannot be reached."""


def _p256_template(attributes: int, *, sign_scheme: bool) -> Any:
    """An ECC P-256 public-area template (SHA-256 name); restricted keys fix ECDSA-SHA256."""
    scheme = TPMT_ECC_SCHEME(scheme=TPM2_ALG.ECDSA if sign_scheme else TPM2_ALG.NULL)
    if sign_scheme:
        scheme.details.anySig.hashAlg = TPM2_ALG.SHA256
    storage = bool(attributes & TPMA_OBJECT.DECRYPT)
    symmetric = (
        TPMT_SYM_DEF_OBJECT(
            algorithm=TPM2_ALG.AES,
            keyBits=TPMU_SYM_KEY_BITS(aes=128),
            mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB),
        )
        if storage
        else TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL)
    )
    return TPM2B_PUBLIC(
        publicArea=TPMT_PUBLIC(
            type=TPM2_ALG.ECC,
            nameAlg=TPM2_ALG.SHA256,
            objectAttributes=attributes,
            authPolicy=b"",
            parameters=TPMU_PUBLIC_PARMS(
                eccDetail=TPMS_ECC_PARMS(
                    symmetric=symmetric,
                    scheme=scheme,
                    curveID=TPM2_ECC.NIST_P256,
                    kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL),
                )
            ),
        )
    )


# The storage primary tpm2-openssl (and tpm2-pytss's tsskey) recreate for parent 0x40000001.
_SRK_TEMPLATE = _p256_template(_SRK_ATTRIBUTES, sign_scheme=False)
_DEVICE_KEY_TEMPLATE = _p256_template(DEVICE_KEY_ATTRIBUTES, sign_scheme=False)
_AK_TEMPLATE = _p256_template(_AK_ATTRIBUTES, sign_scheme=True)


@dataclass(frozen=True)
class TpmKey:
    """A key held outside the TPM: its SRK-wrapped private blob and its public area (marshalled).

    The private blob is useless without this TPM's storage hierarchy; it is stored 0600 anyway.
    """

    private: bytes  # marshalled TPM2B_PRIVATE
    public: bytes  # marshalled TPM2B_PUBLIC

    @classmethod
    def from_pem(cls, pem: bytes) -> TpmKey:
        """Read a ``TSS2 PRIVATE KEY`` PEM (parent must be the owner-hierarchy SRK)."""
        try:
            tss = TSSPrivKey.from_pem(pem)
        except (ValueError, TypeError) as exc:
            raise TpmError(f"not a TSS2 PRIVATE KEY PEM ({exc})") from exc
        if tss.parent != TPM2_RH.OWNER:
            raise TpmError(
                f"the TSS2 key's parent is 0x{int(tss.parent):08x}; fleetgate keys are made "
                "under the owner hierarchy's SRK (0x40000001)"
            )
        return cls(private=tss.private.marshal(), public=tss.public.marshal())

    def to_pem(self) -> bytes:
        """The ``TSS2 PRIVATE KEY`` PEM tpm2-openssl loads (empty auth, parent 0x40000001)."""
        tss = TSSPrivKey(self._private(), self.tpm2b_public(), True, TPM2_RH.OWNER)
        return cast(bytes, tss.to_pem())

    def tpm2b_public(self) -> Any:
        public, _ = TPM2B_PUBLIC.unmarshal(self.public)
        return public

    def _private(self) -> Any:
        private, _ = TPM2B_PRIVATE.unmarshal(self.private)
        return private

    @property
    def name(self) -> bytes:
        """The TPM name: nameAlg || H(public area). Certify attests exactly this."""
        return bytes(self.tpm2b_public().get_name())

    @property
    def attributes(self) -> int:
        return int(self.tpm2b_public().publicArea.objectAttributes)

    def public_key(self) -> ec.EllipticCurvePublicKey:
        key = serialization.load_pem_public_key(self.tpm2b_public().to_pem())
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise TpmError(f"the TPM key is {type(key).__name__}, not an ECC key")
        return key


@dataclass(frozen=True)
class Endorsement:
    """The TPM's EK certificate, where it was found, and the template that recreates the EK."""

    certificate: bytes  # DER
    nv_index: int
    kind: str  # a key of EK_KINDS
    template: bytes  # marshalled TPM2B_PUBLIC

    def x509(self) -> x509.Certificate:
        return x509.load_der_x509_certificate(self.certificate)


@dataclass(frozen=True)
class Certification:
    """``TPM2_Certify`` output: the signed TPMS_ATTEST bytes and the AK's TPMT_SIGNATURE."""

    info: bytes
    signature: bytes


class Tpm:
    """An ESAPI connection to one TPM (``tcti`` as in tpm2-tools: ``tabrmd:...``, ``swtpm:...``,
    ``device:/dev/tpmrm0``). Close it, or use it as a context manager."""

    def __init__(self, tcti: str) -> None:
        self.tcti = tcti
        try:
            self._ectx = ESAPI(tcti)  # a string: ESAPI also closes the TCTI it loads
        except TSS2_Exception as exc:
            raise TpmUnavailable(_unreachable(tcti, exc)) from exc

    def close(self) -> None:
        self._ectx.close()

    def __enter__(self) -> Tpm:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- keys -------------------------------------------------------------------------------

    def create_device_key(self) -> TpmKey:
        """A new P-256 signing key in this TPM (:data:`DEVICE_KEY_ATTRIBUTES`)."""
        return self._create(_DEVICE_KEY_TEMPLATE, "create the device key")

    def create_attestation_key(self) -> TpmKey:
        """A new restricted ECDSA-SHA256 signing key: it signs only TPM-made structures."""
        return self._create(_AK_TEMPLATE, "create the attestation key")

    @contextmanager
    def loaded(self, *keys: TpmKey) -> Iterator[list[Any]]:
        """Load ``keys`` (the SRK only while loading) and flush them all on exit."""
        handles: list[Any] = []
        try:
            with self._srk() as srk:
                for key in keys:
                    handles.append(
                        self._call(
                            "load a key",
                            self._ectx.load,
                            srk,
                            key._private(),
                            key.tpm2b_public(),
                        )
                    )
            yield handles
        finally:
            for handle in handles:
                self._ectx.flush_context(handle)

    def signer(self, handle: Any) -> ec.EllipticCurvePrivateKey:
        """A cryptography key object whose ``sign()`` runs on the loaded key (CSR signing)."""
        return cast(ec.EllipticCurvePrivateKey, tpm_ecc_private_key(self._ectx, handle))

    # -- endorsement and attestation --------------------------------------------------------

    def endorsement(self, kinds: Sequence[str] = tuple(EK_KINDS)) -> Endorsement:
        """The first EK certificate of ``kinds`` in NV (by default RSA-2048, else ECC P-256,
        else ECC P-384, which is what swtpm has besides RSA)."""
        read = NVReadEK(self._ectx)
        for kind in kinds:
            index = EK_KINDS[kind]
            try:
                cert, template = create_ek_template(kind, read)
            except ValueError:  # a high-range certificate that is absent
                continue
            except TSS2_Exception as exc:
                raise TpmError(
                    f"reading the EK certificate at 0x{index:08x} failed: {exc}"
                ) from exc
            if cert:
                return Endorsement(bytes(cert), index, kind, template.marshal())
        raise TpmError(
            "this TPM holds no EK certificate (NV 0x01c00002, 0x01c0000a, 0x01c00016, "
            "0x01c00012 or 0x01c00014): "
            "it cannot be attested; ask the TPM vendor for its EK certificate, or provision "
            "one in the factory (swtpm_setup --create-ek-cert for a virtual TPM)"
        )

    def activate_credential(
        self, ak: Any, endorsement: Endorsement, credential_blob: bytes, encrypted_secret: bytes
    ) -> bytes:
        """Recover the server's secret: the TPM releases it only to the EK beside the named AK."""
        template, _ = TPM2B_PUBLIC.unmarshal(endorsement.template)
        blob, _ = TPM2B_ID_OBJECT.unmarshal(credential_blob)
        secret, _ = TPM2B_ENCRYPTED_SECRET.unmarshal(encrypted_secret)
        ek, ek_public, _, _, _ = self._call(
            "recreate the EK",
            self._ectx.create_primary,
            TPM2B_SENSITIVE_CREATE(),
            template,
            ESYS_TR.ENDORSEMENT,
        )
        try:
            self._check_ek(ek_public, endorsement)
            # Low-range EKs have userWithAuth clear: only PolicySecret(endorsement) unlocks them.
            use_policy = not template.publicArea.objectAttributes & TPMA_OBJECT.USERWITHAUTH
            session = self._endorsement_policy_session() if use_policy else ESYS_TR.PASSWORD
            try:
                recovered = self._ectx.activate_credential(
                    ak, ek, blob, secret, session1=ESYS_TR.PASSWORD, session2=session
                )
            except TSS2_Exception as exc:
                if exc.error in _RC_NOT_FOR_US:
                    raise TpmError(
                        "ActivateCredential refused the challenge: it was not made for this "
                        "TPM's EK and this attestation key (the server wrapped it for another "
                        f"TPM, or it was altered on the way); TPM says: {exc}"
                    ) from exc
                raise TpmError(f"ActivateCredential failed: {exc}") from exc
            finally:
                if use_policy:
                    self._ectx.flush_context(session)
        finally:
            self._ectx.flush_context(ek)
        return bytes(recovered)

    def certify(self, key: Any, ak: Any, nonce: bytes) -> Certification:
        """``TPM2_Certify``: the AK signs the key's name and attributes with ``nonce`` inside."""
        scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.ECDSA)
        scheme.details.any.hashAlg = TPM2_ALG.SHA256
        attest, signature = self._call(
            "certify the device key", self._ectx.certify, key, ak, nonce, scheme
        )
        return Certification(info=bytes(attest), signature=signature.marshal())

    # -- internals --------------------------------------------------------------------------

    def _create(self, template: Any, what: str) -> TpmKey:
        with self._srk() as srk:
            private, public, _, _, _ = self._call(
                what, self._ectx.create, srk, TPM2B_SENSITIVE_CREATE(), template
            )
        return TpmKey(private=private.marshal(), public=public.marshal())

    @contextmanager
    def _srk(self) -> Iterator[Any]:
        srk, _, _, _, _ = self._call(
            "create the storage primary key",
            self._ectx.create_primary,
            TPM2B_SENSITIVE_CREATE(),
            _SRK_TEMPLATE,
            ESYS_TR.OWNER,
        )
        try:
            yield srk
        finally:
            self._ectx.flush_context(srk)

    def _endorsement_policy_session(self) -> Any:
        session = self._ectx.start_auth_session(
            ESYS_TR.NONE,
            ESYS_TR.NONE,
            TPM2_SE.POLICY,
            TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
            TPM2_ALG.SHA256,
        )
        try:
            self._ectx.policy_secret(ESYS_TR.ENDORSEMENT, session)
        except TSS2_Exception as exc:
            self._ectx.flush_context(session)
            raise TpmError(
                f"PolicySecret(endorsement) failed ({exc}): the endorsement hierarchy needs a "
                "password on this TPM, which fleetgate does not use"
            ) from exc
        return session

    @staticmethod
    def _check_ek(ek_public: Any, endorsement: Endorsement) -> None:
        made = serialization.load_pem_public_key(ek_public.to_pem())
        certified = endorsement.x509().public_key()
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        if made.public_bytes(der, spki) != certified.public_bytes(der, spki):
            raise TpmError(
                f"the EK recreated from the {endorsement.kind} template is not the key in the "
                f"EK certificate (NV 0x{endorsement.nv_index:08x}): the TPM's EK template "
                "differs from the TCG default"
            )

    def _call(self, what: str, command: Any, *args: Any) -> Any:
        try:
            return command(*args)
        except TSS2_Exception as exc:
            if _is_transport_failure(exc):
                raise TpmUnavailable(
                    f"the TPM stopped answering while trying to {what}: "
                    + _unreachable(self.tcti, exc)
                ) from exc
            raise TpmError(f"the TPM could not {what}: {exc}") from exc


class TpmPrivateKey(ec.EllipticCurvePrivateKey):
    """A :class:`TpmKey` as a cryptography private key: each ``sign()`` opens the TPM, loads the
    key, signs and flushes. For CSRs (a few signatures); TLS signs through tpm2-openssl instead.
    The private half never exists outside the TPM, so it cannot be serialised or exchanged."""

    def __init__(self, key: TpmKey, tcti: str) -> None:
        self.tpm_key = key
        self.tcti = tcti

    def sign(
        self,
        data: bytes | bytearray | memoryview,
        signature_algorithm: ec.EllipticCurveSignatureAlgorithm,
    ) -> bytes:
        with Tpm(self.tcti) as tpm, tpm.loaded(self.tpm_key) as (handle,):
            return tpm.signer(handle).sign(data, signature_algorithm)

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self.tpm_key.public_key()

    @property
    def curve(self) -> ec.EllipticCurve:
        return ec.SECP256R1()

    @property
    def key_size(self) -> int:
        return 256

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        raise TpmError("fleetgate TPM device keys sign only (no decrypt attribute): no ECDH")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        raise TpmError("the private half of a TPM key never leaves the TPM")

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> bytes:
        raise TpmError(
            "the private half of a TPM key never leaves the TPM; store TpmKey.to_pem() instead"
        )

    def __copy__(self) -> TpmPrivateKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> TpmPrivateKey:
        return self


def _is_transport_failure(exc: Any) -> bool:
    """tcti-layer errors (layer 10) mean the TPM or the resource manager went away."""
    return (int(exc.rc) >> 16) & 0xFF == 10


def _unreachable(tcti: str, exc: Any) -> str:
    kind, _, conf = tcti.partition(":")
    if kind == "tabrmd":
        bus = os.environ.get("DBUS_SESSION_BUS_ADDRESS")
        where = f"session bus {bus}" if "bus_type=session" in conf and bus else "its D-Bus bus"
        return (
            f"the TPM resource manager is not reachable ({tcti!r} on {where}: {exc}): start "
            "tpm2-abrmd (`systemctl start tpm2-abrmd`; for a virtual TPM `tpm2-abrmd --session "
            "--tcti=swtpm:host=127.0.0.1,port=<port>` with the bus name from the TCTI string), "
            "or use the kernel's resource manager with tcti 'device:/dev/tpmrm0'"
        )
    if kind in ("swtpm", "mssim"):
        return (
            f"nothing answers as a TPM at {conf or 'the default port'} ({exc}): is swtpm running?"
        )
    if kind == "device":
        return (
            f"cannot open the TPM device {conf or '/dev/tpm0'} ({exc}): check the TPM is enabled, "
            "the tpm_tis/tpm_crb kernel module is loaded, and this user may open it (group tss)"
        )
    return f"cannot open the TCTI {tcti!r}: {exc}"
