"""The enrollment service: who may get which certificate, and the registry changes that follow.

Transport-free: the EST endpoint and the CLI both call in here with already-authenticated
peers and raw request bodies. Every refusal is audited (in its own transaction, after the failed
one rolled back) and re-raised as a typed error; every success is audited in the same transaction
as the change it describes.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import hashlib
import hmac
import secrets
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypedDict

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from enrollment import ocsp, profiles
from enrollment.attestation import AttestedKey, KeyProtection
from enrollment.attestation.messages import (
    PivEnrollRequest,
    TpmChallengeRequest,
    TpmEnrollRequest,
)
from enrollment.attestation.trust import CrlPolicy, load_crls, load_trust_store
from enrollment.authorities import IssuingCAs, load_issuing_cas
from enrollment.ca import CertificateAuthority, ca_paths
from enrollment.crl import RevokedEntry, build_crl, parse_reason
from enrollment.csr import CheckedCSR, check_device_csr, decode_est_body
from enrollment.identity import PeerIdentity, named_identity
from enrollment.policy import check_protection
from enrollment.registry import (
    AuditRecord,
    CertStatus,
    Device,
    DeviceState,
    Registry,
    SubjectKind,
)
from enrollment.registry.authorities import CUT_OFF_REASON
from enrollment.registry.devices import Issuance
from enrollment.registry.models import AttestationChallenge, as_utc
from enrollment.registry.store import DEVICE_ACTIONS
from fleetgate import jsonlog
from fleetgate.errors import (
    AttestationRefused,
    FleetgateError,
    KeyProtectionRequired,
    NotAuthorised,
)
from fleetgate.ids import device_uri, station_uri, validate_id
from fleetgate.keyfiles import write_atomic

# What a refused client should do next, by the kind of credential and its status.
_CREDENTIAL_HINTS = {
    (SubjectKind.STATION, CertStatus.REVOKED): "ask an operator for a new station certificate",
    (SubjectKind.STATION, CertStatus.SUPERSEDED): "use the station's newest certificate",
    (SubjectKind.STATION, CertStatus.ON_HOLD): "ask an operator to reinstate the station",
    (SubjectKind.DEVICE, CertStatus.REVOKED): "revocation is final: provision a new device id",
    (SubjectKind.DEVICE, CertStatus.SUPERSEDED): "renew with the device's newest certificate",
    (
        SubjectKind.DEVICE,
        CertStatus.ON_HOLD,
    ): "the device is suspended until an operator reinstates it",
}


class StageTimer:
    """Wall-clock seconds spent per stage; the enrollment benchmark reports the split.

    Stages run on several threads at once (the EST server's pool), hence the lock: ``+=`` on a
    dict entry is a read and a write that another thread can come between.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            with self._lock:
                self.seconds[name] += elapsed


@dataclass(frozen=True)
class PendingEnrollment:
    """A simpleenroll checked and signed, not yet committed: the registry's :class:`Issuance`,
    and who is refused (audited) if the commit finds the device enrolled meanwhile."""

    issuance: Issuance
    refusable: Refusable
    request_id: str | None


@dataclass
class Refusable:
    """Who a request acts as and on which device, as far as it has been verified so far: what
    :meth:`EnrollmentService.audited` records if the request is refused."""

    actor: str = "anonymous"
    subject: str | None = None

    def about(self, subject: str | None) -> None:
        """The request is about device ``subject``: its refusal, and the log lines, say so."""
        self.subject = subject
        jsonlog.device_id.set(subject)


class EnrollmentService:
    """Issues, renews and revokes certificates against the registry."""

    def __init__(
        self,
        ca: CertificateAuthority,
        registry: Registry,
        *,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.ca = ca
        self.registry = registry
        self.config = ca.config
        self.clock = clock
        self.timer = StageTimer()
        self.ocsp_cache = ocsp.ResponseCache()  # responses without a nonce, re-signed at half-life
        self.cas = IssuingCAs(
            ca, (ca.issuer,), {"": ca.issuer}, (ca.anchors.issuing, ca.anchors.root)
        )
        self._unlocked: dict[str, profiles.Issuer] = {ocsp.key_id(ca.anchors.issuing): ca.issuer}
        self._authority_rows: object = None
        self.refresh_authorities()

    def refresh_authorities(self) -> bool:
        """Follow the registry's CA rows (a rotation by ``fleetgate ca rotate``): sign with the
        active issuing CA from now on; True when anything changed."""
        records = self.registry.authorities()
        seen = [(r.key_id, r.role, r.state) for r in records]
        if seen == self._authority_rows or not records:
            return False
        self.cas = load_issuing_cas(self.config, records, self._unlocked)
        self.ca = self.cas.signer
        self._authority_rows = seen
        return True

    # -- EST operations ----------------------------------------------------------------------

    def enroll(
        self, station_cert: x509.Certificate | None, body: bytes, *, request_id: str | None = None
    ) -> x509.Certificate:
        """simpleenroll: a station asks for a device's first certificate."""
        pending = self.prepare_enroll(station_cert, body, request_id=request_id)
        (outcome,) = self.commit_enrollments([pending])
        if isinstance(outcome, FleetgateError):
            raise outcome
        return outcome

    def prepare_enroll(
        self, station_cert: x509.Certificate | None, body: bytes, *, request_id: str | None = None
    ) -> PendingEnrollment:
        """simpleenroll up to its commit: every check, and the signature. Nothing is handed out
        before :meth:`commit_enrollments` has committed it."""
        with self.audited("enroll", request_id) as refusable:
            peer = self._identify(station_cert, expected_kind="station")
            refusable.actor = peer.actor  # refusals below are audited under the verified identity
            station = self._known_subject(peer, expected_kind="station")
            with self.timer.stage("csr"):
                checked = check_device_csr(decode_est_body(body))
            refusable.about(checked.device_id)
            with self.timer.stage("db"):
                target = self.registry.check_may_enroll(station.id, checked.device_id)
            check_protection(
                device_id=checked.device_id,
                group=target.group,
                required=target.required_protection,
                proven=KeyProtection.SOFTWARE,
            )
            signer = self.ca  # a rotation may swap self.ca meanwhile
            with self.timer.stage("sign"):
                cert = self._issue_device(checked.device_id, checked.public_key, signer=signer)
            audit = AuditRecord(
                peer.actor,
                "enroll",
                "ok",
                checked.device_id,
                f"serial {cert.serial_number:x}",
                request_id,
            )
            issuance = Issuance(
                station.id,
                checked.device_id,
                cert,
                audit,
                issuer_key_id=_key_id(signer.anchors.issuing),  # not re-parsed from cert
            )
            return PendingEnrollment(issuance, refusable, request_id)

    def commit_enrollments(
        self, pending: Sequence[PendingEnrollment]
    ) -> list[x509.Certificate | FleetgateError]:
        """Commit prepared enrollments in one transaction (group commit): per enrollment its
        certificate, or its refusal (audited) if it lost a race meanwhile. A failure of the
        transaction itself is raised: then none of them is committed."""
        with self.timer.stage("db"):
            refusals = self.registry.record_enrollments([p.issuance for p in pending])
        outcomes: list[x509.Certificate | FleetgateError] = []
        for item, refusal in zip(pending, refusals, strict=True):
            if refusal is None:
                outcomes.append(item.issuance.cert)
                continue
            self._audit_refusal("enroll", item.refusable, refusal, item.request_id)
            outcomes.append(refusal)
        return outcomes

    def reenroll(
        self, device_cert: x509.Certificate | None, body: bytes, *, request_id: str | None = None
    ) -> x509.Certificate:
        """simplereenroll: a device renews with its current certificate; a new key is allowed."""
        with self.audited("reenroll", request_id) as refusable:
            peer = self._identify(device_cert, expected_kind="device")
            refusable.actor = peer.actor  # refusals below are audited under the verified identity
            if peer.kind == "station":
                return self._renew_station(peer, body, request_id)
            refusable.about(peer.id)
            device = self._known_subject(peer, expected_kind="device")
            checked = check_device_csr(decode_est_body(body))
            if checked.device_id != device.id:
                raise NotAuthorised(
                    f"device {device.id} may renew only its own certificate, "
                    f"not one for {checked.device_id}"
                )
            assert device_cert is not None  # _identify refused a missing certificate
            protection = self._renewal_protection(device.id, device_cert, checked)
            cert = self._issue_device(device.id, checked.public_key, protection)
            audit = AuditRecord(
                peer.actor,
                "reenroll",
                "ok",
                device.id,
                f"serial {cert.serial_number:x}",
                request_id,
            )
            self.registry.record_reenrollment(device.id, device.serial, cert, audit)
            return cert

    def _renewal_protection(
        self, device_id: str, current: x509.Certificate, checked: CheckedCSR
    ) -> KeyProtection:
        """The protection a plain renewal keeps: a hardware key's only if the key is unchanged.

        A new key arrives without evidence, so a hardware-protected device must rotate its key
        through attested enrollment instead; and the group's requirement must still hold.
        """
        key = self.registry.device_key(device_id)
        protection = KeyProtection(key.key_protection)
        if protection != KeyProtection.SOFTWARE and checked.public_key != current.public_key():
            raise KeyProtectionRequired(
                f"device {device_id}'s key is {protection}-protected; a renewal with a new key "
                "must prove where the new key lives: rotate it with attested enrollment "
                "(or renew with the current key)"
            )
        check_protection(
            device_id=device_id,
            group=key.group,
            required=key.required_protection,
            proven=protection,
        )
        return protection

    # -- attested enrollment (TPM, smartcard) ------------------------------------------------

    def tpm_challenge(
        self, client_cert: x509.Certificate | None, body: bytes, *, request_id: str | None = None
    ) -> dict[str, str]:
        """Step 1 of TPM enrollment: check the EK and AK, and challenge the TPM to prove both.

        The answer carries a nonce for TPM2_Certify and a secret wrapped to the EK for the AK's
        name (MakeCredential): only the TPM holding both can unwrap it.
        """
        from enrollment.attestation import tpm  # tpm2-pytss is needed only on this path

        with self.audited("tpm.challenge", request_id) as refusable:
            peer = self._identify(client_cert, expected_kind="station or device")
            refusable.actor = peer.actor
            request = TpmChallengeRequest.parse(body)
            subject = validate_id(request.device_id)
            refusable.about(subject)
            group, required, binding = self._attesting_target(peer, subject)
            check_protection(
                device_id=subject, group=group, required=required, proven=KeyProtection.TPM
            )
            now = self.clock()
            challenge = tpm.make_challenge(
                ek_certificate=request.ek_certificate,
                ek_chain=request.ek_chain,
                ak_public=request.ak_public,
                now=now,
                **self._trust(self.config.attestation.tpm_manufacturer_cas),
            )
            _check_binding(subject, binding, challenge.ek_fingerprint, "TPM's EK")
            challenge_id = secrets.token_urlsafe(18)
            expires_at = now + dt.timedelta(seconds=self.config.attestation.challenge_ttl_s)
            self.registry.add_challenge(
                AttestationChallenge(
                    id=challenge_id,
                    actor=peer.actor,
                    device_id=subject,
                    ak_public=base64.b64encode(request.ak_public).decode(),
                    nonce=challenge.nonce.hex(),
                    secret_sha256=hashlib.sha256(challenge.secret).hexdigest(),
                    ek_fingerprint=challenge.ek_fingerprint,
                    ek_summary=challenge.ek_summary,
                    expires_at=expires_at,
                ),
                AuditRecord(
                    peer.actor,
                    "tpm.challenge",
                    "ok",
                    subject,
                    f"challenge {challenge_id}; {challenge.ek_summary}; {challenge.revocation}",
                    request_id,
                ),
            )
            return {
                "challenge_id": challenge_id,
                "nonce": _b64(challenge.nonce),
                "credential_blob": _b64(challenge.credential_blob),
                "encrypted_secret": _b64(challenge.encrypted_secret),
                "expires_at": expires_at.isoformat(),
            }

    def enroll_tpm(
        self, client_cert: x509.Certificate | None, body: bytes, *, request_id: str | None = None
    ) -> x509.Certificate:
        """Step 2 of TPM enrollment: check the answer to the challenge, then issue."""
        from enrollment.attestation import tpm

        with self.audited("tpm.enroll", request_id) as refusable:
            peer = self._identify(client_cert, expected_kind="station or device")
            refusable.actor = peer.actor
            request = TpmEnrollRequest.parse(body)
            challenge = self.registry.consume_challenge(
                request.challenge_id, actor=peer.actor, now=self.clock()
            )
            subject = challenge.device_id
            refusable.about(subject)
            answer = hashlib.sha256(request.activated_secret).hexdigest()
            if not hmac.compare_digest(answer, challenge.secret_sha256):
                raise AttestationRefused(
                    "the activated credential secret is wrong: the attestation key is not in "
                    "the TPM whose EK certificate was presented"
                )
            checked = self._csr_for(subject, request.csr)
            tpm.verify_certify(
                ak_public=base64.b64decode(challenge.ak_public),
                nonce=bytes.fromhex(challenge.nonce),
                key_public=request.key_public,
                certify_info=request.certify_info,
                certify_signature=request.certify_signature,
                csr_key=checked.public_key,
            )
            attested = AttestedKey(
                KeyProtection.TPM,
                checked.public_key,
                challenge.ek_fingerprint,
                challenge.ek_summary,
            )
            return self._issue_attested(peer, subject, attested, "tpm.enroll", request_id)

    def enroll_piv(
        self, client_cert: x509.Certificate | None, body: bytes, *, request_id: str | None = None
    ) -> x509.Certificate:
        """Smartcard enrollment: the card's attestation must vouch for the CSR's key."""
        from enrollment.attestation.piv import verify_piv_attestation

        with self.audited("piv.enroll", request_id) as refusable:
            peer = self._identify(client_cert, expected_kind="station or device")
            refusable.actor = peer.actor
            request = PivEnrollRequest.parse(body)
            checked = check_device_csr(request.csr)
            subject = checked.device_id
            refusable.about(subject)
            attested = verify_piv_attestation(
                attestation_certificate=request.attestation_certificate,
                attestation_intermediate=request.attestation_intermediate,
                csr_key=checked.public_key,
                now=self.clock(),
                **self._trust(self.config.attestation.card_manufacturer_cas),
            )
            return self._issue_attested(peer, subject, attested, "piv.enroll", request_id)

    def _attesting_target(self, peer: PeerIdentity, device_id: str) -> tuple[str, str, str | None]:
        """(group, required protection, hardware binding) if ``peer`` may attest ``device_id``.

        A station enrolls a pending device of its batches; a device rotates only its own key.
        """
        if peer.kind == "station":
            station = self._known_subject(peer, expected_kind="station")
            target = self.registry.check_may_enroll(station.id, device_id)
            return target.group, target.required_protection, target.hardware_binding
        device = self._known_subject(peer, expected_kind="device")
        if device.id != device_id:
            raise NotAuthorised(
                f"device {device.id} may rotate only its own key, not {device_id}'s"
            )
        key = self.registry.device_key(device_id)
        return key.group, key.required_protection, key.hardware_binding

    def _issue_attested(
        self,
        peer: PeerIdentity,
        device_id: str,
        attested: AttestedKey,
        action: str,
        request_id: str | None,
    ) -> x509.Certificate:
        """Policy, binding, signature and registry update for verified hardware evidence."""
        group, required, binding = self._attesting_target(peer, device_id)
        check_protection(
            device_id=device_id, group=group, required=required, proven=attested.protection
        )
        _check_binding(device_id, binding, attested.binding, f"{attested.protection}'s root key")
        cert = self._issue_device(device_id, attested.public_key, attested.protection)
        audit = AuditRecord(
            peer.actor,
            action,
            "ok",
            device_id,
            "; ".join(
                filter(
                    None, [f"serial {cert.serial_number:x}", attested.summary, attested.revocation]
                )
            ),
            request_id,
        )
        if peer.kind == "station":
            self.registry.record_enrollment(peer.id, device_id, cert, audit, attested)
        else:
            self.registry.record_reenrollment(device_id, peer.serial, cert, audit, attested)
        return cert

    def _csr_for(self, device_id: str, der: bytes) -> CheckedCSR:
        checked = check_device_csr(der)
        if checked.device_id != device_id:
            raise NotAuthorised(
                f"the CSR names device {checked.device_id}, but the challenge was for {device_id}"
            )
        return checked

    def _trust(self, setting: str) -> _Trust:
        """A manufacturer trust store as the verifiers take it: CAs, CRLs and the CRL policy
        (read at each request, so a CRL the operator refreshes counts at once)."""
        directory = self.config.data_path(setting)
        return _Trust(
            anchors=load_trust_store(directory),
            crls=load_crls(directory),
            crl_policy=CrlPolicy(self.config.attestation.hardware_crl),
        )

    def _identify(self, cert: x509.Certificate | None, *, expected_kind: str) -> PeerIdentity:
        """Who the TLS-verified client certificate names; not yet whether it may act."""
        if cert is None:
            raise NotAuthorised(
                f"this request needs a {expected_kind} client certificate (mutual TLS)"
            )
        peer = _named_identity(cert)  # a station's certificate is parsed once, not per request
        peer.check_validity(self.clock())
        return peer

    def _known_subject(self, peer: PeerIdentity, *, expected_kind: str) -> PeerIdentity:
        """``peer`` if it is of ``expected_kind`` and its certificate is active in the registry."""
        if peer.kind != expected_kind:
            raise NotAuthorised(
                f"a {peer.kind} certificate ({peer.id}) cannot be used here; "
                f"this request needs a {expected_kind} certificate"
            )
        kind = SubjectKind.STATION if expected_kind == "station" else SubjectKind.DEVICE
        record = self.registry.credential(kind, peer.id, peer.serial)
        if record is None:
            raise NotAuthorised(f"{peer.actor}: certificate {peer.serial:x} is not in the registry")
        if record.status != CertStatus.ACTIVE:
            when = f" on {record.revoked_at:%Y-%m-%d %H:%M}Z" if record.revoked_at else ""
            reason = f" ({record.reason}{when})" if record.reason else ""
            hint = _CREDENTIAL_HINTS[(kind, record.status)]
            if record.reason == CUT_OFF_REASON:
                hint = "its issuing CA was retired before it renewed: provision it again"
            raise NotAuthorised(
                f"{peer.actor}: certificate {peer.serial:x} is {record.status}{reason}; " + hint
            )
        if not record.holder_active:
            raise NotAuthorised(f"{peer.actor} is not active in the registry")
        return peer

    def _issue_device(
        self,
        device_id: str,
        key: ec.EllipticCurvePublicKey,
        protection: KeyProtection = KeyProtection.SOFTWARE,
        *,
        signer: CertificateAuthority | None = None,
    ) -> x509.Certificate:
        subject = profiles.Subject(common_name=device_id, uris=(device_uri(device_id),))
        validity = dt.timedelta(days=self.config.ca.device_validity_days)
        policy = profiles.KEY_PROTECTION_POLICIES.get(protection)
        return (signer or self.ca).issue(
            profiles.DEVICE,
            subject,
            key,
            validity,
            now=self.clock(),
            policies=(policy,) if policy is not None else (),
        )

    @contextmanager
    def audited(
        self,
        action: str,
        request_id: str | None = None,
        *,
        actor: str = "anonymous",
        subject: str | None = None,
    ) -> Iterator[Refusable]:
        """Audit a refusal (a :class:`FleetgateError`) of ``action`` and re-raise it.

        The block fills in the :class:`Refusable` as it verifies who acts on what. The entry is
        written in its own transaction: the refused one has rolled back by the time it arrives.
        """
        refusable = Refusable(actor, subject)
        try:
            yield refusable
        except FleetgateError as exc:
            self._audit_refusal(action, refusable, exc, request_id)
            raise

    def _audit_refusal(
        self, action: str, refusable: Refusable, exc: FleetgateError, request_id: str | None
    ) -> None:
        reason = f"{exc.code}: {exc.message}"
        record = AuditRecord(
            refusable.actor, action, "refused", refusable.subject, reason, request_id
        )
        self.registry.audit(record)
        exc.audited = True

    # -- administration --------------------------------------------------------------------

    def add_station(self, station_id: str, csr_der: bytes, *, actor: str) -> x509.Certificate:
        """A station's first certificate, for the CSR of a key the station made itself."""
        validate_id(station_id, kind="station")
        cert = self._issue_station(station_id, _station_csr(station_id, csr_der))
        self.registry.add_station(station_id, cert, actor)
        return cert

    def invite_station(self, station_id: str, *, actor: str, ttl: dt.timedelta) -> str:
        """A one-time code with which the station enrolls its own key over EST (within
        ``ttl``); only its hash is stored, and the code is shown once, to the caller."""
        validate_id(station_id, kind="station")
        code = secrets.token_urlsafe(16)  # 128 bits
        self.registry.invite_station(station_id, _code_hash(code), self.clock() + ttl, actor)
        return code

    def enroll_station(
        self, station_id: str, code: str, body: bytes, *, request_id: str | None = None
    ) -> x509.Certificate:
        """EST ``/station/simpleenroll``: a station redeems its bootstrap code (HTTP Basic: its
        id and the code) for a certificate of the key in its CSR."""
        try:  # the name is the client's: audited only once it is a valid id
            actor = f"bootstrap:{validate_id(station_id, kind='station')}"
        except FleetgateError:
            actor = "bootstrap:(invalid station id)"
        with self.audited("station.enroll", request_id, actor=actor):
            validate_id(station_id, kind="station")
            digest, now = _code_hash(code), self.clock()
            self.registry.check_station_code(station_id, digest, now)
            cert = self._issue_station(station_id, _station_csr(station_id, decode_est_body(body)))
            audit = AuditRecord(
                actor,
                "station.enroll",
                "ok",
                station_id,
                f"serial {cert.serial_number:x}; bootstrap code redeemed",
                request_id,
            )
            self.registry.redeem_station_code(station_id, digest, now, cert, audit)
            return cert

    def _renew_station(
        self, peer: PeerIdentity, body: bytes, request_id: str | None
    ) -> x509.Certificate:
        """simplereenroll with a station certificate: the station renews itself (new key
        allowed); its certificates are short-lived, so it does so often."""
        self._known_subject(peer, expected_kind="station")
        cert = self._issue_station(peer.id, _station_csr(peer.id, decode_est_body(body)))
        serial = f"serial {cert.serial_number:x}"
        audit = AuditRecord(peer.actor, "station.reenroll", "ok", peer.id, serial, request_id)
        self.registry.record_station_renewal(peer.id, peer.serial, cert, audit)
        return cert

    def _issue_station(self, station_id: str, key: ec.EllipticCurvePublicKey) -> x509.Certificate:
        return self.ca.issue(
            profiles.STATION,
            profiles.Subject(common_name=station_id, uris=(station_uri(station_id),)),
            key,
            dt.timedelta(days=self.config.ca.station_validity_days),
            now=self.clock(),
        )

    def revoke_station(
        self, station_id: str, *, reason: str, actor: str
    ) -> x509.CertificateRevocationList:
        parse_reason(reason)
        self.registry.revoke_station(station_id, reason, actor)
        return self.publish_crl()

    def change_device(
        self, device_id: str, target: DeviceState, *, reason: str, actor: str
    ) -> tuple[Device, x509.CertificateRevocationList]:
        """Suspend, reinstate or revoke a device and publish the CRL that reflects it."""
        if target == DeviceState.REVOKED:
            parse_reason(reason)
        with self.audited(DEVICE_ACTIONS[target], actor=actor, subject=device_id):
            device = self.registry.change_device_state(
                device_id, target, reason=reason, actor=actor
            )
        return device, self.publish_crl()

    def ocsp_response(self, request_der: bytes) -> bytes:
        """Answer an OCSP request from the registry as it is now: revocation shows at once (a
        cached response is reused only while the registry still states its status)."""
        return ocsp.respond(
            request_der,
            issuers=self.cas.issuers,
            lookup=self._certificate_status,
            now=self.clock(),
            validity=dt.timedelta(minutes=self.config.ca.ocsp_validity_minutes),
            cache=self.ocsp_cache,
        )

    def _certificate_status(self, serial: int) -> ocsp.CertificateStatus | None:
        record = self.registry.certificate(serial)
        if record is None:
            return None
        if record.status != CertStatus.ACTIVE:  # revoked, on hold, or superseded by renewal
            return ocsp.CertificateStatus(
                revoked=True,
                revoked_at=as_utc(record.revoked_at) if record.revoked_at else None,
                reason=parse_reason(record.revocation_reason or "unspecified"),
                issuer_key_id=record.issuer_key_id,
            )
        return ocsp.CertificateStatus(revoked=False, issuer_key_id=record.issuer_key_id)

    def publish_crl(self) -> x509.CertificateRevocationList:
        """Sign each issuing CA's CRL of its revoked and held certificates: ``ca/crl.der`` for the
        CA whose certificates name ``ca.crl_url``, ``ca/crl-<key id>.der`` for every CA. Returns
        the first."""
        paths = ca_paths(self.config)
        published: list[x509.CertificateRevocationList] = []
        for name, issuer in self.cas.crl_names.items():
            assert issuer.certificate is not None
            kid = ocsp.key_id(issuer.certificate)
            entries = [
                RevokedEntry(int(serial, 16), at, parse_reason(reason))
                for serial, at, reason in self.registry.crl_entries(kid)
            ]
            crl = build_crl(
                issuer,
                entries,
                now=self.clock(),
                next_update=dt.timedelta(hours=self.config.ca.crl_next_update_hours),
            )
            der = crl.public_bytes(Encoding.DER)
            write_atomic(paths.crl_of(kid), der, mode=0o644)
            if name == "":
                write_atomic(paths.crl, der, mode=0o644)
                published.insert(0, crl)
            else:
                published.append(crl)
        if "" not in self.cas.crl_names:  # the first CA is retired: crl.der is the signer's
            write_atomic(paths.crl, published[0].public_bytes(Encoding.DER), mode=0o644)
        return published[0]


class _Trust(TypedDict):
    """The trust arguments of ``make_challenge`` and ``verify_piv_attestation``."""

    anchors: list[x509.Certificate]
    crls: list[x509.CertificateRevocationList]
    crl_policy: CrlPolicy


@functools.lru_cache(maxsize=4096)
def _named_identity(cert: x509.Certificate) -> PeerIdentity:
    """What a client certificate names (time-independent; a refusal is not cached)."""
    return named_identity(cert)


@functools.lru_cache(maxsize=16)
def _key_id(issuing: x509.Certificate) -> str:
    return ocsp.key_id(issuing)


def _code_hash(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()


def _station_csr(station_id: str, der: bytes) -> ec.EllipticCurvePublicKey:
    """The key of a station's CSR: P-256, signed by that key, CN the station id (no SAN: the
    CA writes the station's URI)."""
    checked = check_device_csr(der)
    if checked.device_id != station_id:
        raise NotAuthorised(
            f"the CSR names {checked.device_id}; a station's CSR must name the station "
            f"({station_id}) in its CN"
        )
    return checked.public_key


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _check_binding(device_id: str, bound: str | None, presented: str, what: str) -> None:
    """A device id stays with the hardware it was first attested on."""
    if bound is not None and bound != presented:
        raise AttestationRefused(
            f"device {device_id} is bound to hardware {bound[:16]}..., but this {what} is "
            f"{presented[:16]}...; a device id never moves to other hardware: provision a new "
            "device id for it"
        )
