"""Pages served from stored wire-form segments (issue 16) are exactly what a fresh read of the rows gives.

The dev server stores each log segment once as plain JSON and once as raw deflate, and frames stored pieces into
a gzip member per request instead of compressing again. These tests judge the served bytes with independent
oracles: Python's own gzip decoder over the raw bytes on the wire, and the rows read back from PostgreSQL as text
by psycopg (never through the server's JSON). They also pin Accept-Encoding negotiation: identity must still work,
``q=0`` refuses a coding, and every encoding of a page carries the same handle, offset and ETag.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import struct
import time
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import zstandard

from pgferry.sync.store import ShapeLog
from pgferry.sync.wire import choose_encoding, compress_segment, crc32_combine
from pgferry.testing.asgi import ServedApp
from tests.sync_helpers import SECRET, USER, insert_task, make_server


def moving_lsn_masked(pages: list[bytes]) -> list[bytes]:
    """Pages with the up-to-date's ``global_last_seen_lsn`` masked: it follows the server's WAL position (keepalives
    included), so two reads of the same range may differ there and nowhere else."""
    return [re.sub(rb'"global_last_seen_lsn":"\d+"', b'"global_last_seen_lsn":"N"', page) for page in pages]


# Values that COPY's text format, JSON escaping and compression each have a chance to get wrong.
TRICKY = [
    'back\\slash \\\\ double and "quotes"',
    "line1\nline2\ttab\rcr \x01 control",
    "unicode é ☃ 𝄞 \u2028 separator",
    "",
    "/slashes/ in // keys",
    "x" * 3000,
]


def _raw_get(served: ServedApp, params: dict[str, str], accept: str | None) -> tuple[httpx.Response, bytes]:
    """The response and its body exactly as sent (no decoding by httpx)."""
    headers = {"accept-encoding": accept} if accept is not None else {}
    query = {"table": "tasks", "secret": SECRET, **params}
    with httpx.Client(timeout=30) as client:
        if accept is None:
            client.headers.pop("accept-encoding", None)
        with client.stream("GET", served.url + "/v1/shape", params=query, headers=headers) as response:
            raw = b"".join(response.iter_raw())
    return response, raw


def _unzstd(raw: bytes) -> bytes:
    """Every frame of a zstd stream, decoded by the zstandard package."""
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw), read_across_frames=True)
    return bytes(reader.read())


def _decoded(response: httpx.Response, raw: bytes) -> bytes:
    encoding = response.headers.get("content-encoding", "identity")
    if encoding == "gzip":
        return gzip.decompress(raw)
    if encoding == "zstd":
        return _unzstd(raw)
    assert encoding == "identity", encoding
    return raw


def _page_through(served: ServedApp, accept: str | None, params: dict[str, str] | None = None) -> list[bytes]:
    """Every page's decoded body from offset -1 to up-to-date."""
    params = dict(params or {})
    query = {**params, "offset": "-1"}
    bodies: list[bytes] = []
    while True:
        response, raw = _raw_get(served, query, accept)
        assert response.status_code == 200, raw[:300]
        bodies.append(_decoded(response, raw))
        if "electric-up-to-date" in response.headers:
            return bodies
        query = {**params, "offset": response.headers["electric-offset"], "handle": response.headers["electric-handle"]}


def _rows_from_postgres(url: str) -> dict[str, dict[str, str | None]]:
    """Every tasks row as Electric's value object, read as text by psycopg: the oracle."""
    with psycopg.connect(url, options="-c TimeZone=UTC -c DateStyle=ISO,MDY -c extra_float_digits=1") as conn:
        cursor = conn.execute("select * from tasks limit 0")
        names = [d.name for d in cursor.description or []]
        select = ", ".join(f'"{n}"::text' for n in names)
        rows = conn.execute(f"select {select} from tasks").fetchall()
    return {str(r[0]): dict(zip(names, r, strict=True)) for r in rows}


