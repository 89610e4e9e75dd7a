"""``--schema-from source``: dump the source's schema, adapt it to Supabase, apply it, and undo it exactly.

The database tests run against real servers (once per installed PostgreSQL). The source is Neon-shaped
(pgvector in ``public``); ``baseline_url`` is Supabase-shaped (``extensions`` schema, no pgvector yet) and
``blank_url`` a plain database, so the same dump must land with pgvector in ``extensions`` on one and in
``public`` on the other, and be the same schema everywhere else.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from pgferry.db.programs import PostgresProgramError, find_pg_tool, program_major
from pgferry.migrate.source_schema import (
    MANAGED_SCHEMAS,
    ExtensionMember,
    SchemaApplyError,
    SchemaDumpError,
    SchemaInventory,
    SchemaRewriteError,
    _dump,
    _sql,
    apply_schema_sql,
    drop_statements,
    dump_source_schema,
    rewrite_extension_schemas,
    rewrite_for_target,
    schema_sql_for_target,
    take_inventory,
)

# Every kind of object the schema phase has to carry, in a schema of its own so it does not clash with
# the platform tables the source already has.
FIDELITY_SQL = """
create schema app;
create type app.mood as enum ('sad', 'ok', 'happy', 'it''s complicated');
create domain app.positive_int as integer check (value > 0);
create type app.point3 as (x double precision, y double precision, z double precision);
create sequence app.ticket_seq start 1000 increment 5;
create table app.customers (
  id bigint generated always as identity primary key,
  name text not null,
  mood app.mood not null default 'ok',
  score app.positive_int,
  available tstzrange,
  location app.point3,
  obsolete int,
  name_upper text generated always as (upper(name)) stored
);
alter table app.customers drop column obsolete;
create table app."Order" (
  "select" integer primary key,
  customer_id bigint not null references app.customers(id) on delete cascade,
  ticket bigint not null default nextval('app.ticket_seq'),
  "Amount" numeric(12,2)
);
comment on table app."Order" is 'orders; a comment with a semicolon';
create table app.events (id bigint, happened_at timestamptz not null, payload jsonb)
  partition by range (happened_at);
create table app.events_2025 partition of app.events for values from ('2025-01-01') to ('2026-01-01');
create table app.events_2026 partition of app.events for values from ('2026-01-01') to ('2027-01-01');
create table app.docs (id serial primary key, body text, embedding public.vector(3));
create index docs_embedding_idx on app.docs using hnsw (embedding public.vector_cosine_ops);
create function app.nearest(q public.vector, k int) returns setof app.docs language sql stable
  as $$ select * from app.docs order by embedding operator(public.<=>) q limit k $$;
create function app.order_total(c bigint) returns numeric language sql stable
  begin atomic
    select case when count(*) = 0 then 0 else sum("Amount") end from app."Order" where customer_id = c;
  end;
create function app.doc_distance(a int, b int) returns double precision language plpgsql stable
  set search_path = public
  as $$ begin
    return (select d1.embedding <=> d2.embedding from app.docs d1, app.docs d2 where d1.id = a and d2.id = b);
  end $$;
create view app.customer_totals as select c.id, c.name, app.order_total(c.id) as total from app.customers c;
create view app.similar_docs as
  select d.id, d.embedding <=> '[1,0,0]'::public.vector as distance,
         public.cosine_distance(d.embedding, '[0,1,0]') as cd
  from app.docs d;
