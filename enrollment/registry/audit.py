"""The audit trail: append-only, enforced by the database (see the schema's triggers), and a
hash chain (``chain``) that ``verify_audit_chain`` walks and ``archive_audit`` cuts off.

:func:`append_audit` is the one place a row is written. It reads the chain's head and inserts the
next row (id head + 1, ``prev_hash`` the head's hash) inside the caller's transaction, which is
what serialises writers from any process: SQLite's ``BEGIN IMMEDIATE`` holds the database's write
lock for the whole transaction; on PostgreSQL a transaction-level advisory lock is taken first,
so a second writer reads the head only after the first one committed (READ COMMITTED reads a
fresh snapshot per statement). Take it last in a transaction: it is held until commit.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, delete, select, update
from sqlmodel import Session, SQLModel, col
from sqlmodel import select as select_rows

from enrollment.registry import statements as sql
from enrollment.registry.chain import FIELDS, ChainCheck, canonical_time, row_hash, walk
from enrollment.registry.engine import Cursorlike, Database
from enrollment.registry.models import AuditEvent, as_utc, utcnow
from fleetgate.errors import FleetgateError
from fleetgate.keyfiles import write_atomic

_ANCHOR = SQLModel.metadata.tables["auditanchor"]
_AUDIT = sql.AUDIT
_HEAD_ROW = select(_AUDIT.c.id, _AUDIT.c.row_hash).order_by(_AUDIT.c.id.desc()).limit(1)
_ANCHOR_ROW = select(_ANCHOR.c.last_id, _ANCHOR.c.last_hash).where(_ANCHOR.c.id == 1)
# pg_advisory_xact_lock key shared by every audit writer ("fgaudit" in ASCII); the schema
# upgrade's lock is another constant.
_CHAIN_LOCK = 0x66676175646974
Lean = Callable[[Any, dict[str, Any]], Cursorlike]
_STREAM = 1000  # rows fetched at a time when walking or archiving


class AuditChainBroken(FleetgateError):
    """The audit trail (or an archive of it) is not the chain it was written as."""

    code = "audit_chain_broken"


@dataclass(frozen=True)
class AuditRecord:
    """What one audit entry says; ``Registry.audit`` stamps and stores it."""

    actor: str
    action: str
    outcome: str
    subject: str | None = None
    reason: str = ""
    request_id: str | None = None


@dataclass(frozen=True)
class ArchiveSummary:
    """What ``archive_audit`` moved out of the registry (nothing when ``count`` is 0)."""

    count: int
    first_hash: str
    last_hash: str
    last_id: int


def audit_values(record: AuditRecord) -> dict[str, Any]:
    """The row ``record`` becomes, stamped now (chained by :func:`append_audit`)."""
    return {
        "at": utcnow(),
        "actor": record.actor,
        "action": record.action,
        "subject": record.subject,
        "outcome": record.outcome,
        "reason": record.reason,
        "request_id": record.request_id,
    }


ChainHead = tuple[int, str]
"""The audit chain's last row: its id and hash."""


def append_audit(
    conn: Connection, record: AuditRecord, run: Lean | None = None, head: ChainHead | None = None
) -> ChainHead:
    """Append ``record`` as the chain's next row, in ``conn``'s (write) transaction; ``run``:
    the registry's lean statement path on that transaction (``Database._lean``). Returns the
    new head; ``head``: the one an earlier append in this same transaction returned (the lock
    is held already and the head need not be read again)."""
    execute: Lean = run or conn.execute
    if head is None:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_CHAIN_LOCK})")
        last = execute(_HEAD_ROW, {}).fetchone()
        head = last or conn.execute(_ANCHOR_ROW).one()
    head_id, head_hash = head
    values = audit_values(record)
    values["id"] = head_id + 1
    values["prev_hash"] = head_hash
    values["row_hash"] = row_hash(values, head_hash)
    execute(sql.INSERT_AUDIT, values)
    return values["id"], values["row_hash"]


