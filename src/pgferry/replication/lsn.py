"""Log sequence numbers: the positions every replication decision is made in.

PostgreSQL shows an LSN as two hexadecimal halves (``16/B374D848``) but it is one unsigned 64-bit byte
offset into the WAL. Positions get compared (dedup: "is this commit at or before what I stored?"),
subtracted (lag in bytes), stored (a consumer's resume point) and sent back to the server (feedback), so
the type is an ``int`` subclass: ordering, hashing, arithmetic and JSON serialisation come for free and
are exact, while ``str()`` gives the form PostgreSQL prints and parses (``'16/B374D848'::pg_lsn``).
Comparing LSNs as strings is a classic bug (``'9/0' > '10/0'``); parsing them here once prevents it.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["Lsn"]

_LSN_RE: Final = re.compile(r"^\s*([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})\s*$")
_MAX: Final = (1 << 64) - 1


class Lsn(int):
    """A WAL position. ``Lsn(0)`` is ``InvalidXLogRecPtr`` ("no position"), shown as ``0/0``.

    Construct from an ``int`` (``Lsn(0x16B374D848)``), parse PostgreSQL's text form with :meth:`parse`,
    or accept either with :meth:`coerce`. Arithmetic returns plain ``int`` (a difference of two LSNs is
    a byte count, not a position).
    """

    __slots__ = ()

    def __new__(cls, value: int = 0) -> Lsn:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"Lsn() takes an int, got {type(value).__name__}; use Lsn.parse() for 'X/Y' text")
        if not 0 <= value <= _MAX:
            raise ValueError(f"an LSN is an unsigned 64-bit number, got {value}")
        return super().__new__(cls, value)

    @classmethod
    def parse(cls, text: str) -> Lsn:
        """Parse PostgreSQL's ``'X/Y'`` form (each half 1-8 hex digits, case-insensitive)."""
        match = _LSN_RE.match(text)
        if match is None:
            raise ValueError(f"not an LSN (expected 'X/Y' with hexadecimal halves, like '16/B374D848'): {text!r}")
        return cls((int(match[1], 16) << 32) | int(match[2], 16))

    @classmethod
    def coerce(cls, value: Lsn | int | str) -> Lsn:
        """An :class:`Lsn` from whatever a caller or a database driver hands us (``Lsn``, ``int``, ``'X/Y'``)."""
        if isinstance(value, Lsn):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        return cls(value)

    def __str__(self) -> str:
        value = int(self)
        return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"

    def __repr__(self) -> str:
        return f"Lsn('{self}')"

    def __format__(self, spec: str) -> str:
        # f"{lsn}" reads as PostgreSQL prints it; an explicit spec (f"{lsn:x}") formats the number.
        return str(self) if not spec else format(int(self), spec)