create materialized view app.doc_counts as select count(*) as n from app.docs;
create view app.doc_counts_view as select n from app.doc_counts;
"""


def _run(url: str, statements: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(statements.encode())


def _rows(conn: psycopg.Connection[Any], query: str) -> list[tuple[Any, ...]]:
    return conn.execute(query.encode()).fetchall()


def describe(url: str, schema: str = "app") -> dict[str, list[tuple[Any, ...]]]:
    """Schema ``schema`` as catalog facts that must survive the move unchanged.

    Rendered with the same search_path on both sides (which includes wherever pgvector lives), so
    ``vector(3)`` on the source and on the target print alike; where pgvector lives is checked separately.
    """
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("set search_path = app, public, extensions")
        conn.execute("set timezone = 'UTC'")
        ns = f"to_regnamespace('{schema}')::oid"
        return {
            "relations": _rows(
                conn,
                f"""select c.relname, c.relkind, c.relispartition, pg_get_partkeydef(c.oid),
                           pg_get_expr(c.relpartbound, c.oid), obj_description(c.oid, 'pg_class')
                    from pg_class c where c.relnamespace = {ns} order by 1""",
            ),
            "columns": _rows(
                conn,
                f"""select c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                           a.attidentity, a.attgenerated, pg_get_expr(d.adbin, d.adrelid)
                    from pg_attribute a join pg_class c on c.oid = a.attrelid
                    left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
                    where c.relnamespace = {ns} and c.relkind in ('r', 'p', 'v', 'm', 'c')
                      and a.attnum > 0 and not a.attisdropped
                    order by c.relname, a.attnum""",
            ),
            "enums": _rows(
                conn,
                f"""select t.typname, array_agg(e.enumlabel order by e.enumsortorder)
                    from pg_type t join pg_enum e on e.enumtypid = t.oid
                    where t.typnamespace = {ns} group by 1 order by 1""",
            ),
            "domains": _rows(
                conn,
                f"""select t.typname, format_type(t.typbasetype, t.typtypmod), t.typnotnull,
                           array(select pg_get_constraintdef(c.oid) from pg_constraint c
                                 where c.contypid = t.oid order by c.conname)
                    from pg_type t where t.typtype = 'd' and t.typnamespace = {ns} order by 1""",
            ),
            "constraints": _rows(
                conn,
                f"""select conname, conrelid::regclass::text, pg_get_constraintdef(oid)
                    from pg_constraint where connamespace = {ns} order by 1, 2""",
            ),
            "indexes": _rows(
                conn,
                f"""select c.relname, pg_get_indexdef(i.indexrelid) from pg_index i
                    join pg_class c on c.oid = i.indexrelid where c.relnamespace = {ns} order by 1""",
            ),
            "views": _rows(
                conn,
                f"""select relname, pg_get_viewdef(oid) from pg_class
                    where relkind in ('v', 'm') and relnamespace = {ns} order by 1""",
            ),
            "functions": _rows(
                conn,
                f"""select p.proname, pg_get_function_identity_arguments(p.oid),
                           pg_get_function_result(p.oid), p.prokind, p.provolatile, p.prosrc,
                           pg_get_function_sqlbody(p.oid), p.proconfig
                    from pg_proc p where p.pronamespace = {ns} order by 1, 2""",
            ),
            "sequences": _rows(
                conn,
                f"""select c.relname, s.seqtypid::regtype::text, s.seqstart, s.seqincrement, s.seqmax,
                           s.seqmin, s.seqcache, s.seqcycle
                    from pg_sequence s join pg_class c on c.oid = s.seqrelid
                    where c.relnamespace = {ns} order by 1""",
            ),
        }


def _type_schema(url: str, table: str, column: str) -> str:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "select n.nspname from pg_attribute a join pg_type t on t.oid = a.atttypid "
            "join pg_namespace n on n.oid = t.typnamespace "
            "where a.attrelid = to_regclass(%s) and a.attname = %s",
            (table, column),
        ).fetchone()
    assert row is not None, f"{table}.{column} does not exist"
    return str(row[0])


def _inventory(url: str) -> SchemaInventory:
    with psycopg.connect(url, autocommit=True) as conn:
        return take_inventory(conn)


# ------------------------------------------------------------------------------------------------------
# Without a database
# ------------------------------------------------------------------------------------------------------


def test_managed_schemas_cover_supabase_and_postgres() -> None:
    assert {"auth", "storage", "extensions", "realtime", "vault", "pgferry", "pg_catalog"} <= MANAGED_SCHEMAS
    assert "public" not in MANAGED_SCHEMAS


def test_split_sql_follows_psql_rules() -> None:
    text = (
        "\\restrict abc\n"
        "SET a = 1;\n"
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql\n"
        "  BEGIN ATOMIC SELECT CASE WHEN true THEN 1 ELSE 2 END; SELECT (CASE WHEN false THEN 3 END); END;\n"
        "CREATE FUNCTION g() RETURNS text AS $b$ select ';' $b$ LANGUAGE sql;\n"
        "/* a /* nested; */ comment; */ SELECT E'it\\'s;', 'x''y;', \"semi;colon\";\n"
        "-- trailing; comment\n"
        "\\unrestrict abc\n"
    )
    statements = _sql._split_sql(text)
    assert "".join(s.text for s in statements) == text
    bodies = [s.body.strip() for s in statements if s.significant]
    assert bodies[0] == "\\restrict abc"
    assert bodies[2].startswith("CREATE FUNCTION f()") and bodies[2].endswith("THEN 3 END); END;")
    assert bodies[3].endswith("LANGUAGE sql;")
    assert bodies[4] == "SELECT E'it\\'s;', 'x''y;', \"semi;colon\";"
    assert bodies[5] == "\\unrestrict abc"
    assert len(bodies) == 6
    assert [s.line for s in statements if s.significant][:3] == [1, 2, 3]


def test_server_managed_column_options_are_stripped() -> None:
    [only] = _sql._split_sql('ALTER TABLE ONLY "a"."b" ALTER COLUMN "c" SET (pg_attver=12);')
    assert _dump._strip_server_managed_options(only) is None
    [mixed] = _sql._split_sql('ALTER TABLE ONLY "a"."b" ALTER COLUMN "c" SET (pg_attver=12, n_distinct=5);')
    assert _dump._strip_server_managed_options(mixed) == 'ALTER TABLE ONLY "a"."b" ALTER COLUMN "c" SET (n_distinct=5);'


def test_dump_patterns_keep_case_and_wildcards() -> None:
    assert _dump._table_pattern("app.Order") == '"app"."Order"'
    assert _dump._table_pattern("Order") == '*."Order"'
    assert _dump._table_pattern("app.events_*") == '"app"."events_"*'
    assert _dump._dump_pattern("App") == '"App"'
    assert _dump._table_pattern("app.t[!0-9]") == '"app"."t"[^0-9]'


VECTOR_MEMBERS = [
    ExtensionMember("vector", "type", "public", "vector"),
    ExtensionMember("vector", "function", "public", "vector"),
    ExtensionMember("vector", "function", "public", "cosine_distance"),
    ExtensionMember("vector", "opclass", "public", "vector_cosine_ops"),
    ExtensionMember("vector", "operator", "public", "<=>"),
]

DUMP_WITH_VECTOR = """
CREATE SCHEMA "public";
COMMENT ON SCHEMA "public" IS 'standard public schema';
CREATE EXTENSION IF NOT EXISTS "vector" WITH SCHEMA "public";
COMMENT ON EXTENSION "vector" IS 'vector data type';
CREATE TABLE "public"."tasks" ("embedding" "public"."vector"(1536), "note" "text" DEFAULT 'public.vector');
CREATE INDEX "i" ON "public"."tasks" USING "hnsw" ("embedding" "public"."vector_cosine_ops");
CREATE VIEW "public"."v" AS
 SELECT ("embedding" OPERATOR("public".<=>) '[1]'::"public"."vector") AS "d",
    "public"."cosine_distance"("embedding", "embedding") AS "c"
   FROM "public"."tasks";
