"""Removing secrets from text before anyone sees it: the one redaction everything uses.

Error messages, log lines and echoed input end up in terminals, CI output and log stores. A connection URL
with its password, a ``password=`` connection parameter or a JWT in any of them is a leak. Logs
(:mod:`pgferry.observability.logging`), CLI errors, settings errors (:mod:`pgferry.config`) and messages
that quote a server's or a tool's output (``pg_dump``'s stderr) all go through :func:`redact_text`.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["REDACTED", "redact_text"]

REDACTED: Final = "***"

# Everything between ``scheme://user:`` and the *last* ``@`` of a token counts as the password: a malformed URL
# is often malformed precisely because the password holds an unescaped ``@`` or ``/``.
_URL_PASSWORD: Final = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/@\s]+):(?P<pw>\S*)@", re.I)
_PASSWORD_PARAM: Final = re.compile(r"(?i)(?P<key>\bpassword\s*=\s*)(?P<value>'(?:[^'\\]|\\.)*'|[^&\s]*)")
_JWT: Final = re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]+")


def redact_text(text: str, *secrets: str | None) -> str:
    """``text`` without URL passwords, ``password=`` parameters, JWTs, and any of ``secrets`` verbatim."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    text = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", text)
    text = _PASSWORD_PARAM.sub(lambda m: f"{m['key']}{REDACTED}", text)
    return _JWT.sub("<jwt redacted>", text)
