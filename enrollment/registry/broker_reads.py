"""What brokers ask the registry: admission at CONNECT, the change feed, ACLs.

Every CONNECT and every feed poll pays for these reads, so they avoid the ORM and, on a local
SQLite file, SQLAlchemy itself (``Database._fast_rows``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlmodel import col, select

from enrollment.registry import statements as sql
from enrollment.registry.acl import AclPatterns, check_patterns
from enrollment.registry.audit import AuditLog, AuditRecord
from enrollment.registry.certificates import serial_hex
from enrollment.registry.models import (
    AclRule,
    CertStatus,
    DeviceChange,
    DeviceState,
    SubjectKind,
    member,
)
from fleetgate.ids import validate_id


@dataclass(frozen=True)
class CertificateFacts:
    """The registry's record of the certificate a device presented (by its serial)."""

    serial: str  # hex, as stored
    kind: SubjectKind
    subject: str
    status: CertStatus


@dataclass(frozen=True)
class AdmissionFacts:
    """What the registry holds about a connecting device and the certificate it presented, read
    in one statement at CONNECT. Only facts: the broker decides
    (:func:`broker.admission.decide_admission`).

    ``device_state`` is None when the device is not in the registry, ``certificate`` when no
    certificate has that serial, ``acl`` when the group has no stored template (the broker's
    default applies).
    """

    device_state: DeviceState | None
    group: str
    certificate: CertificateFacts | None
    acl: AclPatterns | None


class BrokerReads(AuditLog):
    """Admission facts, the change feed and the groups' ACL templates."""

    def admission_facts(self, device_id: str, serial: int | None) -> AdmissionFacts:
        """The device, the certificate with ``serial`` (None: none asked for) and the group's
        ACL, in one statement: every CONNECT pays for this read, so it avoids the ORM."""
        params = {"device_id": device_id, "serial": "" if serial is None else serial_hex(serial)}
        rows = self._fast_rows(sql.ADMISSION, params)
        if not rows:
            return AdmissionFacts(None, sql.DEFAULT_GROUP, None, None)
        state, group, cert_serial, kind, subject, status = rows[0][:6]
        certificate = None
        if cert_serial is not None:
            certificate = CertificateFacts(
                cert_serial, member(SubjectKind, kind), subject, member(CertStatus, status)
            )
        rules = [(action, pattern) for *_, action, pattern in rows if action is not None]
        return AdmissionFacts(
            member(DeviceState, state),
            group or sql.DEFAULT_GROUP,
            certificate,
            _acl_patterns(rules),
        )

    def changes_since(self, after_id: int, *, limit: int = 1000) -> list[DeviceChange]:
        """Device state and policy changes committed after ``after_id``, oldest first."""
        params = {"after_id": after_id, "limit": limit, "offset": 0}
        return [
            DeviceChange(
                id=change_id,
                device_id=device_id,
                state=None if state is None else member(DeviceState, state),
                reason=reason,
                at=at if isinstance(at, dt.datetime) else dt.datetime.fromisoformat(at),
                group=group,
            )
            for change_id, device_id, state, reason, at, group in self._fast_rows(
                sql.CHANGES_SINCE, params
            )
        ]

    def last_change_id(self) -> int:
        with self._read_session() as s:
            latest = s.exec(select(DeviceChange.id).order_by(col(DeviceChange.id).desc())).first()
            return latest or 0

    def acl_patterns(self, group: str) -> AclPatterns | None:
        """The group's stored ACL template, or None when it has none (the broker's default)."""
        with self._read_session() as s:
            rows = s.exec(select(AclRule).where(AclRule.group == group)).all()
        return _acl_patterns([(r.action, r.pattern) for r in rows])

    def set_acl(
        self, group: str, *, publish: Iterable[str], subscribe: Iterable[str], actor: str
    ) -> None:
        """Replace a group's ACL template in one transaction; a malformed one is refused.

        The change feed gets a row in the same transaction, so that every broker reapplies
        the group's ACL to its live sessions (``broker.feed``); the audit row keeps the old
        template beside the new one.
        """
        validate_id(group, kind="group")
        template = check_patterns(publish, subscribe)
        with self.transaction() as s:
            old = s.exec(select(AclRule).where(AclRule.group == group)).all()
            before = _acl_patterns([(r.action, r.pattern) for r in old])
            for row in old:
                s.delete(row)
            s.flush()
            for action, patterns in (
                ("publish", template.publish),
                ("subscribe", template.subscribe),
            ):
                for pattern in dict.fromkeys(patterns):
                    s.add(AclRule(group=group, action=action, pattern=pattern))
            s.add(DeviceChange(group=group, reason="acl.set"))
            was = "the default" if before is None else _summary(before)
            summary = f"{_summary(template)} (was {was})"
            self.audit(AuditRecord(actor, "acl.set", "ok", group, summary), s)


def _summary(template: AclPatterns) -> str:
    return f"publish {list(template.publish)} subscribe {list(template.subscribe)}"


def _acl_patterns(rules: Sequence[tuple[str, str]]) -> AclPatterns | None:
    """(action, pattern) rows as a template; None when the group stores none."""
    if not rules:
        return None
    return AclPatterns(
        publish=tuple(sorted(p for action, p in rules if action == "publish")),
        subscribe=tuple(sorted(p for action, p in rules if action == "subscribe")),
    )
