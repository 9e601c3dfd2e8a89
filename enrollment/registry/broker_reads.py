"""What brokers ask the registry: admission at CONNECT, the revocation change feed, ACLs.

Every CONNECT and every feed poll pays for these reads, so they avoid the ORM and, on a local
SQLite file, SQLAlchemy itself (``Database._fast_rows``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlmodel import col, select

from enrollment.ids import validate_id
from enrollment.registry import statements as sql
from enrollment.registry.acl import AclPatterns, check_patterns
from enrollment.registry.audit import AuditLog, AuditRecord
from enrollment.registry.certificates import serial_hex
from enrollment.registry.models import AclRule, CertStatus, DeviceChange, DeviceState, SubjectKind


@dataclass(frozen=True)
class Admission:
    """Whether a device presenting a certificate may connect now, and if not, why.

    When allowed, ``acl`` is its group's stored template (None: the broker's default).
    """

    allowed: bool
    reason: str
    group: str | None = None
    acl: AclPatterns | None = None


class BrokerReads(AuditLog):
    """Admission, the change feed and the groups' ACL templates."""

    def admission(self, device_id: str, serial: int) -> Admission:
        """May ``device_id`` connect with the certificate ``serial``? Only its active one may.

        One statement reads the device, the certificate and the group's ACL (every CONNECT
        pays for this read, so it avoids the ORM).
        """
        params = {"device_id": device_id, "serial": serial_hex(serial)}
        rows = self._fast_rows(sql.ADMISSION, params)
        if not rows:
            return Admission(False, f"device {device_id} is not in the registry")
        state, group, cert_serial, kind, subject, status = rows[0][:6]
        state = _member(DeviceState, state)
        kind = _member(SubjectKind, kind) if kind is not None else None
        status = _member(CertStatus, status) if status is not None else None
        group = group or sql.DEFAULT_GROUP
        if state != DeviceState.ACTIVE:
            return Admission(False, f"device {device_id} is {state}", group)
        if cert_serial is None or kind != SubjectKind.DEVICE or subject != device_id:
            return Admission(
                False, f"certificate {serial_hex(serial)} was not issued to {device_id}"
            )
        if status != CertStatus.ACTIVE:
            renewed = (
                ": connect with the renewed certificate" if status == CertStatus.SUPERSEDED else ""
            )
            return Admission(
                False, f"certificate {cert_serial} of {device_id} is {status}{renewed}", group
            )
        rules = [(action, pattern) for *_, action, pattern in rows if action is not None]
        return Admission(True, "", group, _acl_patterns(rules))

    def changes_since(self, after_id: int, *, limit: int = 1000) -> list[DeviceChange]:
        """Device state changes committed after ``after_id``, oldest first."""
        params = {"after_id": after_id, "limit": limit, "offset": 0}
        return [
            DeviceChange(
                id=change_id,
                device_id=device_id,
                state=_member(DeviceState, state),
                reason=reason,
                at=at if isinstance(at, dt.datetime) else dt.datetime.fromisoformat(at),
            )
            for change_id, device_id, state, reason, at in self._fast_rows(
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
        """Replace a group's ACL template in one transaction; a malformed one is refused."""
        validate_id(group, kind="group")
        template = check_patterns(publish, subscribe)
        with self.transaction() as s:
            for row in s.exec(select(AclRule).where(AclRule.group == group)).all():
                s.delete(row)
            s.flush()
            for action, patterns in (
                ("publish", template.publish),
                ("subscribe", template.subscribe),
            ):
                for pattern in dict.fromkeys(patterns):
                    s.add(AclRule(group=group, action=action, pattern=pattern))
            summary = f"publish {list(template.publish)} subscribe {list(template.subscribe)}"
            self.audit(AuditRecord(actor, "acl.set", "ok", group, summary), s)


def _member(enum: Any, value: Any) -> Any:
    """An enum member from a processed row (the member) or a raw one (its stored name)."""
    return value if isinstance(value, enum) else enum[value]


def _acl_patterns(rules: Sequence[tuple[str, str]]) -> AclPatterns | None:
    """(action, pattern) rows as a template; None when the group stores none."""
    if not rules:
        return None
    return AclPatterns(
        publish=tuple(sorted(p for action, p in rules if action == "publish")),
        subscribe=tuple(sorted(p for action, p in rules if action == "subscribe")),
    )
