"""Fidelity: every PostgreSQL type a real schema uses arrives identical, on PostgreSQL 15 → 15 and 15 → 18.

The source is a Neon-shaped database (pgvector in ``public``) holding a schema built to be hard to copy:
numerics at full precision and NaN/±Infinity, floats down to subnormals and ``-0``, infinite and BC
timestamps, intervals, every byte value, ``json`` whose exact text matters, arrays (multi-dimensional, with
NULLs, with non-default bounds, of an enum), enums, domains, composite types, ranges and multiranges,
network types, vectors, identity and generated columns, a partitioned table, quoted and reserved
identifiers, a table with a dropped column, a table without a primary key, and rows of several MB.

Each test moves it with ``--schema-from source`` and then checks the result with queries of its own
(every row's text form with output settings pinned, typed values fetched into Python, catalog facts), not
only with pgferry's verifier, whose own ability to notice a changed row is tested separately.
"""

from __future__ import annotations

import json
import math
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pgferry.migrate import Migration, MigrationSummary, VerificationFailedError
from tests.migrate_helpers import service_for

BATCH_ROWS = 400
"""Small enough that the keyed tables (3,000 and 1,200 rows) and the keyless one split into several chunks."""

# Values whose exact text is the point; inserted as parameters so the expectations below are these strings.
JSON_TEXTS: dict[int, str] = {
    1: '{"b": 1,   "a": 2, "a": 3}',
    2: "  [1, 2.50, 1e2, -0, 1.0000000000000000000001 ]\n",
    3: '{"nul": "\\u0000", "emoji": "\\ud83d\\ude00", "raw": "🙂", "tab": "\\t", "slash": "\\/"}',
    4: '{\n\t"nested": {"deep": [[], [{}], [[[null]]]]}\r\n}',
    5: '"just a string"',
    6: "null",
    7: "12345678901234567890.12345678901234567890",
}
JSONB_TEXTS: dict[int, str] = {
    1: '{"z": [1, [2, [3, null]]], "ü": "\\u00fc\\n\\"q\\"", "num": 1.000000000000000000001}',
    2: '{"big": 123456789012345678901234567890, "e": 1e-7, "esc": "\\\\", "emoji": "\\ud83d\\ude00"}',
    3: "[]",
    4: '{"a": {"b": {"c": [true, false, null, "x\\u0001y"]}}}',
    5: '{"dup": 1, "dup": 2}',
    6: "null",
    7: '"\\u2028 line separator"',
}
AWKWARD_TEXT = (
    "tab\there\nnew line\r\nback\\slash \\N \\. \n\\.\n\x01\x02\x1b\x7f é ß 🙂 \u2028 'single' \"double\" "
    "{braces} (parens) ,comma; semicolon"
)
ORDER_KEYS = ("alpha", "Beta", "Zoë", "with space", "quote's", "comma,", 'a"b', "back\\slash", "", "🙂", "ÄÖÜ", "zz")
BIG_KEY_BASE = 9_007_199_254_740_993  # 2**53 + 1: exact in bigint, not in a float
FIVE_MB = 5 * 1024 * 1024
THREE_MB = 3 * 1024 * 1024

