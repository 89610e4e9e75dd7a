"""pgferry.replication against real servers: decoding, snapshot alignment, confirm/resume, reconnects.

Every server test uses its own uniquely named slot and publication and drops them at the end, pass or
fail: slot names are cluster-wide, and a leftover slot pins WAL for the whole session (and blocks the
fixture's DROP DATABASE).
"""

from __future__ import annotations

import datetime as dt
import random
import secrets
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest

from pgferry.db.retry import RetryPolicy
from pgferry.replication import (
    DecodeError,
    Lsn,
    ReplicationError,
    ReplicationReader,
    ReplicationStreamEndedError,
    RowChange,
    SlotExistsError,
    SlotNotFoundError,
    Transaction,
    TransactionAssembler,
    TruncateChange,
    classify_replication_error,
    create_slot,
    decode_message,
    drop_publication,
    drop_slot,
    ensure_publication,
    exported_snapshot,
    get_slot,
    publication_tables,
    slot_exists,
    slot_lag_bytes,
)
from pgferry.replication import decoder as d
from pgferry.replication._conn import conninfo
from pgferry.testing.servers import ServerPair

FAST_RETRY = RetryPolicy(max_attempts=200, base_delay=0.05, max_delay=0.5, deadline=60.0)


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


@dataclass
class Repl:
    """Unique slot/publication names for one test, remembered so the fixture can drop them."""

    url: str
    slots: list[str] = field(default_factory=list)
    publications: list[str] = field(default_factory=list)

    def connect(self) -> psycopg.Connection[Any]:
        # The servers run with synchronous_commit=off; decoding only reads flushed WAL, so make commits
        # flush at once rather than within wal_writer_delay (the SQL interface would not see them at all).
        conn = psycopg.connect(self.url, autocommit=True)
        conn.execute("set synchronous_commit = on")
        return conn

    def sql(self, *statements: str) -> None:
        with self.connect() as conn:
            for statement in statements:
                conn.execute(statement)

    def slot_name(self) -> str:
        name = f"pgferry_test_{uuid.uuid4().hex[:16]}"
        self.slots.append(name)
        return name

    def slot(self) -> str:
        name = self.slot_name()
        create_slot(self.url, name)
        return name

    def publication(self, *tables: str) -> str:
        name = f"pgferry_test_pub_{uuid.uuid4().hex[:12]}"
        self.publications.append(name)
        with self.connect() as conn:
            ensure_publication(conn, name, list(tables))
        return name

    def reader(self) -> ReplicationReader:
        return ReplicationReader(self.url, retry_policy=FAST_RETRY)


@pytest.fixture
def repl(source_url: str) -> Iterator[Repl]:
    helper = Repl(source_url)
    try:
        yield helper
    finally:
        with helper.connect() as conn:
            for slot in helper.slots:
                drop_slot(conn, slot)
            for publication in helper.publications:
                drop_publication(conn, publication)


def collect(reader: ReplicationReader, count: int, timeout: float = 15.0) -> list[Transaction]:
    """Exactly ``count`` transactions, or fail after ``timeout`` seconds."""
    got: list[Transaction] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        for txn in reader.transactions(timeout=0.2):
            got.append(txn)
            if len(got) == count:
                break
    assert len(got) == count, f"expected {count} transactions, got {len(got)}"
    return got


def assert_quiet(reader: ReplicationReader, seconds: float = 0.5) -> None:
    extra = list(reader.transactions(timeout=seconds))
    assert extra == [], f"unexpected transactions: {extra}"


