"""The audit trail: each admin action as an `audit_log` row (who, when, what, how many rows).

Written for erasures and retention rounds (in their own transactions), SQL queries (their
text, the caller's key id and the row count), adapter registrations, promotions, rejections
and rollbacks, train triggers and configuration reloads (`proxy.reload`). `flywheel status --audit` shows the latest. Never stored content: the key is
named by the first 12 hex digits of its SHA-256 (`auth.Grant.key_id`).
"""

from __future__ import annotations

from aiohttp import web

from flywheel.proxy.auth import GRANT
from flywheel.proxy.state import STATE
from flywheel.store.records import AuditEntry


def caller_key_id(request: web.Request) -> str | None:
    """The id of the key this request was let in with (None: no keys configured)."""
    grant = request.get(GRANT)
    return grant.key_id if grant else None


def audit_entry(request: web.Request, action: str, target: str | None = None, row_count: int | None = None,
                detail: dict | None = None) -> AuditEntry:
    """An `audit_log` row for an admin action taken by this request's caller."""
    return AuditEntry.now(caller_key_id(request), action, target, row_count, detail)


async def audit(request: web.Request, action: str, target: str | None = None, row_count: int | None = None,
                detail: dict | None = None) -> None:
    """Queue the row (committed with the writer's next batch, as calls are)."""
    await request.app[STATE].writer.put(audit_entry(request, action, target, row_count, detail))
