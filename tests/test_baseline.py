"""The local Supabase baseline: Supabase's roles and auth helpers, and refusal to touch a real project."""

from __future__ import annotations

import json
import uuid

import psycopg
import pytest

from pgferry.schema.models import REALTIME_TABLES
from pgferry.supabase.baseline import BaselineRefusedError, apply_local_baseline
from tests.cli_helpers import run_pgferry


def test_baseline_is_idempotent(blank_url: str) -> None:
    assert apply_local_baseline(blank_url) is True
    assert apply_local_baseline(blank_url) is False


def test_roles_match_supabase(baseline_url: str) -> None:
    with psycopg.connect(baseline_url) as conn:
        roles = {
            name: (login, inherit, bypass)
            for name, login, inherit, bypass in conn.execute(
                "select rolname, rolcanlogin, rolinherit, rolbypassrls from pg_roles "
                "where rolname in ('anon', 'authenticated', 'service_role', 'authenticator')"
            )
        }
        members = {
            r[0]
            for r in conn.execute(
                "select r.rolname from pg_auth_members m join pg_roles r on r.oid = m.roleid "
                "join pg_roles u on u.oid = m.member where u.rolname = 'authenticator'"
            )
        }
    assert roles == {
        "anon": (False, False, False),
        "authenticated": (False, False, False),
        "service_role": (False, False, True),
        "authenticator": (True, False, False),
    }
    assert {"anon", "authenticated", "service_role"} <= members


def test_auth_helpers_read_claims_as_supabase_does(baseline_url: str) -> None:
    user = uuid.uuid4()
    claims = {"sub": str(user), "role": "authenticated", "email": "ada@example.test", "aal": "aal1"}
    with psycopg.connect(baseline_url, autocommit=True) as conn:
        assert conn.execute("select auth.uid(), auth.role(), auth.jwt()").fetchone() == (None, None, None)
        with conn.transaction():
            conn.execute("select set_config('request.jwt.claims', %s, true)", (json.dumps(claims),))
            conn.execute("set local role authenticated")
            row = conn.execute("select auth.uid(), auth.role(), auth.email(), auth.jwt() ->> 'aal'").fetchone()
            assert row == (user, "authenticated", "ada@example.test", "aal1")
        # The older per-claim setting still works, as on Supabase.
        with conn.transaction():
            conn.execute("select set_config('request.jwt.claim.sub', %s, true)", (str(user),))
            assert conn.execute("select auth.uid()").fetchone() == (user,)
        # Claims are transaction-local: nothing leaks into the next transaction.
        assert conn.execute("select auth.uid()").fetchone() == (None,)


def test_baseline_refuses_a_database_with_a_foreign_auth_schema(blank_url: str) -> None:
    with psycopg.connect(blank_url, autocommit=True) as conn:
        conn.execute("create schema auth")
        conn.execute("create table auth.users (id uuid primary key)")
    with pytest.raises(BaselineRefusedError, match="real Supabase project"):
        apply_local_baseline(blank_url)
    result = run_pgferry("db", "baseline", "--database-url", blank_url)
    assert result.returncode == 2
    assert "real Supabase project" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    with psycopg.connect(blank_url) as conn:  # untouched
        assert conn.execute("select to_regnamespace('extensions')").fetchone() == (None,)
        assert conn.execute("select to_regprocedure('auth.uid()')").fetchone() == (None,)


def test_realtime_publication_and_replica_identity(target_url: str) -> None:
    with psycopg.connect(target_url) as conn:
        published = {
            r[0]
            for r in conn.execute("select tablename from pg_publication_tables where pubname = 'supabase_realtime'")
        }
        identity = dict(
            conn.execute(
                "select relname, relreplident from pg_class where relnamespace = 'public'::regnamespace "
                "and relkind = 'r'"
            ).fetchall()
        )
    assert published == set(REALTIME_TABLES)
    for table in REALTIME_TABLES:
        expected = "d" if table == "observability_events" else "f"
        assert identity[table] == expected, table


def test_updated_at_is_maintained_by_the_database(target_url: str) -> None:
    with psycopg.connect(target_url) as conn:
        task = conn.execute(
            "insert into public.tasks (user_id, title, updated_at) values (%s, 'x', '2001-01-01') "
            "returning id, updated_at",
            (uuid.uuid4(),),
        ).fetchone()
        assert task is not None
        conn.commit()
        after = conn.execute(
            "update public.tasks set title = 'y', updated_at = '1999-01-01' where id = %s returning updated_at, now()",
            (task[0],),
        ).fetchone()
        assert after is not None and after[0] == after[1]  # the trigger's now(), not the value the update sent