FIDELITY_SQL = r"""
create extension if not exists vector;
create schema app;
create schema "Sales";

create type app.mood as enum ('sad', 'ok', 'happy', 'it''s complicated', 'naïve 🙂');
create domain app.percent as numeric(5, 2) constraint percent_range check (value >= 0 and value <= 100);
create domain app.email as text constraint email_has_at check (value like '%@%');
create type app.pair as (label text, amount numeric, at timestamptz, tags text[]);
create type app.floatrange as range (subtype = float8, subtype_diff = float8mi);

-- Numbers at the edges of what each type holds.
create table app.numbers (
  id int primary key,
  n numeric,
  n_fixed numeric(60, 20),
  f4 real,
  f8 double precision,
  i2 smallint,
  i8 bigint,
  pct app.percent
);
insert into app.numbers values
  (1, 12345678901234567890123456789.12345678901234567890,
      1234567890123456789012345678901234567890.12345678901234567891, 'NaN', 'NaN', 32767, 9223372036854775807, 100),
  (2, 'NaN', -0.00000000000000000001, 'Infinity', 'Infinity', -32768, -9223372036854775808, 0),
  (3, 'Infinity', 0, '-Infinity', '-Infinity', 0, 0, 33.33),
  (4, '-Infinity', null, '-0', '-0', null, null, null),
  (5, 0.000000000000000000000000000000000000000000000000001, 1.50000000000000000000, 1.4e-45, 4.9e-324, 1, 1, 0.01),
  (6, ('1' || repeat('0', 130))::numeric, -9999999999999999999999999999999999999999.99999999999999999999,
      3.4028235e38, 1.7976931348623157e308, -1, -1, 99.99),
  (7, -123.4500, 0.00000000000000000001, 1.17549435e-38, 2.2250738585072009e-308, 2, 2, 50),
  (8, 0.1, 0.1, 0.1, 0.1, 3, 3, 12.5);

-- Times: infinities, BC, the largest values, microseconds, offsets.
create table app.times (
  id int primary key,
  ts timestamp,
  tstz timestamptz,
  d date,
  t time,
  ttz timetz,
  iv interval
);
insert into app.times values
  (1, 'infinity', 'infinity', 'infinity', '24:00:00', '23:59:59.999999+15:59',
      '1 year 2 mons 3 days 04:05:06.789012'),
  (2, '-infinity', '-infinity', '-infinity', '00:00:00', '00:00:00-15:59', '-1 mons +2 days -00:00:00.000001'),
  (3, '4713-01-01 00:00:00 BC', '4713-01-01 00:00:00+00 BC', '4713-01-01 BC', '12:00:00.000001', '12:00:00+05:45',
      '178000000 years'),
  (4, '294276-12-31 23:59:59.999999', '294276-12-31 23:59:59.999999+00', '5874897-12-31', '23:59:59.999999',
      '00:00:00+00', '-178000000 years'),
  (5, '2024-02-29 23:59:59.999999', '2024-02-29 23:59:59.999999+05:45', '0001-01-01', '12:34:56.789',
      '12:34:56.789-03:30', '1 day -1 second'),
  (6, '0044-03-15 12:00:00 BC', '4714-11-24 00:00:00+00 BC', '4714-11-24 BC', null, null,
      '3 mons 40 days 100:00:00.5'),
  (7, null, null, null, null, null, null);

-- Bytes, text with control characters, and the small scalar types.
create table app.scalars (
  id int primary key,
  b bytea,
  t text,
  c char(6),
  vc varchar(12),
  bits bit(12),
  vb varbit,
  flag boolean,
  u uuid,
  email app.email,
  mood app.mood,
  ch "char",
  tsv tsvector,
  pt point
);
insert into app.scalars values
  (1, (select decode(string_agg(lpad(to_hex(g), 2, '0'), '' order by g), 'hex') from generate_series(0, 255) g),
      null, 'ab', 'short', B'101010101010', B'1', true, '00000000-0000-0000-0000-000000000000', 'a@b.c', 'happy',
      'x', 'a fat cat sat:1A on a mat', '(1.5,-0)'),
  (2, (select decode(string_agg(lpad(to_hex(g), 2, '0'), '' order by g desc), 'hex') from generate_series(0, 255) g),
      'plain', 'abcdef', 'twelve chars', B'000000000000', B'', false, 'ffffffff-ffff-ffff-ffff-ffffffffffff',
      'x@y', 'it''s complicated', '"', '''quoted'' ''with space'':2', '(1e300,-1e-300)'),
  (3, '\x'::bytea, '', '', '', null, null, null, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', null, 'naïve 🙂', null,
      '', '(NaN,Infinity)'),
  (4, null, null, null, null, null, null, null, null, null, null, null, null, null);

-- json keeps its text byte for byte; jsonb its canonical form.
create table app.json_docs (id int primary key, j json, jb jsonb);

-- Arrays: NULL elements, several dimensions, non-default bounds, of an enum (binary COPY would embed its OID).
create table app.arrays (
  id int primary key,
  ints int[],
  matrix int[][],
  cube int[],
  texts text[],
  text_grid text[],
  moods app.mood[],
  mood_grid app.mood[][],
  nums numeric[],
  floats float8[],
  stamps timestamptz[],
  bounded int[],
  docs jsonb[],
  emails app.email[]
);
insert into app.arrays values
  (1, '{1,NULL,3}', '{{1,2},{3,4}}', '{{{1,2},{3,4}},{{5,6},{7,NULL}}}',
      array['a,b', 'c"d', 'NULL', null, '', 'x y', 'back\slash', '{braces}', E'new\nline', ' lead', 'trail '],
      '{{"a","b"},{NULL,"NULL"}}', '{happy,"it''s complicated","naïve 🙂"}', '{{sad,ok},{happy,NULL}}',
      '{1.10,NaN,-0.000000000000000000001,Infinity,-Infinity}', '{NaN,Infinity,-Infinity,-0,4.9e-324}',
      '{infinity,-infinity,"2024-01-01 00:00:00+00","4713-01-01 00:00:00+00 BC"}', '[0:2]={7,8,9}',
      array['{"a": [1, 2]}'::jsonb, 'null'::jsonb, null], '{a@b,"c d@e"}'),
  (2, '{}', '{{NULL,NULL}}', '[-5:-4][1:1]={{1},{2}}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '[5:5]={NULL}',
      '{}', '{}'),
  (3, null, null, null, null, null, null, null, null, null, null, null, null, null);

-- Ranges and multiranges: empty, unbounded, infinite bounds, a user-defined range.
create table app.ranges (
  id int primary key,
  i4 int4range,
  i8 int8range,
  tstz tstzrange,
  ts tsrange,
  num numrange,
  d daterange,
  fr app.floatrange,
  mr int4multirange,
  nmr nummultirange
);
insert into app.ranges values
  (1, 'empty', 'empty', 'empty', 'empty', 'empty', 'empty', 'empty', '{}', '{}'),
  (2, '(,)', '(,)', '(,)', '(,)', '(,)', '(,)', '(,)', '{(,)}', '{(,)}'),
  (3, '[1,10)', '[-9223372036854775808,9223372036854775807)', '[2024-01-01 00:00:00+00,infinity)',
      '(-infinity,2024-01-01 12:00:00]', '[0.1,0.30000000000000000001]', '[4713-01-01 BC,2024-01-01)',
      '[-Infinity,1.5]', '{[1,3),[5,7),[10,)}', '{[0.5,1.5],(2,3)}'),
  (4, '(,5]', '[0,1]', '("2024-03-31 02:30:00+02","2024-03-31 03:30:00+02")', '[2024-01-01,2024-01-01]',
      '(,NaN]', '[infinity,infinity]', '(-1e-300,1e300)', '{(,-5],[0,0]}', '{[-Infinity,Infinity]}'),
  (5, null, null, null, null, null, null, null, null, null);

create table app.net (id int primary key, ip inet, net cidr, mac macaddr, mac8 macaddr8);
insert into app.net values
  (1, '192.168.0.1/24', '10.0.0.0/8', '08:00:2b:01:02:03', '08:00:2b:01:02:03:04:05'),
  (2, '::ffff:1.2.3.4', '2001:db8::/32', 'ff:ff:ff:ff:ff:ff', '08:00:2b:ff:fe:01:02:03'),
  (3, '2001:db8::1/64', '192.168.1.0/24', '00:00:00:00:00:00', '00:00:00:00:00:00:00:00'),
  (4, '0.0.0.0/0', '0.0.0.0/0', null, null),
  (5, '255.255.255.255', '::/0', '0a:0b:0c:0d:0e:0f', 'ff:ff:ff:ff:ff:ff:ff:ff');

-- Vectors (pgvector in public, as on Neon), with an HNSW index the indexes phase has to rebuild.
create table app.embeddings (id int primary key, small vector(3), big vector(1536), note text);
insert into app.embeddings values
  (1, '[1,2,3]', (select ('[' || string_agg(sin(g * 0.37)::real::text, ',' order by g) || ']')::vector
                  from generate_series(1, 1536) g), 'sines'),
  (2, '[-0.5,1e-7,3.4e38]', (select ('[' || string_agg(((g * 37 % 1000)::real / 997)::text, ',' order by g) || ']')
                  ::vector from generate_series(1, 1536) g), 'ramps'),
  (3, '[0,0,0]', (select ('[' || string_agg(case when g = 1 then '1' else '0' end, ',' order by g) || ']')::vector
                  from generate_series(1, 1536) g), 'unit'),
  (4, '[1.1754944e-38,-0,0.1]', null, 'tiny'),
  (5, null, null, null);
create index embeddings_small_hnsw on app.embeddings using hnsw (small vector_cosine_ops);

-- Identity (always, with its own start and step; by default, with explicit ids) and generated columns.
create table app.gen_always (
  id bigint generated always as identity (start with 100 increment by 3) primary key,
  a int not null,
  b int not null,
  name text,
  total int generated always as (a * 10 + b) stored,
  label text generated always as (upper(name) || '!') stored
);
insert into app.gen_always (a, b, name) select g, g % 7, 'row ' || g from generate_series(1, 25) g;
create table app.gen_default (id int generated by default as identity primary key, note text);
insert into app.gen_default (note) select 'auto ' || g from generate_series(1, 10) g;
insert into app.gen_default (id, note) values (-5, 'explicit, below the sequence');
create table app.serials (id bigserial primary key, note text);
insert into app.serials (note) select 'serial ' || g from generate_series(1, 7) g;

-- A partitioned table: range partitions and a default one, all with rows.
create table app.events (
  id bigint not null,
  at timestamptz not null,
  kind app.mood not null,
  payload jsonb,
  primary key (id, at)
) partition by range (at);
create table app.events_2024 partition of app.events for values from ('2024-01-01 00:00+00') to ('2025-01-01 00:00+00');
create table app.events_2025 partition of app.events for values from ('2025-01-01 00:00+00') to ('2026-01-01 00:00+00');
create table app.events_other partition of app.events default;
create index events_kind_idx on app.events (kind);
insert into app.events
  select g, timestamptz '2024-01-01 00:00+00' + g * interval '12 hours', (enum_range(null::app.mood))[1 + g % 5],
         jsonb_build_object('g', g)
  from generate_series(0, 1400) g;
insert into app.events values
  (-1, '-infinity', 'sad', null), (-2, 'infinity', 'ok', '{}'), (-3, '4713-01-01 00:00:00+00 BC', 'happy', '[]');

-- Quoted and reserved identifiers, a composite text + int key, in a mixed-case schema.
create table "Sales"."Order" (
  "from" text not null,
  "select" int not null,
  "User Name" text,
  "where" jsonb,
  "Group" app.mood,
  primary key ("from", "select")
);
create table "Sales"."line.items v2" ("Id" int primary key, "ORDER" text, "user" text);
insert into "Sales"."line.items v2" values (1, 'first', 'alice'), (2, null, 'bob');

-- A column dropped after rows were written, and one added after that.
create table app.dropped (id int primary key, keep1 text, gone text, keep2 int);
insert into app.dropped select g, 'keep ' || g, 'gone ' || g, g * 2 from generate_series(1, 50) g;
alter table app.dropped drop column gone;
alter table app.dropped add column added numeric default 1.5;
insert into app.dropped (id, keep1, keep2, added)
  select g, 'later ' || g, g * 3, g / 7.0 from generate_series(51, 90) g;

-- A large integer key, chunked by arithmetic ranges.
create table app.big_keys (id bigint primary key, payload text not null, amount numeric(20, 4));
insert into app.big_keys
  select 9007199254740993 + g * 1000, md5(g::text), g * 1.0001 from generate_series(1, 3000) g;

-- No primary key, with duplicate rows (including all-NULL ones), chunked by block ranges.
create table app.no_pk (label text, n int, pad text);
insert into app.no_pk select 'dup ' || (g % 400), g % 400, repeat('x', 150) from generate_series(1, 1200) g;
insert into app.no_pk values (null, null, null), (null, null, null), ('same', 1, 'same'), ('same', 1, 'same');

-- Composite types (binary COPY embeds their field OIDs) and a user-defined range.
create table app.composites (id int primary key, p app.pair, ps app.pair[], fr app.floatrange);
insert into app.composites values
  (1, row('a,b "c" (d)', 1.50, '2024-01-01 00:00+00', array['x', 'y,z', null])::app.pair,
      array[row(E'nested\\ \n', 'NaN', 'infinity', '{}')::app.pair, null], '[0.5,1e300)'),
  (2, row(null, null, null, null)::app.pair, '{}', 'empty'),
  (3, null, null, null);

-- Rows of several MB.
create table app.huge (id int primary key, body text, blob bytea);
"""

