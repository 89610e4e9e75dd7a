"""Response bodies assembled from log segments stored in their final wire form, with no re-encoding.

Why: a materialised shape is read by many clients, and compressing its pages again for each of them made the
tenth client cost the server as much as the first. Each log segment is stored once as plain JSON (the messages
joined by commas) and once as a *raw deflate* piece ended by a sync flush (byte aligned, with no reference to
anything before it). Such pieces can be laid end to end inside one gzip member, as pigz does, so a response is
``gzip header + deflate("[") + segment + deflate(",") + segment + … + deflate(tail, final) + CRC-32 + size``:
the stored bytes go to the socket as they are; only a few bytes of framing and the ``up-to-date`` tail are
compressed per request. The CRC-32 of the whole body is combined from the segments' stored CRCs (zlib's
``crc32_combine``, which Python's zlib does not expose).

Zstandard (when the ``zstandard`` package is installed) needs no such framing: a zstd stream may be several
frames one after another (RFC 8878), so each segment is stored as one frame and a response is
``frame("[") + segment + frame(",") + segment + … + frame(tail)``.

Encoding negotiation (:func:`choose_encoding`) follows RFC 9110's Accept-Encoding with q-values.

This module knows nothing about PostgreSQL, shapes or HTTP frameworks: it builds bytes.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

zstandard: Any
try:
    import zstandard
except ImportError:  # optional: without it the server offers gzip and identity only
    zstandard = None

# ISA-L's deflate (the ``isal`` package) writes the same format about four times as fast as zlib at level 1 with
# a slightly better ratio; a fresh snapshot is compressed on its way to the first client, so this is on the
# critical path of an initial sync. zlib is the fallback when the package is missing.
_deflate: Any
try:
    from isal import isal_zlib as _deflate
except ImportError:  # pragma: no cover - isal is a dependency of the sync extra
    _deflate = zlib

__all__ = [
    "AVAILABLE_ENCODINGS",
    "COMPRESS_LEVEL",
    "CorruptSegmentError",
    "GzipPiece",
    "choose_encoding",
    "compress_segment",
    "compress_zstd",
    "crc32_combine",
    "gzip_body",
    "inflate_segment",
    "segment_crc32",
    "zstd_body",
]

#: zlib level of stored segments: level 1 compresses JSON ~9x at several times the speed of level 6, and a fresh
#: snapshot is compressed on its way to the first client.
COMPRESS_LEVEL = 1
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # deflate, no name, no mtime, unknown OS
_POLY = 0xEDB88320


def segment_crc32(plain: bytes) -> int:
    """CRC-32 of a stored segment (the gzip trailer's): ISA-L's, about three times zlib's speed, same value."""
    return int(_deflate.crc32(plain))


def compress_segment(plain: bytes, level: int = COMPRESS_LEVEL) -> bytes:
    """Raw deflate of ``plain`` ending in a sync flush: byte aligned and self-contained, so it can be placed
    anywhere inside a deflate stream."""
    compressor = _deflate.compressobj(level, _deflate.DEFLATED, -15)
    return bytes(compressor.compress(plain) + compressor.flush(_deflate.Z_SYNC_FLUSH))


class CorruptSegmentError(Exception):
    """A compressed-only segment did not inflate to the bytes its CRC-32 was taken of: the data file was damaged
    underneath the server. Nothing is served from it."""


def inflate_segment(piece: bytes, crc: int, where: object) -> bytes:
    """The plain bytes of a stored deflate piece (:func:`compress_segment`'s output), checked against the CRC-32
    stored with it: a damaged file raises :class:`CorruptSegmentError` instead of serving
    wrong rows. ``where`` names the log in the error."""
    try:
        plain = bytes(_deflate.decompressobj(-15).decompress(piece))
    except Exception as exc:  # isal and zlib raise their own error classes
        raise CorruptSegmentError(f"a stored segment of {where} does not inflate: {type(exc).__name__}: {exc}") from exc
    if segment_crc32(plain) != crc:
        raise CorruptSegmentError(f"a stored segment of {where} does not inflate to its CRC-32")
    return plain


ZSTD_LEVEL = 1  # like gzip's level 1: fast enough for a fresh snapshot on its way to the first client
#: The codings this server can send from stored segments, preferred first when a client accepts several equally.
AVAILABLE_ENCODINGS: tuple[str, ...] = ("zstd", "gzip") if zstandard is not None else ("gzip",)


def compress_zstd(plain: bytes) -> bytes:
    """One zstd frame of ``plain`` (empty when zstandard is not installed: nothing will ask for it)."""
    if zstandard is None:
        return b""
    return bytes(zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(plain))


def zstd_body(frames: Sequence[bytes], tail: bytes) -> bytes:
    """``[`` + the segments joined by commas + ``tail`` as a zstd stream of stored frames."""
    parts = [_ZSTD_OPEN]
    for index, frame in enumerate(frames):
        if index:
            parts.append(_ZSTD_COMMA)
        parts.append(frame)
    parts.append(compress_zstd(tail))
    return b"".join(parts)


_OPEN = compress_segment(b"[")
_COMMA = compress_segment(b",")
_CRC_OPEN = zlib.crc32(b"[")
_CRC_COMMA = zlib.crc32(b",")
_ZSTD_OPEN = compress_zstd(b"[")
_ZSTD_COMMA = compress_zstd(b",")


def _multmodp(a: int, b: int) -> int:
    """a(x) * b(x) modulo the CRC-32 polynomial (reflected), as in zlib's crc32.c."""
    m = 1 << 31
    p = 0
    while True:
        if a & m:
            p ^= b
            if (a & (m - 1)) == 0:
                break
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
    return p


def _x2n_table() -> list[int]:
    table = [1 << 30]  # x^1
    for _ in range(31):
        table.append(_multmodp(table[-1], table[-1]))
    return table


_X2N = _x2n_table()


def _x2nmodp(n: int, k: int) -> int:
    """x^(n * 2^k) modulo the polynomial."""
    p = 1 << 31  # x^0
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return p


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of ``A + B`` from ``crc32(A)``, ``crc32(B)`` and ``len(B)`` (zlib's ``crc32_combine``)."""
    return _multmodp(_x2nmodp(len2, 3), crc1) ^ (crc2 & 0xFFFFFFFF)


@dataclass(frozen=True, slots=True)
class GzipPiece:
    """A stored segment: its raw deflate bytes, the CRC-32 and the length of its plain bytes."""

    deflated: bytes
    crc: int
    plain_len: int


def gzip_body(pieces: Sequence[GzipPiece], tail: bytes) -> bytes:
    """``[`` + the segments' plain bytes joined by commas + ``tail`` (which closes the array), as one gzip member
    built from the stored deflate pieces."""
    parts = [_GZIP_HEADER, _OPEN]
    crc = _CRC_OPEN
    size = 1
    for index, piece in enumerate(pieces):
        if index:
            parts.append(_COMMA)
            crc = crc32_combine(crc, _CRC_COMMA, 1)
            size += 1
        parts.append(piece.deflated)
        crc = crc32_combine(crc, piece.crc, piece.plain_len)
        size += piece.plain_len
    closer = zlib.compressobj(COMPRESS_LEVEL, zlib.DEFLATED, -15)
    parts.append(closer.compress(tail) + closer.flush(zlib.Z_FINISH))
    crc = crc32_combine(crc, zlib.crc32(tail), len(tail))
    size += len(tail)
    parts.append(struct.pack("<II", crc & 0xFFFFFFFF, size & 0xFFFFFFFF))
    return b"".join(parts)


def choose_encoding(accept_encoding: str | None, available: Sequence[str] = AVAILABLE_ENCODINGS) -> str:
    """The content coding to answer with: the acceptable one of ``available`` with the highest q (ties: the order
    of ``available``), else ``identity``. ``identity`` is always acceptable unless refused explicitly, and even
    then it is what we send (a 406 would break clients for no gain on this server)."""
    if not accept_encoding:
        return "identity"
    weights: dict[str, float] = {}
    for item in accept_encoding.split(","):
        name, _, params = item.strip().partition(";")
        name = name.strip().lower()
        if not name:
            continue
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 0.0
        weights[name] = q
    best, best_q = "identity", 0.0
    for coding in available:
        q = weights.get(coding, weights.get("*", 0.0))
        if q > best_q:
            best, best_q = coding, q
    if "identity" in weights and weights["identity"] > best_q:
        return "identity"  # named explicitly and preferred over every coding we have
    return best
