"""Hardware attestation: one-time challenges, group key policies and hardware binding."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Connection
from sqlmodel import select

from enrollment.attestation import AttestedKey
from enrollment.errors import AttestationRefused
from enrollment.ids import validate_id
from enrollment.registry import statements as sql
from enrollment.registry.audit import AuditLog, AuditRecord
from enrollment.registry.models import AttestationChallenge, GroupPolicy, as_utc


class Attestation(AuditLog):
    """Attestation challenges (issued once, answered once) and groups' key-protection policy."""

    def add_challenge(self, challenge: AttestationChallenge, audit: AuditRecord) -> None:
        with self.transaction() as s:
            s.add(challenge)
            self.audit(audit, s)

    def consume_challenge(
        self, challenge_id: str, *, actor: str, now: dt.datetime
    ) -> AttestationChallenge:
        """Mark the challenge answered and return it; each challenge is answered at most once.

        Committed before the evidence is checked: a failed answer burns the challenge too, so
        evidence cannot be retried against the same nonce.
        """
        with self.transaction() as s:
            row = s.get(AttestationChallenge, challenge_id, with_for_update=True)
            if row is None or row.actor != actor:
                raise AttestationRefused(
                    f"unknown attestation challenge {challenge_id!r} for {actor}; "
                    "request a new challenge"
                )
            if row.used_at is not None:
                raise AttestationRefused(
                    f"attestation challenge {challenge_id} was already answered at "
                    f"{as_utc(row.used_at):%H:%M:%S}Z (a replay?); request a new challenge"
                )
            expires_at = as_utc(row.expires_at)
            if now >= expires_at:
                raise AttestationRefused(
                    f"attestation challenge {challenge_id} expired at {expires_at:%H:%M:%S}Z; "
                    "request a new challenge and answer it promptly"
                )
            row.used_at = now
            s.add(row)
            return row

    def set_group_policy(self, group: str, required_protection: str, actor: str) -> None:
        validate_id(group, kind="group")
        with self.transaction() as s:
            row = s.get(GroupPolicy, group) or GroupPolicy(group=group)
            row.required_protection = required_protection
            s.add(row)
            self.audit(
                AuditRecord(actor, "group.policy", "ok", group, f"require {required_protection}"),
                s,
            )

    def group_policies(self) -> list[GroupPolicy]:
        with self._read_session() as s:
            return list(s.exec(select(GroupPolicy).order_by(GroupPolicy.group)).all())


def bind_hardware(conn: Connection, device_id: str, attested: AttestedKey) -> None:
    """Record the key's protection; refuse if the device is bound to other hardware."""
    params = {
        "b_device_id": device_id,
        "b_binding": attested.binding,
        "protection": str(attested.protection),
        "summary": attested.summary,
    }
    if conn.execute(sql.BIND_HARDWARE, params).rowcount != 1:
        raise AttestationRefused(
            f"device {device_id} is bound to other hardware; a device id never moves to "
            "another TPM or card: provision a new device id for this hardware"
        )