@pytest.fixture
def db(target_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(target_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def served(target_url: str, tmp_path: Path) -> Iterator[ServedApp]:
    # Small pages: segments of 16 KiB, so the snapshot spans many segments and pages.
    with make_server(target_url, tmp_path / "sync", max_chunk_bytes=64 * 1024) as app:
        yield app


def _seed(db: psycopg.Connection[Any], count: int) -> None:
    for i, text in enumerate(TRICKY):
        insert_task(db, f"tricky {i}: {text}", description=text, metadata=json.dumps({"t": text}))
    db.execute(
        "insert into tasks (user_id, title, description, tags) select %s, 'bulk ' || i || ' \\ \"q\"',"
        " repeat('d', i %% 700), array['a\\b', 'c\"d'] from generate_series(1, %s) i",
        [USER, count],
    )


def test_snapshot_pages_equal_an_independent_rendering_in_every_encoding(
    served: ServedApp, db: psycopg.Connection[Any], target_url: str
) -> None:
    _seed(db, 1500)
    expected = _rows_from_postgres(target_url)
    fresh = _page_through(served, "gzip")  # the fresh shape, served while its snapshot is written
    again_gzip = _page_through(served, "gzip")
    again_zstd = _page_through(served, "zstd")
    again_identity = _page_through(served, "identity")
    no_header = _page_through(served, None)
    assert len(fresh) > 3, "the snapshot should span several pages"

    # The same bytes, page for page, however they were encoded and whether or not the shape was fresh — except the
    # last page's up-to-date, whose global_last_seen_lsn follows the server's WAL position between the requests.
    assert (
        moving_lsn_masked(again_gzip)
        == moving_lsn_masked(again_zstd)
        == moving_lsn_masked(again_identity)
        == moving_lsn_masked(no_header)
    )
    assert again_gzip[:-1] == again_zstd[:-1] == again_identity[:-1] == no_header[:-1]  # nothing else differs
    assert b"".join(fresh[:-1]) == b"".join(again_gzip[:-1])
    messages = [m for body in again_identity for m in json.loads(body)]
    rows = [m for m in messages if "key" in m]
    assert messages[-1]["headers"]["control"] == "up-to-date"
    assert {m["value"]["id"]: m["value"] for m in rows} == expected
    assert len(rows) == len(expected)
    for m in rows:
        assert m["key"] == '"public"."tasks"/"' + m["value"]["id"] + '"'
        assert m["headers"] == {"operation": "insert", "relation": ["public", "tasks"]}
    # Compact JSON as before: what a fresh json.dumps of the messages gives, byte for byte.
    for body in again_identity:
        assert body == json.dumps(json.loads(body), separators=(",", ":"), ensure_ascii=False).encode()


def test_live_changes_are_served_from_stored_segments_identically(
    served: ServedApp, db: psycopg.Connection[Any], target_url: str
) -> None:
    _seed(db, 50)
    _page_through(served, "gzip")
    head, _raw = _raw_get(served, {"offset": "now"}, "gzip")
    handle, offset = head.headers["electric-handle"], head.headers["electric-offset"]
    ids = []
    for i, text in enumerate(TRICKY):
        ids.append(insert_task(db, f"live {i}: {text}", description=text * 2))
    db.execute("update tasks set description = %s where id = %s", ["changed \\ é", ids[0]])
    # Wait until the last change is in the log, then read the same range in every encoding.
    query = {"offset": offset, "handle": handle}
    bodies: dict[str, list[bytes]] = {}
    for accept in ("gzip", "identity", "gzip;q=0", "br", "*", "zstd", "gzip, deflate, br, zstd"):
        seen: list[bytes] = []
        page_query = dict(query)
        for _ in range(50):
            live = {**page_query, "live": "true", "cursor": ""}
            response, raw = _raw_get(served, live, accept)
            assert response.status_code == 200
            seen.append(_decoded(response, raw))
            page_query = {"offset": response.headers["electric-offset"], "handle": handle}
            if b"changed \\\\ \xc3\xa9" in b"".join(seen):
                break
        bodies[accept] = seen
    changes = [m for body in bodies["identity"] for m in json.loads(body) if "key" in m]
    expected = _rows_from_postgres(target_url)
    inserted = [m for m in changes if m["headers"]["operation"] == "insert"]
    assert [m["value"]["id"] for m in inserted] == ids
    for m in inserted:
        number = int(m["value"]["title"].split(":", 1)[0].removeprefix("live "))
        assert m["value"]["description"] == TRICKY[number] * 2
        assert {k: v for k, v in m["value"].items() if k not in ("description", "updated_at")} == {
            k: v for k, v in expected[m["value"]["id"]].items() if k not in ("description", "updated_at")
        }
    [update] = [m for m in changes if m["headers"]["operation"] == "update"]
    assert update["value"]["description"] == "changed \\ é"
    flattened = {
        accept: [m for body in seen for m in json.loads(body) if "key" in m] for accept, seen in bodies.items()
    }
    assert all(value == flattened["identity"] for value in flattened.values())


def test_accept_encoding_variants_and_identical_headers(served: ServedApp, db: psycopg.Connection[Any]) -> None:
    _seed(db, 400)
    _page_through(served, "gzip")  # materialise it
    variants = {
        "gzip": "gzip",
        "gzip, deflate, br": "gzip",
        "GZIP;q=0.8": "gzip",
        "*": "zstd",
        "zstd": "zstd",
        "gzip, deflate, br, zstd": "zstd",
        "zstd;q=0.5, gzip": "gzip",
        "zstd;q=0, gzip;q=0": "identity",
        "identity": "identity",
        "gzip;q=0": "identity",
        "gzip;q=0, *;q=0.5": "zstd",
        "gzip;q=0, zstd;q=0, *;q=0.5": "identity",
        "br": "identity",
        "gzip;q=0.5, identity": "identity",
        "": "identity",
    }
    pages: dict[str, tuple[dict[str, str], bytes]] = {}
    for accept, wanted in variants.items():
        response, raw = _raw_get(served, {"offset": "-1"}, accept)
        assert response.status_code == 200
        assert response.headers.get("content-encoding", "identity") == wanted, accept
        assert response.headers.get("vary", "").lower() == "accept-encoding", accept
        assert int(response.headers["content-length"]) == len(raw)
        pages[accept] = (dict(response.headers), _decoded(response, raw))
    reference_headers, reference_body = pages["identity"]
    for accept, (headers, body) in pages.items():
        assert moving_lsn_masked([body]) == moving_lsn_masked([reference_body]), accept
        for name in ("electric-handle", "electric-offset", "etag", "cache-control", "electric-schema"):
            assert headers[name] == reference_headers[name], (accept, name)
    # A conditional request gets a 304 whatever the encoding.
    for accept in ("gzip", "identity", "zstd"):
        response = httpx.get(
            served.url + "/v1/shape",
            params={"table": "tasks", "offset": "-1", "secret": SECRET},
            headers={"accept-encoding": accept, "if-none-match": reference_headers["etag"]},
        )
        assert response.status_code == 304


def test_small_bodies_stay_uncompressed_as_before(served: ServedApp, db: psycopg.Connection[Any]) -> None:
    insert_task(db, "one small row")
    response, raw = _raw_get(served, {"offset": "-1"}, "gzip")
    assert len(raw) < 1024
    assert "content-encoding" not in response.headers
    assert json.loads(raw)[0]["value"]["title"] == "one small row"


def test_an_offset_inside_a_segment_is_served_from_the_entries(served: ServedApp, db: psycopg.Connection[Any]) -> None:
    """Offsets this server hands out are segment boundaries; any other valid one still gets exactly the entries
    after it."""
    _seed(db, 1500)
    all_rows = [m for body in _page_through(served, "identity") for m in json.loads(body) if "key" in m]
    head, _ = _raw_get(served, {"offset": "now"}, "identity")
    handle = head.headers["electric-handle"]
    response, raw = _raw_get(served, {"offset": "0_7", "handle": handle}, "gzip")
    assert response.status_code == 200
    page = [m for m in json.loads(_decoded(response, raw)) if "key" in m]
    assert page == all_rows[8 : 8 + len(page)]
    assert response.headers["electric-offset"] == f"0_{7 + len(page)}"


def test_restart_reloads_segments_and_cuts_a_torn_tail(target_url: str, tmp_path: Path, db: Any) -> None:
    _seed(db, 300)
    with make_server(target_url, tmp_path / "s", max_chunk_bytes=64 * 1024) as app:
        before = _page_through(app, "gzip")
        handle = _raw_get(app, {"offset": "now"}, "gzip")[0].headers["electric-handle"]
    directory = tmp_path / "s" / "shapes" / handle
    with open(directory / "index", "ab") as index:
        index.write(b"\x01\x00\x00")  # a torn segment record: a crash mid-append
    with open(directory / "data", "ab") as data:
        data.write(b"garbage")
    with make_server(target_url, tmp_path / "s", max_chunk_bytes=64 * 1024) as app:
        after = _page_through(app, "gzip")
        assert _raw_get(app, {"offset": "now"}, "gzip")[0].headers["electric-handle"] == handle
    assert [json.loads(b)[:-1] if i == len(before) - 1 else json.loads(b) for i, b in enumerate(before)] == [
        json.loads(b)[:-1] if i == len(after) - 1 else json.loads(b) for i, b in enumerate(after)
    ]
    assert (directory / "data").read_bytes()[-7:] != b"garbage"


def test_meta_names_its_columns_so_older_versions_drop_the_shape_and_older_metas_still_load(
    target_url: str, tmp_path: Path, db: Any
) -> None:
    """An older pgferry reads meta.json's "columns" and drops the shape when they are missing, which is what it must
    do with deflated-only segments it cannot read; this version writes "table_columns" and still loads a meta with
    "columns" (written before the rename)."""
    _seed(db, 200)
    with make_server(target_url, tmp_path / "s") as app:
        before = _page_through(app, "gzip")
        handle = _raw_get(app, {"offset": "now"}, "gzip")[0].headers["electric-handle"]
    meta_path = tmp_path / "s" / "shapes" / handle / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert "columns" not in meta and meta["table_columns"][0] == "id"
    meta["columns"] = meta.pop("table_columns")
    meta_path.write_text(json.dumps(meta))
    with make_server(target_url, tmp_path / "s") as app:
        assert _raw_get(app, {"offset": "now"}, "gzip")[0].headers["electric-handle"] == handle
        assert moving_lsn_masked(_page_through(app, "gzip")) == moving_lsn_masked(before)


def test_a_log_of_an_older_version_is_dropped_and_its_clients_refetch(target_url: str, tmp_path: Path, db: Any) -> None:
    insert_task(db, "old")
    with make_server(target_url, tmp_path / "s") as app:
        handle = _raw_get(app, {"offset": "-1"}, "gzip")[0].headers["electric-handle"]
    directory = tmp_path / "s" / "shapes" / handle
    (directory / "log").write_bytes(b"0 0 {}\n")  # what pgferry wrote before segments
    with make_server(target_url, tmp_path / "s") as app:
        response, _ = _raw_get(app, {"offset": "0_0", "handle": handle}, "gzip")
        assert response.status_code == 409
        assert response.headers["electric-handle"] != handle


def test_store_segments_round_trip(tmp_path: Path) -> None:
    from pgferry.sync.protocol import LogOffset
    from pgferry.sync.wire import gzip_body, zstd_body

    log = ShapeLog(tmp_path / "shape")
    messages = [json.dumps({"n": i, "s": TRICKY[i % len(TRICKY)]}).encode() for i in range(100)]
    log.append([(LogOffset(0, i), messages[i]) for i in range(60)])
    log.append([(LogOffset(0, i), messages[i]) for i in range(60, 100)])
    run = log.read_segments(LogOffset(-1, 0), max_bytes=1 << 30, encoding="gzip")
    assert run is not None and run.at_end and run.last_offset == LogOffset(0, 99)
    assert gzip.decompress(gzip_body(run.deflated, b"]")) == b"[" + b",".join(messages) + b"]"
    frames = log.read_segments(LogOffset(-1, 0), max_bytes=1 << 30, encoding="zstd")
    assert frames is not None
    assert _unzstd(zstd_body(frames.zstd, b"]")) == b"[" + b",".join(messages) + b"]"
    assert log.read_segments(LogOffset(0, 10), max_bytes=1 << 30, encoding="gzip") is None  # not a boundary
    chunk = log.read_after(LogOffset(0, 10), max_bytes=1 << 30)
    assert chunk.messages == messages[11:]
    log.close()
    reopened = ShapeLog(tmp_path / "shape")
    assert len(reopened) == 100 and reopened.segments == 2
    assert reopened.read_after(LogOffset(0, 58), max_bytes=1 << 30).messages == messages[59:]
    reopened.close()


def _append_snapshot_slice(
    log: ShapeLog, messages: list[bytes], first: int, last: int, *, zstd: bytes | None = b""
) -> None:
    """``messages[first:last]`` appended as the server appends a snapshot slice: deflated only, no zstd frame yet
    (``zstd=None``: one made now)."""
    plain = b",".join(messages[first:last])
    lengths = array("q", map(len, messages[first:last]))
    log.append_joined(0, first, plain, lengths, deflated=compress_segment(plain), zstd=zstd, store_plain=False)


def test_compressed_only_segments_serve_every_form_and_reload(tmp_path: Path) -> None:
    """Snapshot segments are stored without their plain bytes: identity pages, offsets inside them and reads that
    cross into plain-stored segments must all give the same messages, also after a reload."""

    from pgferry.sync.protocol import LogOffset
    from pgferry.sync.wire import gzip_body

    log = ShapeLog(tmp_path / "shape")
    messages = [json.dumps({"n": i, "s": TRICKY[i % len(TRICKY)]}).encode() for i in range(300)]

    _append_snapshot_slice(log, messages, 0, 100, zstd=None)
    _append_snapshot_slice(log, messages, 100, 200, zstd=None)
    log.append([(LogOffset(7, i), messages[200 + i]) for i in range(100)])  # a replicated transaction: plain
    data_size = (tmp_path / "shape" / "data").stat().st_size
    assert data_size < len(b",".join(messages[:200])) + len(b",".join(messages[200:]))  # no plain for the snapshot
    offsets = [LogOffset(0, i) for i in range(200)] + [LogOffset(7, i) for i in range(100)]
    everything = b"[" + b",".join(messages) + b"]"

    def check(current: ShapeLog) -> None:
        whole = current.read_segments(LogOffset(-1, 0), max_bytes=1 << 30, encoding="identity")
        assert whole is not None and whole.at_end
        assert b"[" + b",".join(whole.plain) + b"]" == everything
        gz = current.read_segments(LogOffset(-1, 0), max_bytes=1 << 30, encoding="gzip")
        assert gz is not None and gzip.decompress(gzip_body(gz.deflated, b"]")) == everything
        small = current.read_segments(LogOffset(0, 99), max_bytes=1, encoding="gzip", plain_below=1 << 30)
        assert small is not None and small.plain == [b",".join(messages[100:200])]
        for after in (LogOffset(0, 0), LogOffset(0, 98), LogOffset(0, 99), LogOffset(0, 150), LogOffset(7, 3)):
            index = offsets.index(after)
            assert current.read_after(after, max_bytes=1 << 30).messages == messages[index + 1 :]
        partial = current.read_after(LogOffset(0, 150), max_bytes=4000)
        assert partial.messages == messages[151 : 151 + len(partial.messages)] and not partial.at_end

    check(log)
    log.close()
    reopened = ShapeLog(tmp_path / "shape")
    assert len(reopened) == 300 and reopened.segments == 3
    check(reopened)
    reopened.close()


def test_a_damaged_compressed_only_segment_is_refused_not_served(tmp_path: Path) -> None:

    from pgferry.sync.protocol import LogOffset
    from pgferry.sync.store import CorruptSegmentError

    log = ShapeLog(tmp_path / "shape")
    messages = [json.dumps({"n": i, "pad": "p" * (i % 50)}).encode() for i in range(200)]
    _append_snapshot_slice(log, messages, 0, len(messages), zstd=None)  # its zstd frame after the deflate piece
    log.close()
    data = bytearray((tmp_path / "shape" / "data").read_bytes())
    data[len(data) // 3] ^= 0x20  # inside the deflate piece (the zstd frame follows it)
    (tmp_path / "shape" / "data").write_bytes(bytes(data))
    reopened = ShapeLog(tmp_path / "shape")
    with pytest.raises(CorruptSegmentError):
        reopened.read_segments(LogOffset(-1, 0), max_bytes=1 << 30, encoding="identity")
    with pytest.raises(CorruptSegmentError):
        reopened.read_after(LogOffset(0, 5), max_bytes=1 << 30)
    reopened.close()


def test_zstd_frames_are_made_after_the_segment_and_survive_a_reload(tmp_path: Path) -> None:
    """Snapshot segments get their zstd frames later (frame records in the index): until then a zstd read falls
    back to gzip or identity, after it the frames are served, and a reload keeps them; a torn frame record is cut
    off like any torn tail."""

    from pgferry.sync.protocol import LogOffset
    from pgferry.sync.wire import gzip_body, zstd_body

    log = ShapeLog(tmp_path / "shape")
    messages = [json.dumps({"n": i, "s": TRICKY[i % len(TRICKY)]}).encode() for i in range(300)]
    for first in (0, 100):
        _append_snapshot_slice(log, messages, first, first + 100)
    log.append([(LogOffset(7, i), messages[200 + i]) for i in range(100)])  # a transaction: its frame made at once
    everything = b"[" + b",".join(messages) + b"]"
    start = LogOffset(-1, 0)
    assert log.segments_without_zstd() == [0, 1]
    as_gzip = log.read_segments(start, max_bytes=1 << 30, encoding="zstd", fallback="gzip")
    assert as_gzip is not None and as_gzip.encoding == "gzip" and not as_gzip.zstd
    assert gzip.decompress(gzip_body(as_gzip.deflated, b"]")) == everything
    as_plain = log.read_segments(start, max_bytes=1 << 30, encoding="zstd", fallback="identity")
    assert as_plain is not None and as_plain.encoding == "identity"
    assert b"[" + b",".join(as_plain.plain) + b"]" == everything
    last = log.read_segments(LogOffset(0, 199), max_bytes=1 << 30, encoding="zstd", fallback="gzip")
    assert last is not None and last.encoding == "zstd"  # the transaction's segment has its frame
    assert log.make_zstd_frame(0) and log.make_zstd_frame(1)
    assert log.segments_without_zstd() == []

    def zstd_everything(current: ShapeLog) -> bytes:
        run = current.read_segments(start, max_bytes=1 << 30, encoding="zstd", fallback="gzip")
        assert run is not None and run.encoding == "zstd"
        return _unzstd(zstd_body(run.zstd, b"]"))

    assert zstd_everything(log) == everything
    log.close()
    assert not log.make_zstd_frame(0)  # closed (deleted shape): nothing is written
    reopened = ShapeLog(tmp_path / "shape")
    assert reopened.segments_without_zstd() == [] and zstd_everything(reopened) == everything
    assert reopened.read_after(LogOffset(0, 42), max_bytes=1 << 30).messages == messages[43:]
    reopened.close()

    # A frame record whose frame never reached the data file (a crash between the two writes) is cut off, and
    # its segment is back to "no frame yet"; the data before it is untouched.
    index = tmp_path / "shape" / "index"
    data_size = (tmp_path / "shape" / "data").stat().st_size
    with open(index, "ab") as handle:
        handle.write(struct.pack("<10q", 4, 0, 0, 0, 0, 0, 0, 0, data_size, 1000))
    again = ShapeLog(tmp_path / "shape")
    assert again.segments_without_zstd() == [] and zstd_everything(again) == everything
    assert len(again) == 300
    again.close()


def test_a_zstd_client_gets_gzip_until_the_frames_are_made_then_zstd(
    served: ServedApp, db: psycopg.Connection[Any]
) -> None:
    """Right after a snapshot a zstd client is served gzip (or identity when it refuses gzip), never a broken or
    empty zstd body; once the background filler is done, the same pages come as zstd, byte for byte the same
    JSON."""
    _seed(db, 1500)
    identity = _page_through(served, "identity")
    early = _page_through(served, "zstd")  # gzip not accepted: zstd or identity only
    assert moving_lsn_masked(early) == moving_lsn_masked(identity)
    deadline = time.monotonic() + 30
    while True:
        codings = set()
        query: dict[str, str] = {"offset": "-1"}
        pages: list[bytes] = []
        while True:
            response, raw = _raw_get(served, query, "zstd, gzip")
            codings.add(response.headers.get("content-encoding", "identity"))
            pages.append(_decoded(response, raw))
            if "electric-up-to-date" in response.headers:
                break
            query = {"offset": response.headers["electric-offset"], "handle": response.headers["electric-handle"]}
        assert moving_lsn_masked(pages) == moving_lsn_masked(identity)
        assert codings <= {"zstd", "gzip", "identity"}
        if "gzip" not in codings:
            break
        assert time.monotonic() < deadline, "the zstd frames were never made"
        time.sleep(0.2)
    assert "zstd" in codings


def test_a_snapshot_is_stored_compressed_only(served: ServedApp, db: psycopg.Connection[Any], tmp_path: Path) -> None:
    """The snapshot's plain JSON is not written to the data file (it is most of the bytes a fresh shape would put
    into the page cache), yet identity clients get it byte for byte."""
    _seed(db, 1500)
    identity = b"".join(_page_through(served, "identity"))
    handle = _raw_get(served, {"offset": "now"}, "gzip")[0].headers["electric-handle"]
    data_size = sum(f.stat().st_size for f in tmp_path.glob(f"sync/shapes/{handle}/data"))
    assert 0 < data_size < len(identity) // 2


def test_crc32_combine_and_negotiation_helpers() -> None:
    import zlib

    for a_len, b_len in [(0, 0), (3, 0), (0, 9), (1000, 1 << 16)]:
        a, b = os.urandom(a_len), os.urandom(b_len)
        assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)
    assert choose_encoding(None) == "identity"
    assert choose_encoding("gzip;q=0.001") == "gzip"
    assert choose_encoding("gzip;q=bad") == "identity"
    assert choose_encoding("x-unknown, gzip") == "gzip"