def wait_until(condition: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def wait_slot_inactive(repl: Repl, slot: str) -> None:
    def inactive() -> bool:
        with repl.connect() as conn:
            state = get_slot(conn, slot)
            return state is not None and not state.active

    wait_until(inactive, what=f"slot {slot} to be released")


def confirmed_flush(repl: Repl, slot: str) -> Lsn:
    with repl.connect() as conn:
        state = get_slot(conn, slot)
    assert state is not None and state.confirmed_flush_lsn is not None
    return state.confirmed_flush_lsn


def rows(txn: Transaction) -> list[RowChange]:
    return [change for change in txn.changes if isinstance(change, RowChange)]


def inserted_ids(txns: list[Transaction]) -> list[int]:
    return [int(c.new["id"] or 0) for t in txns for c in rows(t) if c.kind == "insert" and c.new is not None]


# --------------------------------------------------------------------------------------
# Lsn (pure)
# --------------------------------------------------------------------------------------


def test_lsn_parses_formats_and_orders_numerically() -> None:
    lsn = Lsn.parse("16/B374D848")
    assert int(lsn) == (0x16 << 32) | 0xB374D848
    assert str(lsn) == "16/B374D848" and f"{lsn}" == "16/B374D848" and repr(lsn) == "Lsn('16/B374D848')"
    assert Lsn.parse("0/0") == Lsn(0) and str(Lsn(0)) == "0/0"
    assert Lsn.parse("9/0") < Lsn.parse("10/0")  # as strings this would be the other way round
    assert sorted([Lsn.parse("A/1"), Lsn.parse("9/FFFFFFFF"), Lsn.parse("a/0")]) == [
        Lsn.parse("9/FFFFFFFF"),
        Lsn.parse("A/0"),
        Lsn.parse("A/1"),
    ]
    assert Lsn.coerce("1/2") == Lsn.coerce(0x100000002) == Lsn.coerce(Lsn(0x100000002))
    assert Lsn.parse("1/10") - Lsn.parse("1/0") == 16
    assert f"{Lsn(255):x}" == "ff"
    assert Lsn.parse("FFFFFFFF/FFFFFFFF") == (1 << 64) - 1
    for bad in ("", "1", "1/", "/1", "G/0", "1/2/3", "123456789/0"):
        with pytest.raises(ValueError):
            Lsn.parse(bad)
    with pytest.raises(ValueError):
        Lsn(-1)
    with pytest.raises(ValueError):
        Lsn(1 << 64)
    with pytest.raises(TypeError):
        Lsn("1/2")


def test_accepts_project_urls_and_classifies_stream_errors() -> None:
    assert conninfo("postgresql+psycopg://u:secret@db.example:5433/app") == "postgresql://u:secret@db.example:5433/app"
    assert conninfo("postgres://u@db.example/app") == "postgresql://u@db.example/app"
    assert conninfo("host=db.example dbname=app") == "host=db.example dbname=app"
    ended = classify_replication_error(ReplicationStreamEndedError("server shut down"))
    assert ended.retryable and ended.reconnect
    in_use = classify_replication_error(psycopg.errors.ObjectInUse("replication slot is active for PID 42"))
    assert in_use.retryable and in_use.reconnect
    lost = classify_replication_error(psycopg.OperationalError("server closed the connection unexpectedly"))
    assert lost.retryable and lost.reconnect
    for fatal in (SlotNotFoundError("gone"), DecodeError("bad bytes"), psycopg.errors.UndefinedObject("no pub")):
        assert not classify_replication_error(fatal).retryable


# --------------------------------------------------------------------------------------
# Decoder with hand-built messages (pure)
# --------------------------------------------------------------------------------------

UNCHANGED = object()
TS_2026 = dt.datetime(2026, 11, 25, 12, 0, 0, 123456, tzinfo=dt.UTC)
TS_2026_WIRE = (TS_2026 - dt.datetime(2000, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)


def cstr(text: str) -> bytes:
    return text.encode() + b"\0"


def tuple_data(*values: object) -> bytes:
    out = struct.pack("!h", len(values))
    for value in values:
        if value is None:
            out += b"n"
        elif value is UNCHANGED:
            out += b"u"
        else:
            raw = str(value).encode()
            out += b"t" + struct.pack("!i", len(raw)) + raw
    return out


def begin_msg(final_lsn: int, xid: int) -> bytes:
    return b"B" + struct.pack("!QqI", final_lsn, TS_2026_WIRE, xid)


def commit_msg(commit_lsn: int, end_lsn: int) -> bytes:
    return b"C" + struct.pack("!BQQq", 0, commit_lsn, end_lsn, TS_2026_WIRE)


def relation_msg(oid: int, identity: bytes, columns: list[tuple[int, str, int, int]]) -> bytes:
    out = b"R" + struct.pack("!I", oid) + cstr("public") + cstr("items") + identity + struct.pack("!h", len(columns))
    for flags, name, type_oid, typmod in columns:
        out += struct.pack("!B", flags) + cstr(name) + struct.pack("!Ii", type_oid, typmod)
    return out


ITEMS_COLUMNS = [(1, "id", 23, -1), (0, "title", 25, -1), (0, "body", 25, -1), (0, "embedding", 91234, 3)]


def test_decoder_decodes_every_protocol_1_message() -> None:
    begin = decode_message(begin_msg(0x1_0000_0100, 4242))
    assert begin == d.Begin(final_lsn=Lsn(0x1_0000_0100), commit_ts=TS_2026, xid=4242)

    commit = decode_message(commit_msg(0x1_0000_0100, 0x1_0000_0130))
    assert commit == d.Commit(flags=0, commit_lsn=Lsn.parse("1/100"), end_lsn=Lsn.parse("1/130"), commit_ts=TS_2026)

    relation = decode_message(relation_msg(16400, b"d", ITEMS_COLUMNS))
    assert isinstance(relation, d.Relation)
    assert (relation.oid, relation.namespace, relation.name, relation.replica_identity) == (
        16400,
        "public",
        "items",
        "d",
    )
    assert [(c.name, c.is_key, c.type_oid, c.type_modifier) for c in relation.columns] == [
        ("id", True, 23, -1),
        ("title", False, 25, -1),
        ("body", False, 25, -1),
        ("embedding", False, 91234, 3),
    ]

    typ = decode_message(b"Y" + struct.pack("!I", 91234) + cstr("public") + cstr("vector"))
    assert typ == d.Type(oid=91234, namespace="public", name="vector")

    insert = decode_message(b"I" + struct.pack("!I", 16400) + b"N" + tuple_data(1, "héllo", None, "[1,2,3]"))
    assert isinstance(insert, d.Insert)
    assert [f.kind for f in insert.new] == ["t", "t", "n", "t"]
    assert insert.new[1].text() == "héllo" and insert.new[2].text() is None

    update_plain = decode_message(b"U" + struct.pack("!I", 16400) + b"N" + tuple_data(1, "x", UNCHANGED, None))
    assert isinstance(update_plain, d.Update)
    assert update_plain.old is None and update_plain.old_kind is None
    assert update_plain.new[2].kind == "u"
    with pytest.raises(ValueError, match="unchanged TOAST"):
        update_plain.new[2].text()

    update_key = decode_message(
        b"U" + struct.pack("!I", 16400) + b"K" + tuple_data(1, None, None, None) + b"N" + tuple_data(2, "x", "b", None)
    )
    assert isinstance(update_key, d.Update) and update_key.old_kind == "K"
    assert update_key.old is not None and update_key.old[0].text() == "1"

    update_full = decode_message(
        b"U" + struct.pack("!I", 16400) + b"O" + tuple_data(1, "a", "b", None) + b"N" + tuple_data(1, "c", "b", None)
    )
    assert isinstance(update_full, d.Update) and update_full.old_kind == "O"

    delete = decode_message(b"D" + struct.pack("!I", 16400) + b"K" + tuple_data(2, None, None, None))
    assert isinstance(delete, d.Delete) and delete.old_kind == "K" and delete.old[0].text() == "2"

    truncate = decode_message(b"T" + struct.pack("!iB", 2, 3) + struct.pack("!II", 16400, 16500))
    assert truncate == d.Truncate(relation_oids=(16400, 16500), options=3)
    assert isinstance(truncate, d.Truncate) and truncate.cascade and truncate.restart_identity

    origin = decode_message(b"O" + struct.pack("!Q", 0x2_0000_0000) + cstr("pg_16401"))
    assert origin == d.Origin(commit_lsn=Lsn.parse("2/0"), name="pg_16401")

    message = decode_message(b"M" + struct.pack("!BQ", 1, 0x500) + cstr("pgferry") + struct.pack("!i", 3) + b"a\0b")
    assert message == d.Message(transactional=True, lsn=Lsn(0x500), prefix="pgferry", content=b"a\0b")


def test_decoder_rejects_malformed_and_unsupported_messages() -> None:
    good_insert = b"I" + struct.pack("!I", 1) + b"N" + tuple_data(1, "x")
    cases = {
        b"": "empty",
        b"B" + b"\0" * 5: "truncated",
        good_insert[:-1]: "truncated",
        good_insert + b"\0": "trailing",
        b"I" + struct.pack("!I", 1) + b"X" + tuple_data(1): "expected 'N'",
        b"I" + struct.pack("!I", 1) + b"N" + struct.pack("!h", 1) + b"z": "column kind",
        b"Y" + struct.pack("!I", 1) + b"public": "unterminated",
        relation_msg(1, b"x", []): "replica identity",
        b"S" + struct.pack("!IB", 7, 1): "streaming",
        b"Z": "unknown",
    }
    for payload, problem in cases.items():
        with pytest.raises(DecodeError, match=problem):
            decode_message(payload)


def test_assembler_groups_changes_into_typed_transactions() -> None:
    assembler = TransactionAssembler()
    lsn = Lsn(0x100)
    stream = [
        begin_msg(0x900, 77),
        b"Y" + struct.pack("!I", 91234) + cstr("public") + cstr("vector"),
        relation_msg(16400, b"d", ITEMS_COLUMNS),
        b"I" + struct.pack("!I", 16400) + b"N" + tuple_data(1, "a", None, "[1,2,3]"),
        b"U" + struct.pack("!I", 16400) + b"N" + tuple_data(1, "b", UNCHANGED, UNCHANGED),
        b"U" + struct.pack("!I", 16400) + b"K" + tuple_data(1, None, None, None) + b"N" + tuple_data(5, "b", "c", None),
        b"D" + struct.pack("!I", 16400) + b"K" + tuple_data(5, None, None, None),
        b"M" + struct.pack("!BQ", 0, 0x800) + cstr("x") + struct.pack("!i", 0),  # non-transactional: dropped
        b"M" + struct.pack("!BQ", 1, 0x800) + cstr("y") + struct.pack("!i", 1) + b"!",
        b"T" + struct.pack("!iB", 1, 0) + struct.pack("!I", 16400),
    ]
    for payload in stream:
        assert assembler.feed(decode_message(payload), lsn) is None
        assert assembler.in_transaction
    txn = assembler.feed(decode_message(commit_msg(0x900, 0x930)), lsn)
    assert txn is not None and not assembler.in_transaction
    assert (txn.xid, txn.commit_lsn, txn.end_lsn, txn.commit_ts) == (77, Lsn(0x900), Lsn(0x930), TS_2026)
    assert [m.prefix for m in txn.messages] == ["y"]
    insert, update, key_update, delete, truncate = txn.changes
    assert isinstance(insert, RowChange) and insert.kind == "insert"
    assert insert.new == {"id": "1", "title": "a", "body": None, "embedding": "[1,2,3]"}
    assert insert.old is None and insert.key_columns == ("id",) and insert.key == {"id": "1"}
    assert insert.relation.column("embedding").type_name == "public.vector"
    assert insert.relation.column("title").type_name is None
    assert isinstance(update, RowChange)
    assert update.new == {"id": "1", "title": "b"} and update.unchanged_toast_columns == ("body", "embedding")
    assert isinstance(key_update, RowChange)
    assert key_update.old == {"id": "1"} and key_update.key == {"id": "1"} and key_update.new is not None
    assert isinstance(delete, RowChange) and delete.new is None and delete.old == {"id": "5"}
    assert truncate == TruncateChange(("public.items",), (insert.relation,), False, False, lsn)

    with pytest.raises(ReplicationError, match="outside a transaction"):
        assembler.feed(decode_message(b"D" + struct.pack("!I", 16400) + b"K" + tuple_data(5, None, None, None)))
    assembler.feed(decode_message(begin_msg(0xA00, 78)))
    with pytest.raises(ReplicationError, match="before its Relation"):
        assembler.feed(decode_message(b"I" + struct.pack("!I", 999) + b"N" + tuple_data(1)))


def _feed_both_ways(payloads: list[bytes]) -> tuple[Transaction | None, Transaction | None]:
    """The same stream through the general decoder and through the reader's row-change fast path."""
    general, fast = TransactionAssembler(), TransactionAssembler()
    results: list[Transaction | None] = [None, None]
    for index, payload in enumerate(payloads):
        lsn = Lsn(0x100 + index)
        results[0] = general.feed(decode_message(payload), lsn)
        if payload[0] in d.ROW_CHANGE_TAGS:
            fast.feed_row_change(payload, lsn)
            results[1] = None
        else:
            results[1] = fast.feed(decode_message(payload), lsn)
    return results[0], results[1]


def test_row_change_fast_path_equals_the_general_decoder() -> None:
    """The reader decodes Insert/Update/Delete straight into values; the general decoder (TupleField by
    TupleField, then named) is the oracle, on random rows: text, UTF-8, empty strings, NULLs, unchanged
    TOAST values, key-only and whole old tuples, and a Relation resent with other columns mid-stream."""
    rng = random.Random(20261130)

    def value() -> str | object | None:
        return rng.choice([None, "", "héllo ✓", str(rng.randint(-(10**12), 10**12)), "x" * rng.randint(0, 300)])

    def row(width: int, unchanged: bool) -> list[str | object | None]:
        return [str(rng.randint(1, 10**6))] + [
            UNCHANGED if unchanged and rng.random() < 0.2 else value() for _ in range(width - 1)
        ]

    two_columns = [(1, "id", 23, -1), (1, "label", 25, -1)]
    payloads = [begin_msg(0x900, 77), relation_msg(16400, b"d", ITEMS_COLUMNS)]
    for step in range(400):
        if step == 200:  # DDL: the table's Relation is resent with another column list
            payloads.append(relation_msg(16400, b"f", two_columns))
        width = 4 if step < 200 else 2
        oid = struct.pack("!I", 16400)
        kind = rng.choice(["I", "UN", "UK", "UO", "DK", "DO"])
        if kind == "I":
            payloads.append(b"I" + oid + b"N" + tuple_data(*row(width, False)))
        elif kind == "UN":
            payloads.append(b"U" + oid + b"N" + tuple_data(*row(width, True)))
        elif kind == "UK":
            old = tuple_data(*row(width, False))  # a 'K' tuple: only the key counts, the rest is ignored
            payloads.append(b"U" + oid + b"K" + old + b"N" + tuple_data(*row(width, True)))
        elif kind == "UO":
            payloads.append(b"U" + oid + b"O" + tuple_data(*row(width, False)) + b"N" + tuple_data(*row(width, True)))
        elif kind == "DK":
            payloads.append(b"D" + oid + b"K" + tuple_data(*row(width, False)))
        else:
            payloads.append(b"D" + oid + b"O" + tuple_data(*row(width, False)))
    payloads.append(commit_msg(0x900, 0x930))
    general, fast = _feed_both_ways(payloads)
    assert general is not None and fast is not None
    assert len(fast.changes) == 400
    assert fast == general
    assert {c.relation.replica_identity for c in rows(fast)} == {"d", "f"}

    def fast_decode(payload: bytes) -> None:
        d.decode_row_change(payload, ("id", "title", "body", "embedding"), (True, False, False, False))

    good = b"I" + struct.pack("!I", 16400) + b"N" + tuple_data(1, "x", None, None)
    bad = {
        good[:-1]: "truncated",
        good + b"\0": "trailing",
        b"I" + struct.pack("!I", 16400) + b"N" + tuple_data(1, "x"): "2 columns, its Relation message 4",
        b"I" + struct.pack("!I", 16400) + b"X" + tuple_data(1, "x", None, None): "expected 'N'",
        b"U" + struct.pack("!I", 16400) + b"Q": "expected 'K', 'O' or 'N'",
        b"D" + struct.pack("!I", 16400) + b"N" + tuple_data(1, None, None, None): "'K' or 'O'",
        b"I" + struct.pack("!I", 16400) + b"N" + struct.pack("!h", 4) + b"z": "column kind",
        b"I" + struct.pack("!I", 16400) + b"N" + struct.pack("!hci", 4, b"t", 2) + b"\xff\xfennn": "not UTF-8",
    }
    for payload, problem in bad.items():
        with pytest.raises(DecodeError, match=problem):
            fast_decode(payload)
    with pytest.raises(DecodeError, match="truncated"):
        d.row_change_relation(b"I\0")
    assembler = TransactionAssembler()
    with pytest.raises(ReplicationError, match="before its Relation"):
        assembler.feed_row_change(good, Lsn(1))
    assembler.feed(decode_message(relation_msg(16400, b"d", ITEMS_COLUMNS)))
    with pytest.raises(ReplicationError, match="Insert message outside a transaction"):
        assembler.feed_row_change(good, Lsn(1))


# --------------------------------------------------------------------------------------
# Publications and slots
# --------------------------------------------------------------------------------------


def test_publication_and_slot_management(repl: Repl) -> None:
    repl.sql("create table pub_a (id int primary key)", "create table pub_b (id int primary key)")
    name = f"pgferry_test_pub_{uuid.uuid4().hex[:12]}"
    repl.publications.append(name)
    with repl.connect() as conn:
        assert ensure_publication(conn, name, ["pub_a"]) == ["public.pub_a"]
        assert ensure_publication(conn, name, ["public.pub_a"]) == []
        assert ensure_publication(conn, name, ["pub_a", "public.pub_b", "tasks"]) == ["public.pub_b", "public.tasks"]
        assert publication_tables(conn, name) == ["public.pub_a", "public.pub_b", "public.tasks"]
        with pytest.raises(ReplicationError, match="no such table"):
            ensure_publication(conn, name, ["no_such_table"])
        with pytest.raises(ReplicationError, match="FOR ALL TABLES"):
            ensure_publication(conn, name, all_tables=True)
        assert drop_publication(conn, name) and not drop_publication(conn, name)
        assert ensure_publication(conn, name, all_tables=True) == []
        assert ensure_publication(conn, name, ["pub_a"]) == []  # already covered by FOR ALL TABLES
        assert "public.pub_b" in publication_tables(conn, name)

        slot = repl.slot_name()
        assert not slot_exists(conn, slot)
        info = create_slot(repl.url, slot)
        assert info.name == slot and info.snapshot_name is None and info.consistent_point > 0
        state = get_slot(conn, slot)
        assert state is not None and state.plugin == "pgoutput" and not state.active
        assert state.confirmed_flush_lsn == info.consistent_point
        with pytest.raises(SlotExistsError):
            create_slot(repl.url, slot)
        with pytest.raises(ReplicationError, match="invalid replication slot name"):
            create_slot(repl.url, "Bad-Name")
        before = slot_lag_bytes(conn, slot)
        conn.execute("insert into pub_a select generate_series(1, 1000)")
        assert slot_lag_bytes(conn, slot) > before
        assert drop_slot(conn, slot) and not drop_slot(conn, slot)
        with pytest.raises(SlotNotFoundError):
            slot_lag_bytes(conn, slot)


def test_decodes_real_pgoutput_bytes_from_the_server(repl: Repl) -> None:
    """The same decoder on bytes the server produced, via the SQL interface (which also reports xids)."""
    pub = repl.publication("tasks")
    slot = repl.slot()
    task_id = uuid.uuid4()
    embedding = "[" + ",".join(["0.5"] * 1536) + "]"
    with repl.connect() as conn:
        with conn.transaction():
            xid = conn.execute("select pg_current_xact_id()::text::bigint").fetchone()[0]
            conn.execute(
                "insert into tasks (id, user_id, title, metadata, embedding) values (%s, %s, 'first', %s, %s)",
                [task_id, uuid.uuid4(), '{"k": "v"}', embedding],
            )
        changes = conn.execute(
            "select lsn::text, xid::text::bigint, data from pg_logical_slot_peek_binary_changes("
            "%s, null, null, 'proto_version', '1', 'publication_names', %s)",
            [slot, pub],
        ).fetchall()
    messages = [decode_message(data) for _, _, data in changes]
    assert [type(m).__name__ for m in messages] == ["Begin", "Type", "Relation", "Insert", "Commit"]
    assert {row_xid for _, row_xid, _ in changes} == {xid}
    begin, vector_type, relation, _insert, commit = messages
    assert isinstance(begin, d.Begin) and begin.xid == xid
    assert isinstance(vector_type, d.Type) and vector_type.name == "vector"
    assert isinstance(relation, d.Relation) and (relation.namespace, relation.name) == ("public", "tasks")
    assert isinstance(commit, d.Commit) and commit.commit_lsn == begin.final_lsn
    assert commit.end_lsn == Lsn.parse(changes[-1][0])  # the SQL interface reports a commit at its end LSN

    assembler = TransactionAssembler()
    txn = None
    for message in messages:
        txn = assembler.feed(message)
    assert txn is not None and txn.xid == xid
    (change,) = rows(txn)
    assert change.new is not None
    assert change.new["id"] == str(task_id) and change.new["title"] == "first"
    assert change.new["metadata"] == '{"k": "v"}' and change.new["embedding"] == embedding
    assert change.new["description"] is None
    columns = {c.name: c for c in change.relation.columns}
    assert columns["id"].type_oid == 2950 and columns["id"].is_key  # uuid, the primary key
    assert columns["metadata"].type_oid == 3802  # jsonb
    assert columns["embedding"].type_name == "public.vector" and columns["embedding"].type_modifier == 1536


# --------------------------------------------------------------------------------------
# Streaming: decoding of changes
# --------------------------------------------------------------------------------------


def test_row_changes_with_default_and_full_replica_identity(repl: Repl) -> None:
    repl.sql(
        "create table rid_default (id int primary key, code text, note text)",
        "create table rid_full (id int primary key, code text, note text)",
        "alter table rid_full replica identity full",
    )
    pub = repl.publication("rid_default", "rid_full")
    slot = repl.slot()
    for table in ("rid_default", "rid_full"):
        repl.sql(
            f"insert into {table} values (1, 'a', null)",
            f"update {table} set code = 'b' where id = 1",
            f"update {table} set id = 2 where id = 1",
            f"delete from {table} where id = 2",
        )
    repl.sql("insert into rid_default values (9, 'z', 'n')", "truncate rid_default, rid_full restart identity")

    with repl.reader() as reader:
        reader.start(slot, [pub])
        txns = collect(reader, 10)
        assert_quiet(reader, 0.3)
    changes = [t.changes[0] for t in txns]
    assert all(len(t.changes) == 1 for t in txns)
    default, full = changes[0:4], changes[4:8]

    ins, upd, key_upd, dele = default
    assert isinstance(ins, RowChange) and (ins.kind, ins.schema, ins.table) == ("insert", "public", "rid_default")
    assert ins.new == {"id": "1", "code": "a", "note": None} and ins.old is None
    assert isinstance(upd, RowChange) and upd.kind == "update"
    assert upd.new == {"id": "1", "code": "b", "note": None} and upd.old is None  # key unchanged: no old row
    assert isinstance(key_upd, RowChange) and key_upd.old == {"id": "1"}  # key changed: old key only
    assert key_upd.new == {"id": "2", "code": "b", "note": None} and key_upd.key == {"id": "1"}
    assert isinstance(dele, RowChange) and dele.kind == "delete" and dele.new is None and dele.old == {"id": "2"}
    assert ins.key_columns == ("id",) and ins.relation.replica_identity == "d"

    ins, upd, key_upd, dele = full
    assert isinstance(ins, RowChange) and ins.table == "rid_full" and ins.relation.replica_identity == "f"
    assert isinstance(upd, RowChange) and upd.old == {"id": "1", "code": "a", "note": None}
    assert isinstance(key_upd, RowChange) and key_upd.old == {"id": "1", "code": "b", "note": None}
    assert isinstance(dele, RowChange) and dele.old == {"id": "2", "code": "b", "note": None}
    assert ins.key_columns == ("id", "code", "note")  # with FULL, PostgreSQL flags every column as identity

    last = changes[8]
    assert isinstance(last, RowChange) and last.new == {"id": "9", "code": "z", "note": "n"}
    truncate = changes[9]
    assert isinstance(truncate, TruncateChange)
    assert sorted(truncate.tables) == ["public.rid_default", "public.rid_full"]
    assert truncate.restart_identity and not truncate.cascade


def test_unchanged_toast_values_on_platform_tasks(repl: Repl) -> None:
    pub = repl.publication("tasks")
    slot = repl.slot()
    big = secrets.token_hex(50_000)  # 100 kB that does not compress: stored out of line
    embedding = "[" + ",".join(f"{i / 1536:.6f}" for i in range(1536)) + "]"
    task_id = uuid.uuid4()
    with repl.connect() as conn:
        conn.execute(
            "insert into tasks (id, user_id, title, description, embedding) values (%s, %s, 'toast', %s, %s)",
            [task_id, uuid.uuid4(), big, embedding],
        )
        conn.execute("update tasks set status = 'running', metadata = '{\"step\": 1}' where id = %s", [task_id])
        conn.execute("update tasks set description = 'short now' where id = %s", [task_id])

    with repl.reader() as reader:
        reader.start(slot, pub)
        insert_txn, untouched_txn, touched_txn = collect(reader, 3)
    (insert,) = rows(insert_txn)
    assert insert.new is not None and insert.new["description"] == big and insert.unchanged_toast_columns == ()
    (untouched,) = rows(untouched_txn)
    assert untouched.kind == "update" and untouched.new is not None
    assert set(untouched.unchanged_toast_columns) == {"description", "embedding"}
    assert "description" not in untouched.new and "embedding" not in untouched.new  # not NULL: absent
    assert untouched.new["status"] == "running" and untouched.new["metadata"] == '{"step": 1}'
    (touched,) = rows(touched_txn)
    assert touched.new is not None and touched.new["description"] == "short now"
    assert touched.unchanged_toast_columns == ("embedding",)


def test_transactions_grouped_with_xid_and_delivered_in_commit_order(repl: Repl) -> None:
    repl.sql("create table grouped (id int primary key, v text)", "create table unpublished (id int)")
    pub = repl.publication("grouped")
    slot = repl.slot()
    with repl.connect() as first, repl.connect() as second:
        first.execute("begin")
        xid_first = first.execute("select pg_current_xact_id()::text::bigint").fetchone()[0]
        first.execute("insert into grouped values (1, 'first, begun first')")
        second.execute("begin")
        xid_second = second.execute("select pg_current_xact_id()::text::bigint").fetchone()[0]
        second.execute("insert into grouped values (2, 'second')")
        second.execute("insert into unpublished values (1)")
        second.execute("insert into grouped values (3, 'second')")
        second.execute("update grouped set v = 'second, updated' where id = 2")
        second.execute("commit")
        first.execute("insert into grouped values (4, 'first, committed last')")
        first.execute("commit")
        first.execute("insert into unpublished values (2)")  # a transaction with nothing published
        first.execute("insert into grouped values (5, 'third')")

    with repl.connect() as conn:
        sql_view = conn.execute(
            "select lsn::text, xid::text::bigint, data from pg_logical_slot_peek_binary_changes("
            "%s, null, null, 'proto_version', '1', 'publication_names', %s)",
            [slot, pub],
        ).fetchall()
    commit_ends = {xid: Lsn.parse(lsn) for lsn, xid, data in sql_view if data[:1] == b"C"}

    with repl.reader() as reader:
        reader.start(slot, pub)
        txns = collect(reader, 3)
        assert_quiet(reader, 0.3)
    second_txn, first_txn, third_txn = txns
    assert second_txn.xid == xid_second and first_txn.xid == xid_first
    assert [(c.kind, c.new) for c in rows(second_txn)] == [
        ("insert", {"id": "2", "v": "second"}),
        ("insert", {"id": "3", "v": "second"}),
        ("update", {"id": "2", "v": "second, updated"}),
    ]
    assert [c.new for c in rows(first_txn)] == [
        {"id": "1", "v": "first, begun first"},
        {"id": "4", "v": "first, committed last"},
    ]
    assert inserted_ids([third_txn]) == [5]
    assert second_txn.commit_lsn < second_txn.end_lsn < first_txn.commit_lsn < first_txn.end_lsn
    assert first_txn.end_lsn < third_txn.commit_lsn
    for txn in txns:
        assert commit_ends[txn.xid] == txn.end_lsn  # the server's own view of where each commit ends
        assert all(txn.commit_lsn > c.lsn for c in rows(txn))
        assert abs(txn.commit_ts - dt.datetime.now(dt.UTC)) < dt.timedelta(minutes=5)
    assert second_txn.commit_ts <= first_txn.commit_ts <= third_txn.commit_ts


# --------------------------------------------------------------------------------------
# Snapshot export
# --------------------------------------------------------------------------------------


def test_exported_snapshot_plus_stream_equals_final_table(repl: Repl) -> None:
    repl.sql(
        "create table snap_items (id int primary key, val text)",
        "insert into snap_items select g, 'initial ' || g from generate_series(1, 200) g",
    )
    pub = repl.publication("snap_items")
    slot = repl.slot_name()
    stop = threading.Event()
    writes = [0]
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            with repl.connect() as conn:
                i = 1000
                while not stop.is_set():
                    i += 1
                    conn.execute("insert into snap_items values (%s, 'streamed')", [i])
                    conn.execute("update snap_items set val = 'updated ' || %s where id = %s", [i, i % 200 + 1])
                    if i % 4 == 0:
                        conn.execute("delete from snap_items where id in (%s, %s)", [i - 2, i % 200 + 1])
                    writes[0] = i - 1000
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        wait_until(lambda: writes[0] > 20, what="concurrent writes before the slot exists")
        with exported_snapshot(repl.url, slot) as info:
            assert info.snapshot_name
            with repl.connect() as snap:
                snap.execute("begin isolation level repeatable read")
                snap.execute(f"set transaction snapshot '{info.snapshot_name}'")
                wait_until(lambda: writes[0] > 60, what="writes after the snapshot")  # the snapshot must not see them
                snapshot_rows = dict(snap.execute("select id, val from snap_items").fetchall())
                snap.execute("commit")
        created_at = writes[0]
        wait_until(lambda: writes[0] > created_at + 60, what="writes after the slot was created")
    finally:
        stop.set()
        thread.join(10)
    assert not errors, errors
    repl.sql("insert into snap_items values (-1, 'end marker')")
    with repl.connect() as conn:
        final = {str(k): v for k, v in conn.execute("select id, val from snap_items").fetchall()}

    state: dict[str, str | None] = {str(k): v for k, v in snapshot_rows.items()}
    streamed = 0
    with repl.reader() as reader:
        reader.start(slot, pub)
        done = False
        for txn in reader.transactions(timeout=15):
            for change in rows(txn):
                streamed += 1
                if change.kind == "insert":
                    assert change.new is not None
                    assert change.new["id"] not in state, f"row {change.new['id']} seen twice (snapshot and stream)"
                    state[str(change.new["id"])] = change.new["val"]
                    done = done or change.new["id"] == "-1"
                elif change.kind == "update":
                    assert change.new is not None
                    assert change.key["id"] in state, f"update of row {change.key['id']} the snapshot missed"
                    state[str(change.key["id"])] = change.new["val"]
                else:
                    assert change.key["id"] in state, f"delete of row {change.key['id']} the snapshot missed"
                    del state[str(change.key["id"])]
            if done:
                break
    assert done, "the end marker never arrived"
    assert streamed > 100 and len(snapshot_rows) > 200  # both halves did real work
    assert state == final


def test_exported_snapshot_drops_slot_when_block_fails(repl: Repl) -> None:
    slot = repl.slot_name()
    with pytest.raises(RuntimeError), exported_snapshot(repl.url, slot):
        raise RuntimeError("copy failed")
    with repl.connect() as conn:
        assert not slot_exists(conn, slot)


# --------------------------------------------------------------------------------------
# Confirm, resume, reconnect
# --------------------------------------------------------------------------------------


def test_confirm_semantics_and_resume_from_confirmed_position(repl: Repl) -> None:
    repl.sql("create table confirmed_items (id int primary key)", "create table other_noise (id int)")
    pub = repl.publication("confirmed_items")
    slot = repl.slot()
    created = confirmed_flush(repl, slot)
    repl.sql(*(f"insert into confirmed_items values ({i})" for i in (1, 2, 3)))

    with repl.reader() as reader:  # consume, confirm nothing, disconnect
        reader.start(slot, pub)
        first_pass = collect(reader, 3)
        assert_quiet(reader, 0.3)
    wait_slot_inactive(repl, slot)
    assert created <= confirmed_flush(repl, slot) <= first_pass[0].commit_lsn  # nothing delivered was confirmed

    with repl.reader() as reader:  # everything comes again; confirm only the first
        reader.start(slot, pub)
        second_pass = collect(reader, 3)
        assert [(t.xid, t.commit_lsn, t.end_lsn) for t in second_pass] == [
            (t.xid, t.commit_lsn, t.end_lsn) for t in first_pass
        ]
        assert inserted_ids(second_pass) == [1, 2, 3]
        reader.confirm(second_pass[0])
        assert_quiet(reader, 0.3)
        assert reader.confirmed_lsn == second_pass[0].end_lsn
    wait_slot_inactive(repl, slot)
    assert confirmed_flush(repl, slot) == second_pass[0].end_lsn

    with repl.reader() as reader:  # only the unconfirmed ones come again
        reader.start(slot, pub)
        third_pass = collect(reader, 2)
        assert [t.commit_lsn for t in third_pass] == [t.commit_lsn for t in first_pass[1:]]
        assert_quiet(reader, 0.3)
        reader.confirm(third_pass[-1].end_lsn)
        # With everything confirmed, WAL the subscription does not care about is released as well: the
        # slot's confirmed position moves past the end of the unrelated transaction. (Judged by LSNs, not
        # by slot_lag_bytes: other databases of the shared test cluster write WAL at any moment, so the lag
        # against the cluster's insert position can grow while this slot is released.)
        with repl.connect() as conn:
            conn.execute("insert into other_noise select generate_series(1, 5000)")
            noise_end = Lsn.parse(str(conn.execute("select pg_current_wal_insert_lsn()").fetchone()[0]))
        # A record ending exactly at a page boundary reports the insert position after the next page's
        # header (at most 40 bytes on): allow that much.
        wait_until(
            lambda: (assert_quiet(reader, 0.1), confirmed_flush(repl, slot) >= noise_end - 40)[1],
            what="the slot to move past the unrelated transaction's WAL",
        )

    with repl.reader() as reader:  # a consumer's stored position as start_lsn skips what it has
        repl.sql("insert into confirmed_items values (4)", "insert into confirmed_items values (5)")
        reader.start(slot, pub)
        both = collect(reader, 2)
        reader.close()
        reader.start(slot, pub, start_lsn=both[0].end_lsn)
        assert inserted_ids(collect(reader, 1)) == [5]


def test_reconnects_after_server_restart_without_loss(repl: Repl, server_pair: ServerPair) -> None:
    repl.sql("create table restart_items (id int primary key, v text)")
    pub = repl.publication("restart_items")
    slot = repl.slot()
    received: list[Transaction] = []
    stop = threading.Event()
    errors: list[BaseException] = []
    reader = repl.reader()
    reader.start(slot, pub)

    def store(txn: Transaction) -> None:
        received.append(txn)  # the test's "durable store"
        reader.confirm(txn)

    def run() -> None:
        try:
            reader.run(store, stop)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        for i in (1, 2, 3):
            repl.sql(f"insert into restart_items values ({i}, 'before')", f"update restart_items set v = 'x{i}'")
        wait_until(lambda: len(received) >= 6, what="transactions before the restart")
        server_pair.source.restart()
        for i in (4, 5, 6):
            repl.sql(f"insert into restart_items values ({i}, 'after')")
        wait_until(lambda: 6 in inserted_ids(received) or bool(errors), what="transactions after the restart")
    finally:
        stop.set()
        thread.join(15)
        reader.close()
    assert not errors, errors
    assert reader.stats.reconnects >= 1
    commit_lsns = [t.commit_lsn for t in received]
    assert commit_lsns == sorted(set(commit_lsns)), "duplicates or out-of-order delivery"

    applied: list[int] = []
    stored = Lsn(0)
    for txn in received:  # the consumer-side rule, which must hold even if the server resent something
        if txn.commit_lsn <= stored:
            continue
        applied.extend(inserted_ids([txn]))
        stored = txn.commit_lsn
    assert applied == [1, 2, 3, 4, 5, 6]
    with repl.connect() as conn:
        assert [r[0] for r in conn.execute("select id from restart_items order by id")] == applied


def test_connection_loss_redelivers_unconfirmed_and_reader_skips_duplicates(repl: Repl) -> None:
    repl.sql("create table lost_items (id int primary key)")
    pub = repl.publication("lost_items")
    slot = repl.slot()
    repl.sql(*(f"insert into lost_items values ({i})" for i in (1, 2, 3)))
    with repl.reader() as reader:
        reader.start(slot, pub)
        before = collect(reader, 3)
        reader.confirm(before[0])
        assert_quiet(reader, 0.2)
        with repl.connect() as conn:
            state = get_slot(conn, slot)
            assert state is not None and state.active_pid is not None
            conn.execute("select pg_terminate_backend(%s)", [state.active_pid])
        repl.sql("insert into lost_items values (4)")
        after = collect(reader, 1)
        assert inserted_ids(after) == [4]  # 2 and 3 were sent again by the server, and not delivered twice
        stats = reader.stats
        assert stats.reconnects == 1 and stats.redeliveries_skipped == 2 and stats.transactions_delivered == 4


def test_dropped_slot_fails_the_reader_instead_of_retrying_forever(repl: Repl) -> None:
    repl.sql("create table dropped_items (id int primary key)")
    pub = repl.publication("dropped_items")
    slot = repl.slot()
    with pytest.raises(ReplicationError, match="no_such_publication do not exist"), repl.reader() as reader:
        reader.start(slot, [pub, "no_such_publication"])
    errors: list[BaseException] = []
    with repl.reader() as reader:
        reader.start(slot, pub)

        def run() -> None:
            try:
                reader.run(lambda txn: None, threading.Event())
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        with repl.connect() as conn:
            wait_until(lambda: (s := get_slot(conn, slot)) is not None and s.active, what="the reader to attach")
            assert drop_slot(conn, slot)
        thread.join(15)
        assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], SlotNotFoundError), errors

    with pytest.raises(SlotNotFoundError), repl.reader() as reader:
        reader.start(slot, pub)
