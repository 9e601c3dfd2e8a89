"""The broker's audit events, written in batches off the event loop.

The writer itself is :mod:`enrollment.audit_writer` (the enrollment service writes its refused
TLS handshakes through it too); the broker hands it its ``Metrics``, whose ``audit_written`` and
``audit_dropped`` counters ``/metrics`` reports.
"""

from __future__ import annotations

from enrollment.audit_writer import BATCH, AuditWriter

__all__ = ["BATCH", "AuditWriter"]
