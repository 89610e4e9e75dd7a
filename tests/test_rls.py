"""Row level security, tried the way an attacker would: one tenant reaching for another's rows.

Every user-owned table is checked on every PostgreSQL version under test. Each denial is paired with a
positive control (the owner can do the same thing), so a policy that denies everything would fail too.
"""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pgferry.db.rls import anon_claims, scoped_transaction, service_role_claims, user_claims
from pgferry.schema.models import USER_OWNED_TABLES
from tests.platform_rows import PARENT_OF, insert_row, insert_tree, row_values

ALICE = uuid.UUID("00000000-0000-4000-8000-00000000000a")
BOB = uuid.UUID("00000000-0000-4000-8000-00000000000b")


@pytest.fixture
def tenants(target_url: str) -> dict[uuid.UUID, dict[str, Any]]:
    with psycopg.connect(target_url, autocommit=True) as conn:
        return {ALICE: insert_tree(conn, ALICE), BOB: insert_tree(conn, BOB)}


def _count(conn: psycopg.Connection[Any], table: str, where: str = "true", params: tuple[Any, ...] = ()) -> int:
    query = sql.SQL("select count(*) from public.{} where " + where).format(sql.Identifier(table))
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return int(row[0])


def test_rls_enabled_on_every_user_owned_table(target_url: str) -> None:
    with psycopg.connect(target_url, autocommit=True) as conn:
        rows = conn.execute(
            "select relname, relrowsecurity from pg_class where relnamespace = 'public'::regnamespace and relkind = 'r'"
        ).fetchall()
    enabled = {name: flag for name, flag in rows}
    assert set(USER_OWNED_TABLES) <= set(enabled)
    assert all(enabled[t] for t in USER_OWNED_TABLES), enabled
    # Nothing else in public may be exposed without RLS either.
    assert all(enabled.values()), {t: f for t, f in enabled.items() if not f}


@pytest.mark.parametrize("table", USER_OWNED_TABLES)
def test_user_cannot_read_another_users_rows(target_url: str, tenants: Any, table: str) -> None:
    with psycopg.connect(target_url, autocommit=True) as conn, scoped_transaction(conn, user_claims(ALICE)):
        assert _count(conn, table) == 1
        assert _count(conn, table, "user_id = %s", (BOB,)) == 0
        assert _count(conn, table, "id = %s", (tenants[BOB][table],)) == 0


@pytest.mark.parametrize("table", USER_OWNED_TABLES)
def test_user_cannot_insert_rows_for_another_user(target_url: str, tenants: Any, table: str) -> None:
    with psycopg.connect(target_url, autocommit=True) as conn:
        with scoped_transaction(conn, user_claims(ALICE)):  # positive control
            insert_row(conn, table, row_values(table, ALICE, tenants[ALICE]))
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
            with scoped_transaction(conn, user_claims(ALICE)):
                insert_row(conn, table, row_values(table, BOB, tenants[BOB]))


@pytest.mark.parametrize("table", [t for t in USER_OWNED_TABLES if PARENT_OF[t]])
def test_user_cannot_attach_rows_to_another_users_parent(target_url: str, tenants: Any, table: str) -> None:
    """Foreign keys ignore RLS; the policies must still stop a row pointing into another tenant."""
    with psycopg.connect(target_url, autocommit=True) as conn:
        for column, parent in PARENT_OF[table].items():
            parents = dict(tenants[ALICE])
            parents[parent] = tenants[BOB][parent]
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
                with scoped_transaction(conn, user_claims(ALICE)):
                    insert_row(conn, table, row_values(table, ALICE, parents))
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
                with scoped_transaction(conn, user_claims(ALICE)):
                    conn.execute(
                        sql.SQL("update public.{} set {} = %s where id = %s").format(
                            sql.Identifier(table), sql.Identifier(column)
                        ),
                        (tenants[BOB][parent], tenants[ALICE][table]),
                    )


@pytest.mark.parametrize("table", USER_OWNED_TABLES)
def test_user_cannot_update_or_delete_another_users_rows(target_url: str, tenants: Any, table: str) -> None:
    with psycopg.connect(target_url, autocommit=True) as conn:
        with scoped_transaction(conn, user_claims(ALICE)):
            touch = sql.SQL("update public.{} set user_id = user_id where id = %s").format(sql.Identifier(table))
            assert conn.execute(touch, (tenants[BOB][table],)).rowcount == 0
            assert conn.execute(touch, (tenants[ALICE][table],)).rowcount == 1  # positive control
            steal = sql.SQL("update public.{} set user_id = %s where id = %s").format(sql.Identifier(table))
            assert conn.execute(steal, (ALICE, tenants[BOB][table])).rowcount == 0
            delete = sql.SQL("delete from public.{} where id = %s").format(sql.Identifier(table))
            assert conn.execute(delete, (tenants[BOB][table],)).rowcount == 0
        # A user cannot give a row away either: the new row must still be theirs.
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
            with scoped_transaction(conn, user_claims(ALICE)):
                conn.execute(steal, (BOB, tenants[ALICE][table]))
        # Seen as the superuser: Bob's row is intact.
        assert _count(conn, table, "id = %s and user_id = %s", (tenants[BOB][table], BOB)) == 1
        with scoped_transaction(conn, user_claims(BOB)):  # positive control: the owner can delete
            assert conn.execute(delete, (tenants[BOB][table],)).rowcount == 1


