"""Keep one generated block of bench/README.md up to date: each benchmark owns the text between its markers."""

from __future__ import annotations

from pathlib import Path


def replace_block(readme: Path, start: str, end: str, block: str, *, intro: str = "") -> None:
    """Put ``block`` (which includes the ``start``/``end`` markers) in place of the old one, or append it; a
    missing file starts from ``intro``. The rest of the file, hand-written, is left as it is."""
    text = readme.read_text() if readme.exists() else intro
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _old, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    readme.write_text(text)