HUGE_SQL = """
insert into app.huge select 1, string_agg(md5(g::text), '' order by g), null from generate_series(1, {text_md5s}) g;
update app.huge set blob = (
  select decode(string_agg(md5((-g)::text), '' order by g), 'hex') from generate_series(1, {blob_md5s}) g)
where id = 1;
insert into app.huge
  select 2, string_agg(md5(g::text) || 'é🙂', E'\\n' order by g), '\\x' from generate_series(1, 140000) g;
insert into app.huge values (3, 'small', '\\x00ff');
"""

TABLES_SQL = """
select n.nspname, c.relname, c.relkind::text
from pg_class c join pg_namespace n on n.oid = c.relnamespace
where c.relkind in ('r', 'p') and n.nspname in ('app', 'Sales', 'public')
order by 1, 2
"""

PINNED = (
    "set timezone = 'UTC'; set datestyle = 'ISO, YMD'; set intervalstyle = 'postgres'; "
    "set extra_float_digits = 1; set bytea_output = 'hex'"
)


def build_fidelity_source(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(FIDELITY_SQL)
        conn.execute(HUGE_SQL.format(text_md5s=FIVE_MB // 32, blob_md5s=THREE_MB // 16))
        with conn.cursor() as cur:
            cur.executemany(
                "insert into app.json_docs values (%s, %s::json, %s::jsonb)",
                [(i, JSON_TEXTS[i], JSONB_TEXTS[i]) for i in JSON_TEXTS],
            )
            cur.execute("insert into app.json_docs values (8, null, null)")
            cur.execute("update app.scalars set t = %s where id = 1", (AWKWARD_TEXT,))
            cur.executemany(
                'insert into "Sales"."Order" values (%s, %s, %s, %s, %s)',
                [
                    (key, n, f"{key} user {n}" if n % 10 else None, json.dumps({"n": n}), ("sad", "ok", "happy")[n % 3])
                    for key in ORDER_KEYS
                    for n in range(-50, 50)
                ],
            )
        conn.execute("analyze")


def qualified(schema: str, name: str) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(name))


def tables_of(url: str) -> list[tuple[str, str, str]]:
    with psycopg.connect(url) as conn:
        return [(str(s), str(n), str(k)) for s, n, k in conn.execute(TABLES_SQL)]


def rows_as_text(url: str, schema: str, name: str) -> list[str]:
    """Every row's text form, as the server prints it with output settings pinned; huge rows as md5 + length."""
    query = sql.SQL(
        "select case when octet_length(t::text) > 65536 then 'md5 ' || md5(t::text) || ' ' || octet_length(t::text) "
        "else t::text end from {} t"
    ).format(qualified(schema, name))
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(PINNED)
        return sorted(str(r[0]) for r in conn.execute(query))


def column_shapes(url: str, schema: str, name: str) -> list[tuple[str, str, str, str, bool, str | None]]:
    """Columns in physical order with type (extension schema stripped), generation, identity, nullability."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "select a.attname, format_type(a.atttypid, a.atttypmod), a.attgenerated::text, a.attidentity::text, "
            "a.attnotnull, pg_get_expr(d.adbin, d.adrelid) from pg_attribute a "
            "left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum "
            "where a.attrelid = %s::regclass and a.attnum > 0 and not a.attisdropped order by a.attnum",
            (qualified(schema, name).as_string(conn),),
        ).fetchall()
    return [(r[0], r[1].split(".")[-1], r[2], r[3], r[4], r[5] if r[2] else None) for r in rows]


def keys_and_indexes(url: str, schema: str, name: str) -> list[tuple[str, ...]]:
    """Constraints and indexes of a table as the server prints them (extension schemas stripped)."""
    ext = vector_schema(url)
    with psycopg.connect(url) as conn:
        oid = qualified(schema, name).as_string(conn)
        rows = conn.execute(
            "select 'constraint', conname, contype::text, pg_get_constraintdef(oid) from pg_constraint "
            "where conrelid = %s::regclass and contype <> 'n' union all "  # PG18 lists NOT NULL too
            "select 'index', c.relname, concat_ws(',', i.indisprimary, i.indisunique, i.indisvalid, i.indisready), "
            "pg_get_indexdef(i.indexrelid) from pg_index i join pg_class c on c.oid = i.indexrelid "
            "where i.indrelid = %s::regclass order by 1, 2",
            (oid, oid),
        ).fetchall()
    strip = f"{ext}." if ext != "public" else "public."
    return [(str(r[0]), str(r[1]), str(r[2]), str(r[3]).replace(strip, "")) for r in rows]


def fetch(url: str, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(PINNED)
        return conn.execute(query, params).fetchall()


def vector_schema(url: str) -> str:
    rows = fetch(url, "select extnamespace::regnamespace::text from pg_extension where extname = 'vector'")
    assert rows, "pgvector is not installed"
    return str(rows[0][0])


@pytest.fixture
def fidelity_source(route_source_url: str) -> str:
    build_fidelity_source(route_source_url)
    return route_source_url


@pytest.fixture
def migrated(fidelity_source: str, route_target_url: str) -> tuple[str, str, Migration, MigrationSummary]:
    """The fidelity schema moved with ``--schema-from source``, two jobs and small chunks."""
    service = service_for(fidelity_source, route_target_url, schema_from="source", jobs=2, batch_rows=BATCH_ROWS)
    return fidelity_source, route_target_url, service, service.run()


def test_every_type_survives_the_move(migrated: tuple[str, str, Migration, MigrationSummary]) -> None:
    source, target, _service, summary = migrated
    assert summary.status == "completed"
    assert summary.verification is not None and summary.verification.ok, summary.as_dict()["verification"]

    # The same tables, the same columns, and row for row the same text, independently of pgferry's checksum.
    source_tables = tables_of(source)
    assert len(source_tables) >= 20
    assert tables_of(target) == source_tables
    for schema, name, _kind in source_tables:
        assert column_shapes(target, schema, name) == column_shapes(source, schema, name), f"{schema}.{name}"
        assert keys_and_indexes(target, schema, name) == keys_and_indexes(source, schema, name), f"{schema}.{name}"
        source_rows = rows_as_text(source, schema, name)
        target_rows = rows_as_text(target, schema, name)
        assert source_rows, f"{schema}.{name} has no rows on the source: the test would prove nothing"
        assert len(target_rows) == len(source_rows), f"{schema}.{name}"
        differing = [(s, t) for s, t in zip(source_rows, target_rows, strict=True) if s != t]
        assert not differing, f"{schema}.{name}: first difference {differing[0]!r}"
    copied = {t.table: t.rows for t in summary.tables}
    assert "app.events" not in copied and copied["app.events_other"] == 3  # leaves are copied, not the parent

    # Chunked tables really were split (otherwise the key-range paths were never exercised).
    with psycopg.connect(target) as conn:
        kinds = dict(
            conn.execute(
                "select schema_name || '.' || table_name, string_agg(distinct kind, ',') || ':' || count(*) "
                "from pgferry.migration_chunks group by 1"
            ).fetchall()
        )
        binary = dict(
            conn.execute(
                "select schema_name || '.' || table_name, binary_copy from pgferry.migration_tables"
            ).fetchall()
        )
    # Every table larger than one chunk is split into block ranges, whatever its key.
    assert kinds["app.big_keys"].startswith("ctid:") and int(kinds["app.big_keys"].split(":")[1]) >= 5
    assert kinds["Sales.Order"].startswith("ctid:") and int(kinds["Sales.Order"].split(":")[1]) >= 2
    assert kinds["app.no_pk"].startswith("ctid:") and int(kinds["app.no_pk"].split(":")[1]) >= 2
    assert kinds["app.events_2024"].startswith("ctid:") and int(kinds["app.events_2024"].split(":")[1]) >= 2
    # Arrays of an enum and composites go as text; the rest may go binary.
    assert binary["app.arrays"] is False and binary["app.composites"] is False
    assert binary["app.big_keys"] is True and binary["app.embeddings"] is True

    # json: byte for byte, duplicate keys, spacing and escapes included; jsonb: the same canonical value.
    assert dict(fetch(target, "select id, j::text from app.json_docs where j is not null")) == JSON_TEXTS
    assert fetch(target, "select id, jb::text from app.json_docs order by id") == fetch(
        source, "select id, jb::text from app.json_docs order by id"
    )
    jsonb_dup = fetch(target, "select jb from app.json_docs where id = 5")[0][0]
    assert jsonb_dup == {"dup": 2}

    # Numbers: full precision, NaN, ±Infinity, -0, subnormals.
    numbers = {r[0]: r[1:] for r in fetch(target, "select id, n, n_fixed, f4, f8, i8, pct from app.numbers")}
    assert numbers[1][0] == Decimal("12345678901234567890123456789.12345678901234567890")
    assert str(numbers[1][0]) == "12345678901234567890123456789.12345678901234567890"
    assert numbers[1][1] == Decimal("1234567890123456789012345678901234567890.12345678901234567891")
    assert math.isnan(numbers[1][2]) and math.isnan(numbers[1][3])
    assert numbers[2][0].is_nan() and numbers[3][0] == Decimal("Infinity") and numbers[4][0] == Decimal("-Infinity")
    assert numbers[2][2] == math.inf and numbers[3][3] == -math.inf
    assert numbers[4][2] == 0.0 and math.copysign(1.0, numbers[4][2]) == -1.0
    assert math.copysign(1.0, numbers[4][3]) == -1.0
    assert numbers[5][3] == 5e-324 and numbers[7][3] == 2.2250738585072009e-308
    assert numbers[6][3] == 1.7976931348623157e308 and numbers[8][3] == 0.1
    assert numbers[1][4] == 9223372036854775807 and numbers[2][4] == -9223372036854775808
    assert str(numbers[7][0]) == "-123.4500" and str(numbers[5][1]) == "1.50000000000000000000"
    assert fetch(target, "select n::text from app.numbers where id = 6") == [("1" + "0" * 130,)]

    # Times: infinities, BC dates, the extremes, intervals with months, days and microseconds.
    times = {r[0]: r[1:] for r in fetch(target, "select id, ts::text, tstz::text, d::text, iv::text from app.times")}
    assert times[1][:3] == ("infinity", "infinity", "infinity")
    assert times[2][:3] == ("-infinity", "-infinity", "-infinity")
    assert times[3][2] == "4713-01-01 BC" and times[3][0] == "4713-01-01 00:00:00 BC"
    assert times[6][2] == "4714-11-24 BC" and times[6][1] == "4714-11-24 00:00:00+00 BC"
    assert times[4][0] == "294276-12-31 23:59:59.999999" and times[4][2] == "5874897-12-31"
    assert times[1][3] == "1 year 2 mons 3 days 04:05:06.789012"
    assert times[2][3] == "-1 mons +2 days -00:00:00.000001"
    assert times[5][1] == "2024-02-29 18:14:59.999999+00"

    # Bytes: every value, empty and NULL; text with control characters intact.
    scalars = {r[0]: r[1:] for r in fetch(target, "select id, b, t, c from app.scalars")}
    assert scalars[1][0] == bytes(range(256)) and scalars[2][0] == bytes(reversed(range(256)))
    assert scalars[3][0] == b"" and scalars[4][0] is None
    assert scalars[1][1] == AWKWARD_TEXT and scalars[3][1] == "" and scalars[1][2] == "ab    "

    # Arrays: dimensions, bounds and NULL elements.
    arrays = fetch(
        target,
        "select array_dims(matrix), array_dims(cube), array_dims(bounded), bounded::text, ints::text, "
        "array_position(texts, null), moods::text, mood_grid::text, floats::text from app.arrays where id = 1",
    )[0]
    assert arrays[:5] == ("[1:2][1:2]", "[1:2][1:2][1:2]", "[0:2]", "[0:2]={7,8,9}", "{1,NULL,3}")
    assert arrays[5] == 4
    assert arrays[6] == '{happy,"it\'s complicated","naïve 🙂"}' and arrays[7] == "{{sad,ok},{happy,NULL}}"
    assert arrays[8] == "{NaN,Infinity,-Infinity,-0,5e-324}"
    assert fetch(target, "select array_dims(cube), bounded::text from app.arrays where id = 2") == [
        ("[-5:-4][1:1]", "[5:5]={NULL}")
    ]

    # Ranges: empty, unbounded, infinite bounds; multiranges.
    assert fetch(target, "select i4::text, isempty(i4), mr::text from app.ranges where id in (1, 2) order by id") == [
        ("empty", True, "{}"),
        ("(,)", False, "{(,)}"),
    ]
    assert fetch(target, "select tstz::text, mr::text, upper_inf(tstz) from app.ranges where id = 3") == [
        ('["2024-01-01 00:00:00+00",infinity)', "{[1,3),[5,7),[10,)}", False)
    ]

    # Network types keep host bits and families.
    assert fetch(target, "select ip::text, net::text, mac8::text from app.net where id in (1, 2) order by id") == [
        ("192.168.0.1/24", "10.0.0.0/8", "08:00:2b:01:02:03:04:05"),
        ("::ffff:1.2.3.4/128", "2001:db8::/32", "08:00:2b:ff:fe:01:02:03"),
    ]

    # Composite values, field by field.
    assert fetch(target, "select (p).label, (p).tags::text, (ps[1]).amount::text from app.composites where id = 1") == [
        ('a,b "c" (d)', '{x,"y,z",NULL}', "NaN")
    ]

    # Rows of several MB: the same bytes (compared by digest on each server).
    huge_query = "select id, md5(body), octet_length(body), md5(blob), octet_length(blob) from app.huge order by id"
    huge = fetch(target, huge_query)
    assert huge == fetch(source, huge_query)
    assert huge[0][2] == FIVE_MB and huge[0][4] == THREE_MB
    assert huge[1][2] > FIVE_MB

    # Quoted identifiers: the table, its columns and its key as on the source.
    assert fetch(target, 'select count(*), count(distinct "from") from "Sales"."Order"') == [(1200, len(ORDER_KEYS))]
    assert fetch(
        target,
        'select pg_get_constraintdef(oid) from pg_constraint where conrelid = \'"Sales"."Order"\'::regclass '
        "and contype = 'p'",
    ) == [('PRIMARY KEY ("from", "select")',)]
    assert fetch(target, 'select "user" from "Sales"."line.items v2" order by "Id"') == [("alice",), ("bob",)]


def test_schema_objects_behave_on_the_target(
    migrated: tuple[str, str, Migration, MigrationSummary],
) -> None:
    source, target, _service, summary = migrated
    assert summary.status == "completed" and summary.verification is not None and summary.verification.ok

    # Generated columns are recomputed by the target, and equal what the source computed.
    generated = "select id, total, label from app.gen_always order by id"
    assert fetch(target, generated) == fetch(source, generated)
    sequences = (
        "select schemaname, sequencename, last_value, start_value, increment_by from pg_sequences "
        "where schemaname = 'app' order by 1, 2"
    )
    # Sequences (identity, serial) where the source's are; then they continue after the copied ids.
    assert fetch(target, sequences) == fetch(source, sequences)
    with psycopg.connect(target) as conn:
        # Rows rolled back; the sequences advance, as they do on any server.
        top = conn.execute("select max(id) from app.gen_always").fetchone()
        new = conn.execute(
            "insert into app.gen_always (a, b, name) values (4, 2, 'new') returning id, total, label"
        ).fetchone()
        assert top is not None and new is not None
        assert new[0] > top[0] and (new[0] - 100) % 3 == 0 and new[1:] == (42, "NEW!")
        with pytest.raises(psycopg.errors.GeneratedAlways):
            with conn.transaction():
                conn.execute("insert into app.gen_always (id, a, b) values (1, 1, 1)")
        top = conn.execute("select max(id) from app.gen_default").fetchone()
        new = conn.execute("insert into app.gen_default (note) values ('new') returning id").fetchone()
        assert top is not None and new is not None and new[0] > top[0]
        top = conn.execute("select max(id) from app.serials").fetchone()
        new = conn.execute("insert into app.serials (note) values ('new') returning id").fetchone()
        assert top is not None and new is not None and new[0] > top[0]
        conn.rollback()

    # Partition rows landed in the partitions they are in on the source.
    partitions = "select tableoid::regclass::text, count(*), min(id), max(id) from app.events group by 1 order by 1"
    source_partitions = fetch(source, partitions)
    assert [p[0] for p in source_partitions] == ["app.events_2024", "app.events_2025", "app.events_other"]
    assert fetch(target, partitions) == source_partitions
    assert fetch(
        target,
        "select c.relname, pg_get_expr(c.relpartbound, c.oid) from pg_inherits i join pg_class c "
        "on c.oid = i.inhrelid where i.inhparent = 'app.events'::regclass order by 1",
    ) == fetch(
        source,
        "select c.relname, pg_get_expr(c.relpartbound, c.oid) from pg_inherits i join pg_class c "
        "on c.oid = i.inhrelid where i.inhparent = 'app.events'::regclass order by 1",
    )
    with psycopg.connect(target) as conn:
        # The partitions' keys and indexes are attached to the parent's again.
        rows = conn.execute(
            "select count(*) from pg_inherits i join pg_class c on c.oid = i.inhrelid "
            "where i.inhparent in ('app.events_pkey'::regclass, 'app.events_kind_idx'::regclass)"
        ).fetchone()
        assert rows == (6,)
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("insert into app.events values (1, '2024-01-01 12:00+00', 'ok', null)")
        conn.rollback()

    # The dropped column is gone, the added one is there, in the source's order.
    assert [c[0] for c in column_shapes(target, "app", "dropped")] == ["id", "keep1", "keep2", "added"]

    # Enums keep their labels in order; domains keep their checks, and enforce them.
    enum = "select enum_range(null::app.mood)::text"
    assert fetch(target, enum) == fetch(source, enum) == [('{sad,ok,happy,"it\'s complicated","naïve 🙂"}',)]
    domain_checks = (
        "select t.typname, c.conname, pg_get_constraintdef(c.oid) from pg_constraint c join pg_type t "
        "on t.oid = c.contypid where t.typnamespace = 'app'::regnamespace order by 1, 2"
    )
    assert fetch(target, domain_checks) == fetch(source, domain_checks)
    assert len(fetch(target, domain_checks)) == 2
    with psycopg.connect(target) as conn:
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("insert into app.numbers (id, pct) values (100, 100.01)")
        conn.rollback()
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("select 'no at sign'::app.email")
        conn.rollback()

    # Vectors live in the schema the target's pgvector is in, and cosine distance works there.
    ext = vector_schema(target)
    assert ext in {"extensions", "public"}
    assert vector_schema(source) == "public"
    assert fetch(
        target,
        "select a.attname, t.typnamespace::regnamespace::text, t.typname, a.atttypmod "
        "from pg_attribute a join pg_type t on t.oid = a.atttypid "
        "where a.attrelid = 'app.embeddings'::regclass and a.attname in ('small', 'big') order by 1",
    ) == [("big", ext, "vector", 1536), ("small", ext, "vector", 3)]

    def distances(url: str, schema: str) -> list[tuple[int, float | None, float | None]]:
        query = sql.SQL(
            "select id, small operator({s}.<=>) '[1,0,0]'::{s}.vector, "
            "big operator({s}.<=>) (select big from app.embeddings where id = 3) from app.embeddings order by id"
        ).format(s=sql.Identifier(schema))
        with psycopg.connect(url) as conn:
            return [(int(r[0]), r[1], r[2]) for r in conn.execute(query)]

    there, here = distances(target, ext), distances(source, "public")
    assert [r[0] for r in there] == [1, 2, 3, 4, 5]
    for mine, theirs in zip(here, there, strict=True):
        for a, b in zip(mine[1:], theirs[1:], strict=True):
            if a is None or math.isnan(a):
                assert b is None or math.isnan(b)
            else:
                assert b == pytest.approx(a, rel=1e-6, abs=1e-9)
    assert there[0][1] == pytest.approx(1 - 1 / math.sqrt(14), rel=1e-6)
    with psycopg.connect(target) as conn:
        conn.execute("set enable_seqscan = off")
        plan = "\n".join(
            str(r[0])
            for r in conn.execute(
                sql.SQL(
                    "explain select id from app.embeddings order by small operator({s}.<=>) '[1,0,0]'::{s}.vector "
                    "limit 2"
                ).format(s=sql.Identifier(ext))
            )
        )
        assert "embeddings_small_hnsw" in plan


def test_verification_catches_a_changed_row(migrated: tuple[str, str, Migration, MigrationSummary]) -> None:
    _source, target, service, summary = migrated
    assert summary.status == "completed"
    report = service.verify()
    assert report.ok
    big = next(t for t in report.tables if t.table == "app.big_keys")
    assert big.buckets >= 1 and big.source_rows == big.target_rows > 0
    with psycopg.connect(target, autocommit=True) as conn:
        row = conn.execute("select id, payload from app.big_keys order by id offset 777 limit 1").fetchone()
        assert row is not None
        changed_id, original = row
        conn.execute("update app.big_keys set payload = payload || ' ' where id = %s", (changed_id,))

    report = service.verify()
    assert not report.ok
    assert [t.table for t in report.differing_tables] == ["app.big_keys"]
    bad = report.differing_tables[0]
    assert len(bad.differing_buckets) == 1 and bad.source_rows == bad.target_rows == big.source_rows
    # The report names the row: its key, and both versions.
    assert bad.examples and f"key (id) = {changed_id} differs" in bad.examples[0], bad.examples
    assert "DIFFERENT" in bad.describe() and str(changed_id) in bad.describe()

    # Put it back: clean again. Then change only the spacing of a json value: that is a difference too.
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("update app.big_keys set payload = %s where id = %s", (original, changed_id))
        assert service.verify().ok
        conn.execute("update app.json_docs set j = %s::json where id = 1", (JSON_TEXTS[1].replace("   ", " "),))
    report = service.verify()
    assert [t.table for t in report.differing_tables] == ["app.json_docs"]

    # A removed row is a difference in the row count, and the report names the missing key.
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("update app.json_docs set j = %s::json where id = 1", (JSON_TEXTS[1],))
        conn.execute('delete from "Sales"."Order" where "from" = %s and "select" = 0', ("Zoë",))
    report = service.verify()
    assert len(report.differing_tables) == 1
    bad = report.differing_tables[0]
    assert bad.table == "Sales.Order" and bad.target_rows == bad.source_rows - 1
    assert len(bad.differing_buckets) == 1
    assert "Zoë" in bad.examples[0] and "on the source but not the target" in bad.examples[0], bad.examples


NO_PK_SQL = """
create schema app;
create table app.log (at timestamptz, level text, message text, payload jsonb, n numeric);
insert into app.log
  select timestamptz '2024-01-01 00:00+00' + (g % 50) * interval '1 minute',
         (array['info', 'warn', 'error'])[1 + g % 3],
         'message ' || (g % 50) || repeat(' padding', 20), jsonb_build_object('k', g % 50), (g % 50) / 3.0
  from generate_series(1, 1500) g;
insert into app.log select null, null, null, null, null from generate_series(1, 7);
insert into app.log values ('infinity', 'same', E'tab\\there', '{"a": 1}', 'NaN'), ('infinity', 'same', E'tab\\there',
  '{"a": 1}', 'NaN');
create table app.dups_only (v int);
insert into app.dups_only select 42 from generate_series(1, 2000);
alter table app.dups_only add column extra text default 'x';
analyze;
"""


def multiset(url: str, table: str) -> list[tuple[str, int]]:
    return sorted((str(r[0]), int(r[1])) for r in fetch(url, f"select t::text, count(*) from app.{table} t group by 1"))


def test_table_without_primary_key_is_copied_exactly(route_source_url: str, route_target_url: str) -> None:
    with psycopg.connect(route_source_url, autocommit=True) as conn:
        conn.execute(NO_PK_SQL)
    service = service_for(route_source_url, route_target_url, schema_from="source", jobs=3, batch_rows=100)
    summary = service.run()
    assert summary.status == "completed"
    assert summary.verification is not None and summary.verification.ok
    with psycopg.connect(route_target_url) as conn:
        chunk_kinds = conn.execute(
            "select table_name, kind, count(*), sum(rows_copied) from pgferry.migration_chunks group by 1, 2 order by 1"
        ).fetchall()
    assert [(r[0], r[1]) for r in chunk_kinds] == [("dups_only", "ctid"), ("log", "ctid")]
    assert all(r[2] >= 2 for r in chunk_kinds), chunk_kinds
    assert {r[0]: r[3] for r in chunk_kinds} == {"dups_only": 2000, "log": 1509}
    for table in ("log", "dups_only"):
        source_counts = multiset(route_source_url, table)
        assert multiset(route_target_url, table) == source_counts
        assert any(count > 1 for _, count in source_counts)
    assert multiset(route_target_url, "dups_only") == [("(42,x)", 2000)]
    assert fetch(route_target_url, "select count(*) from app.log where level is null") == [(7,)]

    # One duplicate fewer on the target is a difference the verifier reports for that table.
    with psycopg.connect(route_target_url, autocommit=True) as conn:
        conn.execute("delete from app.dups_only where ctid = (select ctid from app.dups_only limit 1)")
    report = service.verify()
    assert [(t.table, t.source_rows, t.target_rows) for t in report.differing_tables] == [("app.dups_only", 2000, 1999)]


# Settings that change how values print (source) and how text is read (target). A Neon database with its own
# time zone or date style is ordinary; text COPY (used for arrays of enums, composites) must not depend on them.
SOURCE_SETTINGS = {
    "datestyle": "SQL, DMY",
    "intervalstyle": "sql_standard",
    "extra_float_digits": "0",
    "timezone": "Asia/Kathmandu",
    "bytea_output": "escape",
}
TARGET_SETTINGS = {
    "datestyle": "Postgres, MDY",
    "intervalstyle": "postgres",
    "extra_float_digits": "0",
    "timezone": "America/St_Johns",
    "bytea_output": "escape",
}


def set_database_settings(url: str, settings: dict[str, str]) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        database = conn.execute("select current_database()").fetchone()
        assert database is not None
        for name, value in settings.items():
            conn.execute(
                sql.SQL("alter database {} set {} = {}").format(
                    sql.Identifier(database[0]), sql.Identifier(name), sql.Literal(value)
                )
            )


def test_server_output_settings_do_not_change_the_data(fidelity_source: str, route_target_url: str) -> None:
    set_database_settings(fidelity_source, SOURCE_SETTINGS)
    set_database_settings(route_target_url, TARGET_SETTINGS)
    summary = service_for(fidelity_source, route_target_url, schema_from="source", jobs=2, batch_rows=BATCH_ROWS).run()
    assert summary.status == "completed"
    assert summary.verification is not None and summary.verification.ok
    for schema, name, _kind in tables_of(fidelity_source):
        assert rows_as_text(route_target_url, schema, name) == rows_as_text(fidelity_source, schema, name), (
            f"{schema}.{name}"
        )


def test_extreme_intervals_are_infinity_from_postgresql_17_on(route_source_url: str, route_target_url: str) -> None:
    """A known limit, not a pgferry choice: PostgreSQL 17 made the largest and smallest interval values mean ±infinity.

    On 15 the interval with every field at its maximum is an ordinary (absurd) value; 17+ reads the same bits as
    ``infinity``. Nothing can carry it across identically, so the move must not claim it did: verification fails.
    """
    with psycopg.connect(route_source_url, autocommit=True) as conn:
        conn.execute(
            "create schema app; create table app.spans (id int primary key, iv interval);"
            "insert into app.spans values (1, '1 day'), "
            "(2, interval '2147483647 months 2147483647 days 2562047788:00:54.775807'), "
            "(3, interval '-2147483647 months -2147483647 days -2562047788:00:54.775807' "
            "    - interval '1 month 1 day 00:00:00.000001')"
        )
    target_major = fetch(route_target_url, "select current_setting('server_version_num')::int / 10000")[0][0]
    service = service_for(route_source_url, route_target_url, schema_from="source")
    if target_major < 17:
        assert service.run().status == "completed"
        assert rows_as_text(route_target_url, "app", "spans") == rows_as_text(route_source_url, "app", "spans")
        return
    with pytest.raises(VerificationFailedError, match=r"app\.spans"):
        service.run()
    assert fetch(route_target_url, "select id, iv::text from app.spans order by id") == [
        (1, "1 day"),
        (2, "infinity"),
        (3, "-infinity"),
    ]