@pytest.mark.parametrize("table", USER_OWNED_TABLES)
def test_anon_sees_and_writes_nothing(target_url: str, tenants: Any, table: str) -> None:
    with psycopg.connect(target_url, autocommit=True) as conn:
        with scoped_transaction(conn, anon_claims()):
            assert _count(conn, table) == 0
            delete = sql.SQL("delete from public.{}").format(sql.Identifier(table))
            assert conn.execute(delete).rowcount == 0
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            with scoped_transaction(conn, anon_claims()):
                insert_row(conn, table, row_values(table, ALICE, tenants[ALICE]))
        assert _count(conn, table) == 2


@pytest.mark.parametrize("table", USER_OWNED_TABLES)
def test_service_role_sees_every_tenant(target_url: str, tenants: Any, table: str) -> None:
    with (
        psycopg.connect(target_url, autocommit=True) as conn,
        scoped_transaction(conn, service_role_claims()),
    ):
        assert _count(conn, table) == 2
        assert _count(conn, table, "user_id = %s", (BOB,)) == 1


def test_scoped_transaction_refuses_to_nest_inside_an_open_transaction(target_url: str) -> None:
    """A savepoint would let SET LOCAL ROLE outlive the block; the helper must refuse instead."""
    from pgferry.db.rls import ClaimsError

    with psycopg.connect(target_url) as conn:
        conn.execute("select 1")  # psycopg opened a transaction implicitly
        with pytest.raises(ClaimsError, match="already in a transaction"):
            with scoped_transaction(conn, user_claims(ALICE)):
                pass
        conn.rollback()
        with scoped_transaction(conn, user_claims(ALICE)):
            assert conn.execute("select current_user").fetchone() == ("authenticated",)
        assert conn.execute("select current_user").fetchone() == ("postgres",)


def test_claims_with_unknown_role_are_refused(target_url: str) -> None:
    from pgferry.db.rls import ClaimsError

    with psycopg.connect(target_url, autocommit=True) as conn, pytest.raises(ClaimsError):
        with scoped_transaction(conn, {"role": "postgres", "sub": str(ALICE)}):
            pass


# -- privileges that RLS does not govern ---------------------------------------------------------------------------

_POLICY_PRIVILEGES = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE"})  # each one checked against the policies
_EXPECTED_TABLE_PRIVILEGES = {"anon": _POLICY_PRIVILEGES, "authenticated": _POLICY_PRIVILEGES}


def test_effective_privileges_of_every_role_on_every_table_are_no_wider_than_the_policies_need(
    target_url: str,
) -> None:
    """Every role, every table in public, every privilege: the API roles hold only what RLS governs, service_role
    (a server key that bypasses RLS anyway) holds everything, every other role (but superusers) holds nothing."""
    with psycopg.connect(target_url, autocommit=True) as conn:
        version = conn.execute("show server_version_num").fetchone()
        assert version is not None
        privileges = ["SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER"]
        if int(str(version[0])) >= 170000:
            privileges.append("MAINTAIN")
        roles = [
            str(r[0])
            for r in conn.execute("select rolname from pg_roles where rolname !~ '^pg_' and not rolsuper").fetchall()
        ]
        tables = [
            str(r[0])
            for r in conn.execute(
                "select relname from pg_class where relnamespace = 'public'::regnamespace and relkind in ('r', 'p')"
            ).fetchall()
        ]
        assert {"anon", "authenticated", "service_role", "authenticator"} <= set(roles)
        assert set(USER_OWNED_TABLES) <= set(tables)
        wider: dict[tuple[str, str], set[str]] = {}
        for role in roles:
            expected = set(privileges) if role == "service_role" else _EXPECTED_TABLE_PRIVILEGES.get(role, set())
            for table in tables:
                held = {
                    privilege
                    for privilege in privileges
                    if conn.execute(
                        "select has_table_privilege(%s, %s, %s)", (role, f"public.{table}", privilege)
                    ).fetchone()
                    == (True,)
                }
                if held != expected:
                    wider[(role, table)] = held ^ expected
        assert wider == {}, wider
        for role in ("anon", "authenticated"):  # setval on the identity sequence would break everyone's inserts
            row = conn.execute(
                "select has_sequence_privilege(%s, 'public.observability_events_id_seq', 'UPDATE')", (role,)
            ).fetchone()
            assert row == (False,), role
        row = conn.execute(
            "select has_sequence_privilege('authenticated', 'public.observability_events_id_seq', 'USAGE')"
        ).fetchone()
        assert row == (True,)  # inserts as the user still draw ids


@pytest.mark.parametrize(
    "statement",
    [
        "truncate public.tasks cascade",
        "create trigger spy before insert on public.tasks for each row execute function public.set_updated_at()",
        "alter table public.workflows add constraint grab foreign key (id) references public.tasks (id)",
        "select setval('public.observability_events_id_seq', 1)",
    ],
)
def test_a_user_cannot_step_around_rls_with_table_privileges(target_url: str, tenants: Any, statement: str) -> None:
    """TRUNCATE ignores RLS (Alice's truncate used to remove Bob's rows); triggers and foreign keys reach rows
    RLS hides; setval breaks everyone's next insert. All refused; Bob's rows are intact."""
    with psycopg.connect(target_url, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            with scoped_transaction(conn, user_claims(ALICE)):
                conn.execute(statement)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            with scoped_transaction(conn, anon_claims()):
                conn.execute(statement)
        assert _count(conn, "tasks", "user_id = %s", (BOB,)) == 1
        with scoped_transaction(conn, user_claims(ALICE)):  # positive control: what the policies need still works
            assert conn.execute("delete from public.tasks where id = %s", (tenants[ALICE]["tasks"],)).rowcount == 1
