"""``pgferry doctor``: what is wrong with a Supabase database for the platform, and how to fix each thing.

Read-only checks, each a :class:`Finding` that says what was found and, for a problem, the statement or setting
that fixes it: connectivity and version; extensions (pgvector 0.8+ for the iterative scans ``match_*`` rely on);
row-level security on every table in ``public`` (a granted table without RLS is readable with the anon key); the
``supabase_realtime`` publication holding the platform's tables; the pooler mode actually in effect compared with
the one the URL implies (prepared statements through a transaction pooler fail); replication slots, and the WAL
an inactive slot keeps (it fills the disk until the slot is dropped or its consumer returns).

Owns the checks only; it changes nothing on the server.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Final, Literal

import psycopg

from pgferry.config import DatabaseMode
from pgferry.db.connect import connect
from pgferry.db.quoting import quote_ident, quote_literal
from pgferry.runtime.endpoints import EndpointMode, endpoint_mode
from pgferry.schema.models import REALTIME_TABLES, USER_OWNED_TABLES

__all__ = ["Finding", "diagnose"]

Status = Literal["ok", "warning", "problem"]
MIN_VECTOR: Final = (0, 8)
DEFAULT_MAX_RETAINED_WAL: Final = 1 << 30


@dataclass(frozen=True)
class Finding:
    check: str
    status: Status
    message: str
    fix: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:2] if part.isdigit())


def _extensions(conn: psycopg.Connection[Any]) -> list[Finding]:
    row = conn.execute(
        "select e.extversion, n.nspname from pg_extension e join pg_namespace n on n.oid = e.extnamespace "
        "where e.extname = 'vector'"
    ).fetchone()
    if row is None:
        available = conn.execute("select 1 from pg_available_extensions where name = 'vector'").fetchone()
        fix = "create extension if not exists vector with schema extensions;"
        if available is None:
            fix = "install pgvector 0.8+ on the server (Supabase has it), then: " + fix
        return [Finding("extensions", "problem", "pgvector (extension vector) is not installed", fix)]
    version, schema = str(row[0]), str(row[1])
    if _version_tuple(version) < MIN_VECTOR:
        return [
            Finding(
                "extensions",
                "problem",
                f"pgvector {version} is older than 0.8 (no iterative HNSW scans)",
                "alter extension vector update;",
            )
        ]
    return [Finding("extensions", "ok", f"pgvector {version} in schema {schema}")]


def _rls(conn: psycopg.Connection[Any]) -> list[Finding]:
    rows = conn.execute(
        "select c.relname, c.relrowsecurity, (select count(*) from pg_policy p where p.polrelid = c.oid) "
        "from pg_class c where c.relnamespace = 'public'::regnamespace and c.relkind in ('r', 'p') order by 1"
    ).fetchall()
    findings = [
        Finding(
            "rls",
            "problem",
            f"public.{name} has row-level security off: anyone with the anon key may reach it",
            f"alter table public.{quote_ident(name)} enable row level security; (then add policies)",
        )
        for name, enabled, _policies in rows
        if not enabled
    ]
    findings += [
        Finding(
            "rls",
            "warning",
            f"public.{name} has RLS on but no policy: API roles see nothing",
            f"create policy … on public.{quote_ident(name)} (or this is deliberate)",
        )
        for name, enabled, policies in rows
        if enabled and policies == 0
    ]
    if not findings:
        findings.append(Finding("rls", "ok", f"row-level security on every table in public ({len(rows)})"))
    return findings


def _publication(conn: psycopg.Connection[Any]) -> list[Finding]:
    if conn.execute("select 1 from pg_publication where pubname = 'supabase_realtime'").fetchone() is None:
        return [
            Finding(
                "publication",
                "problem",
                "publication supabase_realtime does not exist",
                "create publication supabase_realtime;",
            )
        ]
    present = {
        str(r[0])
        for r in conn.execute(
            "select tablename from pg_publication_tables where pubname = 'supabase_realtime' and schemaname = 'public'"
        )
    }
    existing = {
        str(r[0])
        for r in conn.execute(
            "select relname from pg_class where relnamespace = 'public'::regnamespace and relkind in ('r', 'p')"
        )
    }
    missing = [t for t in REALTIME_TABLES if t in existing and t not in present]
    if missing:
        tables = ", ".join(f"public.{quote_ident(t)}" for t in missing)
        return [
            Finding(
                "publication",
                "problem",
                f"supabase_realtime lacks {', '.join(missing)}: no realtime changes",
                f"alter publication supabase_realtime add table {tables};",
            )
        ]
    absent = [t for t in USER_OWNED_TABLES if t not in existing]
    if absent:
        return [
            Finding(
                "publication",
                "problem",
                f"platform tables missing: {', '.join(absent)}",
                "pgferry db upgrade --database-url … (applies the platform migrations)",
            )
        ]
    return [Finding("publication", "ok", f"supabase_realtime publishes the {len(REALTIME_TABLES)} realtime tables")]


def _pooler(conn: psycopg.Connection[Any], url: str, declared: DatabaseMode) -> list[Finding]:
    """Through a transaction pooler, two client connections open at once can land on one server session."""
    expected = endpoint_mode(url, pooler=False, declared=declared)
    with connect(url, application_name="pgferry-doctor", prepare_threshold=None) as other:
        first = conn.execute("select pg_backend_pid()").fetchone()
        second = other.execute("select pg_backend_pid()").fetchone()
    shared = first == second
    if shared and expected.allows_prepared_statements:
        return [
            Finding(
                "pooler",
                "problem",
                f"this URL goes through a transaction pooler but is taken as {expected.value} mode: "
                "prepared statements and session settings will break",
                "set PGFERRY_DB_MODE=transaction (or use port 6543 / the direct db.<ref>.supabase.co:5432)",
            )
        ]
    if shared:
        return [
            Finding(
                "pooler",
                "ok",
                "transaction pooler (no prepared statements, SET LOCAL only): fine for "
                "application queries; migrations and replication need the direct URL",
            )
        ]
    if expected is EndpointMode.TRANSACTION:
        return [
            Finding(
                "pooler",
                "warning",
                "taken as transaction mode, but two connections got their own "
                "sessions (direct or session pooler): prepared statements are off for nothing",
                "unset PGFERRY_DB_MODE, or set it to direct/session",
            )
        ]
    return [Finding("pooler", "ok", f"{expected.value} connection: each client has its own server session")]


def _slots(conn: psycopg.Connection[Any], max_retained_wal: int) -> list[Finding]:
    rows = conn.execute(
        "select slot_name, slot_type, active, "
        "coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::bigint from pg_replication_slots order by 1"
    ).fetchall()
    findings: list[Finding] = []
    for name, kind, active, retained in rows:
        megabytes = int(retained) / (1 << 20)
        if not active and int(retained) > max_retained_wal:
            findings.append(
                Finding(
                    "replication",
                    "problem",
                    f"inactive {kind} slot {name} retains {megabytes:,.0f} MB of WAL (the disk fills until it is gone)",
                    "restart its consumer, or if it is abandoned: "
                    f"select pg_drop_replication_slot({quote_literal(name)});",
                )
            )
        else:
            findings.append(
                Finding(
                    "replication",
                    "ok",
                    f"slot {name} ({'active' if active else 'inactive'}) retains {megabytes:,.1f} MB",
                )
            )
    if not rows:
        findings.append(Finding("replication", "ok", "no replication slots"))
    return findings


def diagnose(
    url: str, *, declared: DatabaseMode = "auto", max_retained_wal: int = DEFAULT_MAX_RETAINED_WAL
) -> list[Finding]:
    """Every finding for the database at ``url``; a failed connection is the one finding then."""
    try:
        conn = connect(url, application_name="pgferry-doctor", prepare_threshold=None, connect_timeout=10)
    except psycopg.Error as exc:
        first = " ".join(str(exc).split())[:300]
        return [
            Finding(
                "connectivity",
                "problem",
                f"cannot connect: {first}",
                "check host, port, user, password and that the server accepts connections from here",
            )
        ]
    with conn:
        version = conn.execute("show server_version").fetchone()
        findings = [Finding("connectivity", "ok", f"connected; PostgreSQL {version[0] if version else '?'}")]
        for check in (_extensions, _rls, _publication):
            findings += check(conn)
        findings += _pooler(conn, url, declared)
        findings += _slots(conn, max_retained_wal)
    return findings
