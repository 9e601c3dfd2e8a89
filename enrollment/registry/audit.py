"""The audit trail: append-only, enforced by the database (see the schema's triggers)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlmodel import Session, col, select

from enrollment.registry import statements as sql
from enrollment.registry.engine import Database
from enrollment.registry.models import AuditEvent, utcnow


@dataclass(frozen=True)
class AuditRecord:
    """What one audit entry says; ``Registry.audit`` stamps and stores it."""

    actor: str
    action: str
    outcome: str
    subject: str | None = None
    reason: str = ""
    request_id: str | None = None


def audit_values(record: AuditRecord) -> dict[str, Any]:
    """The row ``record`` becomes, stamped now."""
    return {
        "at": utcnow(),
        "actor": record.actor,
        "action": record.action,
        "subject": record.subject,
        "outcome": record.outcome,
        "reason": record.reason,
        "request_id": record.request_id,
    }


class AuditLog(Database):
    """Appending to and reading the audit trail; every other aggregate audits through it."""

    def audit(self, record: AuditRecord, session: Session | None = None) -> None:
        """Append ``record``; inside ``session`` when the entry must commit with a change."""
        if session is not None:
            session.add(AuditEvent(**audit_values(record)))
            return
        with self.engine.begin() as conn:
            conn.execute(sql.INSERT_AUDIT, audit_values(record))

    def audit_events(self, *, subject: str | None = None, limit: int = 100) -> list[AuditEvent]:
        with self._read_session() as s:
            query = select(AuditEvent).order_by(col(AuditEvent.id).desc()).limit(limit)
            if subject is not None:
                query = query.where(AuditEvent.subject == subject)
            return list(reversed(s.exec(query).all()))