def archive_line(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row as an archive file holds it: its hashed fields and both hashes, time canonical."""
    line = {name: row[name] for name in (*FIELDS, "prev_hash", "row_hash")}
    line["at"] = canonical_time(row["at"])
    return line


def verify_archive(path: Path) -> tuple[ChainCheck, str]:
    """Check an archive file's own chain and trailer; the walk and the hash it starts from.

    Raises :class:`AuditChainBroken` naming what does not hold.
    """
    data = path.read_bytes()
    body_end = data.rstrip(b"\n").rfind(b"\n") + 1
    body, trailer_line = data[:body_end], data[body_end:]
    try:
        trailer = json.loads(trailer_line)["trailer"]
        rows = [json.loads(line) for line in body.splitlines()]
    except (ValueError, KeyError, TypeError) as exc:
        raise AuditChainBroken(f"{path}: not a fleetgate audit archive ({exc})") from None
    if hashlib.sha256(body).hexdigest() != trailer.get("body_sha256"):
        raise AuditChainBroken(f"{path}: the body does not match the trailer's SHA-256")
    if not rows or len(rows) != trailer.get("count"):
        raise AuditChainBroken(f"{path}: the trailer counts {trailer.get('count')} rows")
    start = rows[0]["prev_hash"]
    check = walk(rows, start)
    if not check.ok:
        raise AuditChainBroken(f"{path}: audit row {check.broken_id} {check.problem}")
    if (rows[0]["row_hash"], check.head) != (trailer.get("first_hash"), trailer.get("last_hash")):
        raise AuditChainBroken(f"{path}: the trailer's first or last hash is not the rows'")
    return check, start


class AuditLog(Database):
    """Appending to and reading the audit trail; every other aggregate audits through it."""

    def audit(self, record: AuditRecord, session: Session | None = None) -> None:
        """Append ``record``; inside ``session`` when the entry must commit with a change."""
        if session is not None:
            # The session's pending writes go first, so that the chain lock (held to commit) is
            # never held while waiting for a row lock another audit writer holds.
            session.flush()
            append_audit(session.connection(), record)
            return
        with self.engine.begin() as conn:
            append_audit(conn, record)

    def audit_events(self, *, subject: str | None = None, limit: int = 100) -> list[AuditEvent]:
        with self._read_session() as s:
            query = select_rows(AuditEvent).order_by(col(AuditEvent.id).desc()).limit(limit)
            if subject is not None:
                query = query.where(col(AuditEvent.subject) == subject)
            return list(reversed(s.exec(query).all()))

    def verify_audit_chain(self) -> ChainCheck:
        """Walk the rows after the archive anchor; where the chain breaks, if it does."""
        with self._snapshot() as conn:
            last_id, last_hash = conn.execute(_ANCHOR_ROW).one()
            behind = conn.execute(
                select(_AUDIT.c.id).where(_AUDIT.c.id <= last_id).order_by(_AUDIT.c.id).limit(1)
            ).scalar()
            if behind is not None:
                return ChainCheck(0, last_hash, behind, "is at or before the archive anchor")
            return walk(self._rows_after(conn, last_id), last_hash)

    def archive_audit(self, before: dt.datetime, out: Path, *, actor: str) -> ArchiveSummary:
        """Move the oldest rows stamped before ``before`` to ``out``, then out of the registry.

        ``out`` (JSON lines and a trailer, 0600) is written and fsynced before the rows are
        deleted, in one transaction that moves the anchor to the last of them and audits the
        archive. A chain that does not verify is not archived.
        """
        with self._snapshot() as conn:
            anchor_id, anchor_hash = conn.execute(_ANCHOR_ROW).one()
            rows: list[dict[str, Any]] = []
            for row in self._rows_after(conn, anchor_id):
                if as_utc(row["at"]) >= before:
                    break
                rows.append(archive_line(row))
        check = walk(rows, anchor_hash)
        if not check.ok:
            raise AuditChainBroken(
                f"audit row {check.broken_id} {check.problem}: nothing was archived"
            )
        if not rows:
            return ArchiveSummary(0, anchor_hash, anchor_hash, anchor_id)
        summary = ArchiveSummary(len(rows), rows[0]["row_hash"], check.head, rows[-1]["id"])
        body = b"".join(_json_line(row) for row in rows)
        trailer = {
            "count": summary.count,
            "first_hash": summary.first_hash,
            "last_hash": summary.last_hash,
            "body_sha256": hashlib.sha256(body).hexdigest(),
        }
        write_atomic(out, body + _json_line({"trailer": trailer}), mode=0o600)
        with self.engine.begin() as conn:
            append_audit(
                conn,
                AuditRecord(
                    actor,
                    "audit.archive",
                    "ok",
                    None,
                    f"{summary.count} rows through id {summary.last_id} to {out.name}, "
                    f"last hash {summary.last_hash}",
                ),
            )
            moved = conn.execute(
                update(_ANCHOR)
                .where(_ANCHOR.c.last_id == anchor_id)
                .values(last_id=summary.last_id, last_hash=summary.last_hash, archived_at=utcnow())
            ).rowcount
            if moved != 1:
                raise FleetgateError("another archive ran meanwhile: nothing deleted; run again")
            conn.execute(delete(_AUDIT).where(_AUDIT.c.id <= summary.last_id))
        return summary

    @contextmanager
    def _snapshot(self) -> Iterator[Connection]:
        """A read transaction that sees one state across statements (REPEATABLE READ on
        PostgreSQL; a deferred SQLite transaction reads one WAL snapshot)."""
        if self.engine.dialect.name != "postgresql":
            with self._read() as conn:
                yield conn
            return
        with self.engine.connect() as conn:
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                yield conn

    @staticmethod
    def _rows_after(conn: Connection, last_id: int) -> Iterator[Mapping[Any, Any]]:
        query = select(_AUDIT).where(_AUDIT.c.id > last_id).order_by(_AUDIT.c.id)
        yield from conn.execution_options(yield_per=_STREAM).execute(query).mappings()


def _json_line(value: Mapping[str, Any]) -> bytes:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.encode() + b"\n"