CREATE FUNCTION "public"."f"() RETURNS SETOF "public"."tasks"
    LANGUAGE "plpgsql"
    SET "search_path" TO 'public'
    AS $$ begin return query select * from public.tasks order by embedding <=> public.vector('[1]'); end $$;
"""


def test_rewrite_moves_only_extension_members() -> None:
    out = rewrite_extension_schemas(
        DUMP_WITH_VECTOR,
        {"vector": "public", "plpgsql": "pg_catalog"},
        {"plpgsql": "pg_catalog"},
        VECTOR_MEMBERS,
    )
    assert 'CREATE EXTENSION IF NOT EXISTS "vector" WITH SCHEMA "extensions";' in out
    assert "COMMENT ON EXTENSION" not in out
    assert "CREATE SCHEMA" not in out and "COMMENT ON SCHEMA" not in out
    assert '"embedding" "extensions"."vector"(1536)' in out
    assert "DEFAULT 'public.vector'" in out  # a string literal is data, not a reference
    assert '"extensions"."vector_cosine_ops"' in out
    assert 'OPERATOR("extensions".<=>)' in out
    assert '\'[1]\'::"extensions"."vector"' in out
    assert '"extensions"."cosine_distance"(' in out
    assert out.count('"public"."tasks"') == 4  # CREATE TABLE, INDEX, FROM, SETOF: not extension objects
    assert "SET \"search_path\" TO 'public', 'extensions'" in out
    assert "from public.tasks order by embedding <=> extensions.vector('[1]')" in out


def test_rewrite_keeps_extensions_the_target_has_where_they_are() -> None:
    out = rewrite_extension_schemas(DUMP_WITH_VECTOR, {"vector": "public"}, {"vector": "extensions"}, VECTOR_MEMBERS)
    assert "CREATE EXTENSION" not in out
    assert '-- pgferry: extension "vector" already exists on the target in schema "extensions"' in out
    assert '"extensions"."vector"(1536)' in out

    unchanged = rewrite_extension_schemas(
        DUMP_WITH_VECTOR, {"vector": "public"}, {}, VECTOR_MEMBERS, new_extension_schema=None
    )
    assert 'CREATE EXTENSION IF NOT EXISTS "vector" WITH SCHEMA "public";' in unchanged
    assert '"extensions"' not in unchanged


def test_rewrite_refuses_ambiguous_references() -> None:
    members = [*VECTOR_MEMBERS, ExtensionMember("vector", "function", "public", "l2_distance", shared=True)]
    # Not referenced: no problem.
    rewrite_extension_schemas(DUMP_WITH_VECTOR, {"vector": "public"}, {}, members)
    with pytest.raises(SchemaRewriteError) as err:
        rewrite_extension_schemas(
            DUMP_WITH_VECTOR + "SELECT \"public\".\"l2_distance\"('[1]', '[2]');\n",
            {"vector": "public"},
            {},
            members,
        )
    assert "public.l2_distance" in str(err.value) and "\n" not in str(err.value)


def test_drop_statements_order_and_cascade() -> None:
    before = SchemaInventory(frozenset({("schema", "public"), ("table", "public.keep"), ("extension", "plpgsql")}))
    added = {
        ("view", "app.v"),
        ("matview", "app.m"),
        ("table", 'app."Order"'),
        ("table", "app.t"),
        ("function", "app.f(integer)"),
        ("procedure", "app.p()"),
        ("sequence", "app.s"),
        ("type", "app.e"),
        ("extension", "vector"),
        ("schema", "app"),
    }
    after = SchemaInventory(before.objects | added)
    assert drop_statements(before, after) == [
        "DROP VIEW IF EXISTS app.v CASCADE",
        "DROP MATERIALIZED VIEW IF EXISTS app.m CASCADE",
        'DROP TABLE IF EXISTS app."Order", app.t CASCADE',
        "DROP PROCEDURE IF EXISTS app.p() CASCADE",
        "DROP FUNCTION IF EXISTS app.f(integer) CASCADE",
        "DROP SEQUENCE IF EXISTS app.s",
        "DROP TYPE IF EXISTS app.e",
        "DROP EXTENSION IF EXISTS vector",
        "DROP SCHEMA IF EXISTS app",
    ]
    assert drop_statements(after, after) == []


def test_find_pg_tool_picks_a_new_enough_program() -> None:
    tool = find_pg_tool("pg_dump", 15)
    assert tool.name == "pg_dump" and tool.exists()
    assert (program_major(str(tool)) or 0) >= 15


def test_find_pg_tool_explains_when_none_is_new_enough() -> None:
    with pytest.raises(PostgresProgramError) as err:
        find_pg_tool("pg_dump", 99)
    message = str(err.value)
    assert "PostgreSQL 99" in message and "PGFERRY_PG_BINDIR" in message and "\n" not in message


# ------------------------------------------------------------------------------------------------------
# Against real servers
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("target_fixture", "vector_schema"), [("baseline_url", "extensions"), ("blank_url", "public")])
def test_fidelity_schema_arrives_identical(
    source_url: str, target_fixture: str, vector_schema: str, request: pytest.FixtureRequest
) -> None:
    target = request.getfixturevalue(target_fixture)
    _run(source_url, FIDELITY_SQL)

    dump = dump_source_schema(source_url)
    assert "pg_attver" not in dump
    apply_schema_sql(target, rewrite_for_target(dump, source_url, target))

    expected = describe(source_url)
    if vector_schema != "public":
        # The two intended differences: the routine's pinned search_path gains the extensions schema, and
        # the qualified operator in a function body follows pgvector.
        expected["functions"] = [
            (
                *row[:5],
                row[5].replace("operator(public.<=>)", f"operator({vector_schema}.<=>)"),
                row[6],
                [f"search_path=public, {vector_schema}"] if row[7] == ["search_path=public"] else row[7],
            )
            for row in expected["functions"]
        ]
    actual = describe(target)
    for section, rows in expected.items():
        assert actual[section] == rows, section

    assert _type_schema(target, "app.docs", "embedding") == vector_schema
    with psycopg.connect(target, autocommit=True) as conn:
        opclass_schema = conn.execute(
            "select n.nspname from pg_index i join pg_opclass o on o.oid = i.indclass[0] "
            "join pg_namespace n on n.oid = o.opcnamespace "
            "where i.indexrelid = 'app.docs_embedding_idx'::regclass"
        ).fetchone()
        assert opclass_schema == (vector_schema,)
        # The objects work, not just exist: bodies and views resolve pgvector where the target has it.
        conn.execute("set search_path = ''")
        conn.execute("insert into app.docs (body, embedding) values ('a', '[1,0,0]'), ('b', '[0,1,0]')")
        conn.execute("insert into app.customers (name, mood, score) values ('Ada', 'happy', 3)")
        conn.execute("""insert into app."Order" ("select", customer_id, "Amount") values (1, 1, 12.5)""")
        conn.execute("insert into app.events (id, happened_at) values (1, '2026-03-01')")
        assert conn.execute("select app.doc_distance(1, 2)").fetchone() == (pytest.approx(1.0),)  # cosine
        assert conn.execute("select n.id from app.docs d, app.nearest(d.embedding, 1) n where d.id = 2").fetchone() == (
            2,
        )
        assert conn.execute("select id, distance from app.similar_docs order by id").fetchall() == [
            (1, 0.0),
            (2, pytest.approx(1.0)),
        ]
        assert conn.execute(
            "select name_upper, total from app.customers join app.customer_totals using (id)"
        ).fetchone() == (
            "ADA",
            12.5,
        )
        assert conn.execute("""select ticket from app."Order" """).fetchone() == (1000,)
        assert conn.execute("select tableoid::regclass::text from app.events").fetchone() == ("app.events_2026",)


def test_platform_tables_get_vector_from_the_extensions_schema(source_url: str, baseline_url: str) -> None:
    apply_schema_sql(baseline_url, schema_sql_for_target(source_url, baseline_url))
    assert _type_schema(baseline_url, "public.tasks", "embedding") == "extensions"
    with psycopg.connect(baseline_url, autocommit=True) as conn:
        conn.execute("set search_path = ''")
        assert conn.execute(
            "select format_type(atttypid, atttypmod) from pg_attribute "
            "where attrelid = 'public.tasks'::regclass and attname = 'embedding'"
        ).fetchone() == ("extensions.vector(1536)",)
        assert conn.execute(
            "select extnamespace::regnamespace::text from pg_extension where extname = 'vector'"
        ).fetchone() == ("extensions",)
        assert conn.execute("select to_regnamespace('app')").fetchone() == (None,)


def test_managed_schemas_are_never_dumped(source_url: str) -> None:
    _run(
        source_url,
        "create schema auth; create table auth.sessions (id uuid primary key);"
        "create schema storage; create table storage.objects (id uuid primary key);"
        "create schema extensions; create table extensions.helper (id int);",
    )
    dump = dump_source_schema(source_url)
    for schema in ("auth", "storage", "extensions"):
        assert f'"{schema}"' not in dump, schema
    assert 'CREATE TABLE "public"."tasks"' in dump


def test_filtered_dumps_bring_their_schema_and_extensions(source_url: str, blank_url: str) -> None:
    _run(source_url, FIDELITY_SQL)

    only_app = dump_source_schema(source_url, schemas=["app"])
    assert 'CREATE EXTENSION IF NOT EXISTS "vector"' in only_app
    assert '"public"."tasks"' not in only_app and 'CREATE TABLE "app"."docs"' in only_app

    some_tables = dump_source_schema(source_url, tables=["app.docs", "app.events*"], exclude_tables=["events_2025"])
    assert 'CREATE SCHEMA IF NOT EXISTS "app";' in some_tables
    assert 'CREATE EXTENSION IF NOT EXISTS "vector"' in some_tables
    assert '"app"."events_2025"' not in some_tables and '"app"."customers"' not in some_tables
    apply_schema_sql(blank_url, rewrite_for_target(some_tables, source_url, blank_url))
    with psycopg.connect(blank_url) as conn:
        present = conn.execute(
            "select to_regclass('app.docs'), to_regclass('app.events_2026'), to_regclass('app.customers')"
        ).fetchone()
    assert present == ("app.docs", "app.events_2026", None)


def test_failed_apply_leaves_target_unchanged(source_url: str, target_url: str) -> None:
    _run(source_url, FIDELITY_SQL)  # `create schema app` comes first and succeeds before the clash
    sql = schema_sql_for_target(source_url, target_url)
    before = _inventory(target_url)
    with pytest.raises(SchemaApplyError) as err:
        apply_schema_sql(target_url, sql)
    message = str(err.value)
    assert "\n" not in message
    assert "already exists" in err.value.server_message
    assert err.value.statement.startswith("CREATE ") and err.value.statement in message
    assert "schema changes were rolled back (one transaction)" in message and "--schema-from target" not in message
    assert _inventory(target_url) == before


def test_apply_reports_a_missing_role_with_a_hint(blank_url: str) -> None:
    with pytest.raises(SchemaApplyError) as err:
        apply_schema_sql(
            blank_url,
            "CREATE TABLE public.t (a int);\nCREATE POLICY p ON public.t TO no_such_role_here USING (true);\n",
        )
    assert err.value.line == 2
    assert "no_such_role_here" in err.value.server_message and "--no-owner" in err.value.hint
    with psycopg.connect(blank_url) as conn:
        assert conn.execute("select to_regclass('public.t')").fetchone() == (None,)


def test_apply_handles_psql_meta_commands_and_unknown_settings(blank_url: str) -> None:
    apply_schema_sql(
        blank_url,
        "\\restrict k3y\nSET no_such_setting_anywhere = 0;\nCREATE TABLE public.t (a int);\n\\unrestrict k3y\n",
    )
    with psycopg.connect(blank_url) as conn:
        assert conn.execute("select to_regclass('public.t')").fetchone() == ("t",)
    with pytest.raises(SchemaApplyError) as err:
        apply_schema_sql(blank_url, "CREATE TABLE public.u (a int);\n\\connect other\n")
    assert "\\connect" in str(err.value)
    with psycopg.connect(blank_url) as conn:
        assert conn.execute("select to_regclass('public.u')").fetchone() == (None,)


def test_drop_statements_return_the_target_to_before(source_url: str, baseline_url: str) -> None:
    _run(source_url, FIDELITY_SQL)
    before = _inventory(baseline_url)
    apply_schema_sql(baseline_url, schema_sql_for_target(source_url, baseline_url))
    after = _inventory(baseline_url)
    added = after.added_since(before)
    assert {
        ("schema", "app"),
        ("table", 'app."Order"'),
        ("table", "app.events_2025"),
        ("view", "app.similar_docs"),
        ("matview", "app.doc_counts"),
        ("sequence", "app.ticket_seq"),
        ("type", "app.mood"),
        ("type", "app.positive_int"),
        ("type", "app.point3"),
        ("function", "app.order_total(bigint)"),
        ("function", "app.nearest(extensions.vector,integer)"),
        ("extension", "vector"),
        ("table", "public.tasks"),
    } <= added
    assert not any(kind == "type" and "vector" in identity for kind, identity in added)  # pgvector's own

    with psycopg.connect(baseline_url, autocommit=True) as conn:
        with conn.transaction():
            for statement in drop_statements(before, after):
                conn.execute(statement.encode())
        assert take_inventory(conn) == before
        # Supabase's own objects, outside the inventory, are untouched.
        assert conn.execute("select to_regclass('auth.users'), to_regnamespace('extensions')::text").fetchone() == (
            "auth.users",
            "extensions",
        )


def test_dump_errors_never_show_the_password(source_url: str) -> None:
    secret = "hunter2-not-for-logs"
    with pytest.raises(SchemaDumpError) as refused:
        dump_source_schema(f"postgresql://postgres:{secret}@127.0.0.1:1/nowhere")
    assert secret not in str(refused.value) and "\n" not in str(refused.value)

    # Trust authentication ignores the password, so pg_dump itself runs and fails on the filter.
    with_password = source_url.replace("postgres@", f"postgres:{secret}@", 1)
    with pytest.raises(SchemaDumpError) as failed:
        dump_source_schema(with_password, tables=["no_such_schema.no_such_table"])
    assert "no matching tables" in str(failed.value)
    assert secret not in str(failed.value) and "\n" not in str(failed.value)
