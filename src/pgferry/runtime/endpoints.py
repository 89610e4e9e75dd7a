"""Which of Supabase's three database endpoints a URL is, and what a client must do differently for each.

* **direct** — ``db.<ref>.supabase.co:5432``: a real session; server-side prepared statements are fine.
* **session** — Supavisor ``<region>.pooler.supabase.com:5432``: a server connection per client connection, so
  sessions (and prepared statements) behave as direct ones, but connections are a pooled, limited resource.
* **transaction** — Supavisor port ``6543``: a server connection per *transaction*. No server-side prepared
  statements (psycopg ``prepare_threshold=None``), no session state: only ``SET LOCAL`` / ``set_config(…, true)``.

Decided from ``PGFERRY_DB_MODE`` when set, else from the URL. A pooler URL that does not say which mode it is
(a local PgBouncer on some port) is taken as transaction mode: wrongly assuming a session there breaks at run
time, while wrongly assuming a transaction pooler only forgoes prepared statements.

Owns the decision only; it opens nothing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

from pgferry.config import DatabaseMode, Settings
from pgferry.errors import ConfigError
from pgferry.redaction import redact_text

__all__ = ["ConnectionPlan", "EndpointMode", "endpoint_mode", "plan_connection"]

TRANSACTION_POOLER_PORT: Final = 6543
SUPAVISOR_HOST_SUFFIX: Final = ".pooler.supabase.com"


class EndpointMode(enum.Enum):
    DIRECT = "direct"
    SESSION = "session"
    TRANSACTION = "transaction"

    @property
    def allows_prepared_statements(self) -> bool:
        return self is not EndpointMode.TRANSACTION


def endpoint_mode(url: str, *, pooler: bool, declared: DatabaseMode = "auto") -> EndpointMode:
    """The mode of ``url``; ``pooler`` says whether it came from ``SUPABASE_POOLER_URL``."""
    if declared != "auto":
        return EndpointMode(declared)
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    try:
        port = parts.port or 5432
    except ValueError:
        raise ConfigError("SUPABASE_POOLER_URL" if pooler else "SUPABASE_DB_URL", "has an invalid port") from None
    if port == TRANSACTION_POOLER_PORT:
        return EndpointMode.TRANSACTION
    if host.endswith(SUPAVISOR_HOST_SUFFIX):
        return EndpointMode.SESSION
    return EndpointMode.TRANSACTION if pooler else EndpointMode.DIRECT


@dataclass(frozen=True)
class ConnectionPlan:
    """The URL the runtime client uses, its mode, and the psycopg options that mode needs."""

    url: str
    mode: EndpointMode
    setting: str
    """The variable the URL came from (``SUPABASE_POOLER_URL`` / ``SUPABASE_DB_URL`` / ``url=``), for messages."""

    def psycopg_options(self) -> dict[str, Any]:
        """``prepare_threshold``: psycopg's default (prepare after 5 runs) where allowed, ``None`` (never) otherwise."""
        return {} if self.mode.allows_prepared_statements else {"prepare_threshold": None}

    def __repr__(self) -> str:
        return f"ConnectionPlan({redact_text(self.url)!r}, {self.mode.value}, from {self.setting})"


def plan_connection(settings: Settings, *, url: str | None = None, mode: DatabaseMode | None = None) -> ConnectionPlan:
    """The pooler URL when configured (application queries belong there), else the direct URL."""
    declared: DatabaseMode = mode or settings.db_mode
    if url is not None:
        return ConnectionPlan(url, endpoint_mode(url, pooler=declared != "direct", declared=declared), "url=")
    if settings.supabase_pooler_url is not None:
        chosen = str(settings.supabase_pooler_url.get_secret_value())
        return ConnectionPlan(chosen, endpoint_mode(chosen, pooler=True, declared=declared), "SUPABASE_POOLER_URL")
    if settings.supabase_db_url is not None:
        chosen = str(settings.supabase_db_url.get_secret_value())
        return ConnectionPlan(chosen, endpoint_mode(chosen, pooler=False, declared=declared), "SUPABASE_DB_URL")
    raise ConfigError(
        "SUPABASE_POOLER_URL",
        "is not set and neither is SUPABASE_DB_URL; set the Supavisor URL (port 6543 for transaction mode) or the "
        "direct postgresql://postgres:…@db.<project-ref>.supabase.co:5432/postgres",
    )
