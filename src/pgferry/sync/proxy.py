"""The shape proxy: authorization in front of Electric (production) or pgferry's dev Shape server (locally).

Electric serves whatever shape it is asked for and applies no row-level security, so every shape request from a
browser or app goes through this proxy, which

1. verifies the caller's Supabase access token (:mod:`pgferry.sync.auth`) — before looking at anything else, so
   an anonymous caller learns nothing about which tables exist;
2. allows only configured tables (and, per table, only configured columns);
3. parses the client's ``where`` with :func:`pgferry.sync.where.parse_where` — the supported subset of SQL, with
   no way to close a parenthesis early, add a statement or a comment, and within a cost budget — and forwards it
   *re-rendered* as ``"<owner>" = $N AND (<client where>)``, the user id travelling only as parameter ``N`` (numbered
   past every parameter the client sent, used or not), never spliced into SQL; the owner term comes first and at
   the top level so it can guard the evaluation of the client's terms (see :mod:`pgferry.sync.evaluate`);
4. forwards only the Electric protocol parameters (``ELECTRIC_PROTOCOL_QUERY_PARAMS`` of ``@electric-sql/client``)
   and adds Electric's API ``secret`` itself: whatever else the client sent (its own ``secret``, ``source_id``,
   made-up parameters) is dropped;
5. limits each user's shapes and concurrent snapshot builds (:mod:`pgferry.sync.limits`; 429 + ``Retry-After``);
6. streams the upstream answer back unbuffered and undecoded (long-polls, SSE and large snapshots pass straight
   through; gzip stays gzip), with ``Vary: Authorization`` so no cache serves one user's shape to another.

Every path answers with a JSON error body, never a traceback: a query string longer than :data:`MAX_QUERY_LENGTH`
is a 414 before anything is parsed.

The Authorization header itself is never sent upstream: Electric does not need it and it must not end up in
Electric's logs.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

import httpx
import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from pgferry.db.quoting import quote_ident
from pgferry.errors import ConfigError
from pgferry.sync.auth import (
    AuthenticatedUser,
    TokenVerifier,
)
from pgferry.sync.errors import ForbiddenShapeError, ProtocolError, WhereClauseError
from pgferry.sync.limits import UserLimiter, UserLimits
from pgferry.sync.longpoll import unless_client_leaves
from pgferry.sync.protocol import (
    IDENT_PATTERN,
    parse_columns,
    parse_table_name,
    split_outside_quotes,
    unquote_ident,
)
from pgferry.sync.responses import authenticate, json_error
from pgferry.sync.where import WhereClause, check_params, parse_params, parse_where, render_text
from pgferry.sync.write_api import WriteApi, WriteApiConfig

__all__ = [
    "DEFAULT_UPSTREAM_TIMEOUT",
    "EXPOSED_HEADERS",
    "FORWARDED_QUERY_PARAMS",
    "MAX_QUERY_LENGTH",
    "ForbiddenShapeError",
    "ProxyConfig",
    "ShapeProxy",
    "TableRule",
    "build_upstream_params",
    "create_proxy_app",
    "default_tables",
    "parse_column_rules",
    "parse_columns",
    "parse_table",
    "quote_ident",
]

log = structlog.get_logger("pgferry.sync.proxy")

#: Characters of query string the proxy accepts (a where clause is at most 4096, a parameter value at most 4096);
#: longer is a 414. Upstream URLs stay far below what HTTP clients and servers accept.
MAX_QUERY_LENGTH: Final = 16 * 1024

#: Seconds to wait for upstream bytes. Electric holds a ``live=true`` request open for about 20 s before answering
#: "up-to-date"; a shorter read timeout would turn every quiet long-poll into a 504.
DEFAULT_UPSTREAM_TIMEOUT: Final = 60.0

#: Parameters passed through verbatim: the client's ``ELECTRIC_PROTOCOL_QUERY_PARAMS`` (``@electric-sql/client``
#: 1.5, ``src/constants.ts``) minus the ``subset__*`` ones, which are validated separately, plus ``replica``.
#: Electric validates their values itself; none of them can widen what a shape contains.
FORWARDED_QUERY_PARAMS: Final = (
    "live",
    "live_sse",
    "experimental_live_sse",
    "handle",
    "offset",
    "cursor",
    "expired_handle",
    "log",
    "cache-buster",
    "replica",
)
#: Subset-snapshot parameters (``log=changes_only`` mode) that are forwarded after validation. The structured
#: ``subset__where_expr`` / ``subset__order_by_expr`` variants the client sends *alongside* the SQL text are
#: dropped: the proxy checks the text, so an unchecked second copy must not reach a server that might prefer it.
_SUBSET_WHERE: Final = "subset__where"
_SUBSET_PARAMS: Final = "subset__params"
_SUBSET_ORDER_BY: Final = "subset__order_by"
_SUBSET_NUMBERS: Final = ("subset__limit", "subset__offset")

#: Response headers browsers may read (the client's header constants); without this list ``fetch`` hides them
#: from a cross-origin client and it cannot follow the shape log.
EXPOSED_HEADERS: Final = (
    "electric-offset",
    "electric-handle",
    "electric-schema",
    "electric-cursor",
    "electric-up-to-date",
    "electric-snapshot",
)
#: Upstream response headers relayed besides ``electric-*``. ``content-length`` is not: the body is streamed
#: (chunked) and must not be promised a length the relay cannot guarantee if upstream breaks off.
_RELAYED_HEADERS: Final = frozenset(
    {"cache-control", "etag", "content-type", "content-encoding", "retry-after", "x-accel-buffering"}
)

_IDENT: Final = IDENT_PATTERN
_COLUMN_RE: Final = re.compile(rf"^\s*({_IDENT})\s*$")
_ORDER_ITEM_RE: Final = re.compile(
    rf"^\s*({_IDENT})(?:\s+(?:asc|desc))?(?:\s+nulls\s+(?:first|last))?\s*$", re.IGNORECASE
)
_NUMBER_RE: Final = re.compile(r"^[0-9]{1,9}$")


# --------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TableRule:
    """How one table may be synced.

    ``owner_column`` holds the owning user's id (``auth.uid()`` in the table's RLS policies); every shape gets
    ``"<owner_column>" = <user id>`` ANDed in. ``primary_key`` (when known) must be among requested ``columns``,
    as Electric requires. ``allowed_columns`` (``None`` = all) limits what a client may select *and* filter on —
    filtering on a hidden column would reveal its values one predicate at a time.
    """

    owner_column: str = "user_id"
    primary_key: tuple[str, ...] = ()
    allowed_columns: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if self.allowed_columns is not None:
            missing = [name for name in self.primary_key if name not in self.allowed_columns]
            if missing:
                raise ConfigError("allowed_columns", f"must include the primary key column(s) {', '.join(missing)}")


def default_tables() -> dict[str, TableRule]:
    """The platform's eight tables (``pgferry.schema.models``), each owned by its ``user_id`` column.

    Derived from the models rather than listed, so a table added there is synced (and scoped) the same way.
    """
    from pgferry.schema.models import Base

    rules: dict[str, TableRule] = {}
    for table in Base.metadata.sorted_tables:
        if "user_id" not in table.columns:
            continue
        rules[f"{table.schema or 'public'}.{table.name}"] = TableRule(
            owner_column="user_id", primary_key=tuple(column.name for column in table.primary_key.columns)
        )
    return rules


def parse_column_rules(specs: Iterable[str], tables: Mapping[str, TableRule] | None = None) -> dict[str, TableRule]:
    """``tables`` (default: :func:`default_tables`) with column allow-lists from ``--columns`` specs, each
    ``schema.table=col,col,...`` (e.g. ``public.tasks=id,user_id,title,status``: ``embedding`` and other large or
    private columns then never reach a client, neither selected nor filtered on). The primary key must be listed."""
    rules = dict(default_tables() if tables is None else tables)
    for spec in specs:
        name, sep, columns_text = spec.partition("=")
        if not sep or not columns_text.strip():
            raise ConfigError("--columns", f"{spec!r} is not like public.tasks=id,user_id,title")
        try:
            schema, table = parse_table(name)
            columns = parse_columns(columns_text)
        except ProtocolError:
            raise ConfigError("--columns", f"{spec!r} is not like public.tasks=id,user_id,title") from None
        key = f"{schema}.{table}"
        rule = rules.get(key)
        if rule is None:
            raise ConfigError("--columns", f"{key} is not one of the tables the proxy serves")
        rules[key] = TableRule(rule.owner_column, rule.primary_key, frozenset(columns))
    return rules


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """Everything the proxy needs; build with :meth:`from_settings` for the CLI or directly in tests.

    ``tables`` maps ``schema.table`` (unquoted-lowercase or exact names) to its :class:`TableRule`.
    ``upstream_params`` are server-side parameters added to every upstream request (e.g. Electric Cloud's
    ``source_id``); like ``electric_secret`` they override anything a client sends.
    """

    upstream: str
    verifier: TokenVerifier
    tables: Mapping[str, TableRule] = field(default_factory=default_tables)
    electric_secret: str | None = field(default=None, repr=False)
    allow_origins: tuple[str, ...] = ("*",)
    upstream_params: Mapping[str, str] = field(default_factory=dict)
    upstream_timeout: float = DEFAULT_UPSTREAM_TIMEOUT
    connect_timeout: float = 5.0
    max_upstream_connections: int = 1000
    limits: UserLimits = field(default_factory=UserLimits)
    #: The write API (``POST /v1/mutations``) served beside the shapes; ``None``: reads only.
    write: WriteApiConfig | None = None

    def __post_init__(self) -> None:
        parts = urlsplit(self.upstream)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ConfigError("--upstream", "must be the sync service's base URL, like http://127.0.0.1:3000")
        object.__setattr__(self, "upstream", self.upstream.rstrip("/"))
        normalised: dict[str, TableRule] = {}
        for name, rule in self.tables.items():
            try:
                schema, table = parse_table(name)
            except ProtocolError:
                raise ConfigError("tables", f"{name!r} is not a table name like public.tasks") from None
            normalised[f"{schema}.{table}"] = rule
        object.__setattr__(self, "tables", normalised)
        if not self.allow_origins:
            raise ConfigError("--allow-origin", "needs at least one origin (or '*')")

    @classmethod
    def from_settings(
        cls,
        *,
        upstream: str | None = None,
        allow_origins: Iterable[str] = ("*",),
        **options: Any,
    ) -> ProxyConfig:
        """Config from the environment (``SUPABASE_JWT_SECRET`` / ``SUPABASE_JWKS_URL``, ``SUPABASE_URL``,
        ``ELECTRIC_URL``, ``ELECTRIC_SECRET``); a missing verification key is a one-line :class:`ConfigError`."""
        from pgferry.config import load_settings

        settings = load_settings()
        verifier = TokenVerifier.from_settings(settings)
        secret = settings.electric_secret.get_secret_value() if settings.electric_secret else None
        return cls(
            upstream=upstream or settings.electric_url or "http://127.0.0.1:3000",
            verifier=verifier,
            electric_secret=secret,
            allow_origins=tuple(allow_origins),
            **options,
        )


# --------------------------------------------------------------------------------------------------------------
# Parsing the shape-defining parameters
# --------------------------------------------------------------------------------------------------------------


def parse_table(text: str | None, *, default_schema: str = "public") -> tuple[str, str]:
    """``tasks`` / ``public.tasks`` / ``"public"."tasks"`` → ``("public", "tasks")``; 400 when malformed."""
    name = parse_table_name(text, default_schema=default_schema)
    return name.schema, name.name


# --------------------------------------------------------------------------------------------------------------
# Building the upstream request
# --------------------------------------------------------------------------------------------------------------


def _first(items: list[tuple[str, str]], name: str) -> str | None:
    for key, value in items:
        if key == name:
            return value
    return None


def _check_columns_allowed(names: Iterable[str], rule: TableRule, field_name: str) -> None:
    if rule.allowed_columns is None:
        return
    hidden = sorted(set(names) - rule.allowed_columns)
    if hidden:
        raise ForbiddenShapeError(field_name, f"column(s) not allowed: {', '.join(hidden)}")


def build_upstream_params(
    items: list[tuple[str, str]], user: AuthenticatedUser, config: ProxyConfig
) -> list[tuple[str, str]]:
    """The query of the upstream request for a client's query ``items``; :class:`ProtocolError` (400/403) when
    the request must not go upstream. Pure, so every rule is testable without HTTP."""
    schema, table = parse_table(_first(items, "table"))
    qualified = f"{schema}.{table}"
    rule = config.tables.get(qualified)
    if rule is None:
        raise ForbiddenShapeError("table", f"{qualified} cannot be synced")
    forwarded: list[tuple[str, str]] = [("table", f"{quote_ident(schema)}.{quote_ident(table)}")]

    columns_text = _first(items, "columns")
    if columns_text is not None:
        columns = parse_columns(columns_text)
        _check_columns_allowed(columns, rule, "columns")
        missing = [name for name in rule.primary_key if name not in columns]
        if missing:
            raise ProtocolError("columns", f"must include the primary key column(s) {', '.join(missing)}")
        forwarded.append(("columns", ",".join(quote_ident(name) for name in columns)))
    elif rule.allowed_columns is not None:
        # Without an explicit list Electric would send every column, hidden ones included.
        ordered = [*rule.primary_key, *sorted(rule.allowed_columns - set(rule.primary_key))]
        forwarded.append(("columns", ",".join(quote_ident(name) for name in ordered)))

    forwarded.extend(_where(items, user, rule))
    forwarded.extend(_subset(items, rule))

    for name in FORWARDED_QUERY_PARAMS:
        value = _first(items, name)
        if value is not None:
            forwarded.append((name, value))
    server_side = dict(config.upstream_params)
    if config.electric_secret:
        server_side["secret"] = config.electric_secret
    taken = {name for name, _ in forwarded}
    forwarded.extend((name, value) for name, value in server_side.items() if name not in taken)
    return forwarded


def _where(items: list[tuple[str, str]], user: AuthenticatedUser, rule: TableRule) -> list[tuple[str, str]]:
    """``where`` and ``params[n]`` for upstream: the client's clause (re-rendered from its parse tree, never the
    raw text) ANDed with the owner predicate, whose user id is the next free parameter."""
    owner = quote_ident(rule.owner_column)
    where_text = _first(items, "where")
    param_items = [(key, value) for key, value in items if key == "params" or key.startswith("params[")]
    if where_text is None or not where_text.strip():
        if param_items:
            raise WhereClauseError("params given without a where clause", field="params")
        return [("where", f"{owner} = $1"), ("params[1]", str(user.user_id))]
    clause: WhereClause = parse_where(where_text)
    _check_columns_allowed(clause.columns, rule, "where")
    params = parse_params(param_items)
    check_params(clause, params)
    # Past every parameter the client sent, used or not: numbering it after the used ones only would give that
    # number two values (the client's unused one, maybe another user's id, and ours), and the upstream picks one.
    owner_index = max([0, *clause.params, *params]) + 1
    result = [("where", f"{owner} = ${owner_index} AND ({render_text(clause)})")]
    result.extend((f"params[{index}]", params[index]) for index in sorted(params))
    result.append((f"params[{owner_index}]", str(user.user_id)))
    return result


def _subset(items: list[tuple[str, str]], rule: TableRule) -> list[tuple[str, str]]:
    """Validated ``subset__*`` parameters. Electric narrows the (already owner-scoped) shape with them, but they
    are SQL text too, so they get the same parser as ``where``: no way to break out of the parenthesis Electric
    puts them in."""
    result: list[tuple[str, str]] = []
    where_text = _first(items, _SUBSET_WHERE)
    params_text = _first(items, _SUBSET_PARAMS)
    if where_text is not None:
        try:
            clause = parse_where(where_text)
        except WhereClauseError as exc:
            raise WhereClauseError(exc.problem, field=_SUBSET_WHERE) from None
        _check_columns_allowed(clause.columns, rule, _SUBSET_WHERE)
        # The client sends these as one JSON object (``{"1": "x"}``) so proxies see one fixed parameter name.
        params = parse_params([(_SUBSET_PARAMS, params_text)], name=_SUBSET_PARAMS) if params_text is not None else {}
        check_params(clause, params)
        result.append((_SUBSET_WHERE, render_text(clause)))
        if params_text is not None:
            result.append((_SUBSET_PARAMS, params_text))
    elif params_text is not None:
        raise WhereClauseError("subset parameters given without subset__where", field=_SUBSET_PARAMS)
    order_by = _first(items, _SUBSET_ORDER_BY)
    if order_by is not None:
        names = []
        for part in split_outside_quotes(order_by):
            match = _ORDER_ITEM_RE.match(part)
            if match is None:
                raise ProtocolError(_SUBSET_ORDER_BY, "must be column names with optional ASC/DESC, NULLS FIRST/LAST")
            names.append(unquote_ident(match.group(1)))
        _check_columns_allowed(names, rule, _SUBSET_ORDER_BY)
        result.append((_SUBSET_ORDER_BY, order_by))
    for name in _SUBSET_NUMBERS:
        value = _first(items, name)
        if value is not None:
            if not _NUMBER_RE.match(value):
                raise ProtocolError(name, "must be a non-negative integer")
            result.append((name, value))
    return result


# --------------------------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------------------------


_SHAPE_DEFINING = ("table", "where", "columns", "replica")


def _shape_key(query: list[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """The shape an upstream request is for: its defining parameters (the params' values included)."""
    return tuple((name, value) for name, value in query if name in _SHAPE_DEFINING or name.startswith("params["))


def _vary(existing: str | None, *extra: str) -> str:
    tokens: list[str] = []
    for token in [*(existing or "").split(","), *extra]:
        token = token.strip()
        if token and token.lower() not in {seen.lower() for seen in tokens}:
            tokens.append(token)
    return ", ".join(tokens)


class _Upstream:
    """The shared upstream HTTP client, opened lazily (so the app also works without lifespan events) and closed
    on shutdown. Connections are pooled: a shape client keeps polling the same upstream."""

    def __init__(self, config: ProxyConfig) -> None:
        self._config = config
        self._client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            config = self._config
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(config.upstream_timeout, connect=config.connect_timeout),
                limits=httpx.Limits(max_connections=config.max_upstream_connections, max_keepalive_connections=100),
                follow_redirects=False,
                trust_env=False,
            )
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


class ShapeProxy:
    """The proxy as an object: its configuration, upstream client and per-user limiter are attributes and each
    step of a request is a method — authenticate, authorize and rewrite, limit, forward, relay.

    ``ShapeProxy(config).app()`` (or :func:`create_proxy_app`) is the ASGI app."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.upstream = _Upstream(config)
        self.shape_url = f"{config.upstream}/v1/shape"
        self.limiter = UserLimiter(config.limits)
        self.write_api = WriteApi(config.write) if config.write is not None else None

    async def shape(self, request: Request) -> Response:
        """Every outcome is a response with a JSON body: an unexpected exception is one log line and a 500."""
        try:
            return await self._shape(request)
        except Exception as exc:
            log.error("shape request failed", problem=type(exc).__name__)
            return json_error(500, {"message": "Internal server error"})

    async def authenticate(self, request: Request) -> AuthenticatedUser | Response:
        """The verified user of the request's bearer token, or the 401/503 response refusing it. Runs before
        anything else is looked at, so an anonymous caller learns nothing."""
        return await authenticate(self.config.verifier, request)

    async def _shape(self, request: Request) -> Response:
        if len(request.url.query) > MAX_QUERY_LENGTH:
            body = {"message": "URI too long", "errors": {"query": [f"longer than {MAX_QUERY_LENGTH} characters"]}}
            return json_error(414, body)
        user = await self.authenticate(request)
        if isinstance(user, Response):
            return user
        try:
            query = build_upstream_params(list(request.query_params.multi_items()), user, self.config)
            shape_key = _shape_key(query)
            response = await self._forward_within_limits(request, user, query, shape_key)
        except ProtocolError as exc:
            log.info("shape request refused", user_id=str(user.user_id), field=exc.field, status=exc.status)
            return json_error(exc.status, exc.body(), exc.headers())
        if response.status_code == 400:  # upstream refused the shape: it does not count against the user
            self.limiter.forget_shape(user.user_id, shape_key)
        return response

    async def _forward_within_limits(
        self,
        request: Request,
        user: AuthenticatedUser,
        query: list[tuple[str, str]],
        shape_key: tuple[tuple[str, str], ...],
    ) -> Response:
        """Count the shape against the user's limits (429 beyond them); a new shape also holds one of the user's
        snapshot slots while it loads."""
        self.limiter.use_shape(user.user_id, shape_key)
        if _first(query, "offset") == "-1":
            with self.limiter.snapshot(user.user_id):
                return await self._forward(request, query)
        return await self._forward(request, query)

    async def _forward(self, request: Request, query: list[tuple[str, str]]) -> Response:
        """Send the rewritten request upstream and stream its answer back (an upstream failure is a 502/504)."""
        client = self.upstream.client
        try:
            upstream_request = client.build_request(
                "GET", self.shape_url, params=tuple(query), headers=_upstream_headers(request)
            )
            sent = await unless_client_leaves(request, client.send(upstream_request, stream=True))
            if sent.value is None:  # the client hung up during a long-poll: free the upstream request now
                return Response(status_code=499)
            response = sent.value
        except httpx.TimeoutException:
            log.warning("upstream timed out", upstream=self.config.upstream)
            return json_error(504, {"message": "Upstream timed out", "errors": {"upstream": ["no answer in time"]}})
        except httpx.TransportError as exc:
            log.warning("upstream unreachable", upstream=self.config.upstream, problem=type(exc).__name__)
            return json_error(502, {"message": "Bad gateway", "errors": {"upstream": ["sync service unreachable"]}})
        except httpx.InvalidURL:  # a request the upstream URL cannot carry (MAX_QUERY_LENGTH should stop it first)
            return json_error(414, {"message": "URI too long", "errors": {"query": ["too long to forward"]}})
        relayed = _relayed_headers(response)
        if response.status_code in (204, 304) or request.method == "HEAD":
            await response.aclose()
            return Response(status_code=response.status_code, headers=relayed)
        return StreamingResponse(_relay(response), status_code=response.status_code, headers=relayed)

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "active"}, headers={"cache-control": "no-store"})

    async def http_error(self, request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        detail = exc.detail if isinstance(exc, HTTPException) else "Internal server error"
        return JSONResponse({"message": detail}, status_code=status, headers=getattr(exc, "headers", None))

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        try:
            if self.write_api is not None:
                async with self.write_api.lifespan(app):
                    yield
            else:
                yield
        finally:
            await self.upstream.aclose()
            await self.config.verifier.aclose()
            if self.config.write is not None and self.config.write.verifier is not self.config.verifier:
                await self.config.write.verifier.aclose()

    def routes(self) -> list[Route]:
        routes = [
            Route("/v1/shape", self.shape, methods=["GET"]),
            Route("/v1/health", self.health, methods=["GET"]),
        ]
        if self.write_api is not None:
            routes.extend(self.write_api.routes())
        return routes

    def middleware(self) -> list[Middleware]:
        """CORS: the configured origins may read shapes and the ``electric-*`` headers a shape client needs."""
        allow_all = "*" in self.config.allow_origins
        return [
            Middleware(
                CORSMiddleware,
                allow_origins=["*"] if allow_all else list(self.config.allow_origins),
                allow_methods=["GET", "HEAD", "OPTIONS"] + (["POST"] if self.write_api is not None else []),
                allow_headers=["Authorization", "Content-Type"],
                expose_headers=list(EXPOSED_HEADERS),
                max_age=600,
            )
        ]

    def app(self) -> Starlette:
        """The ASGI app: ``GET /v1/shape`` (authorized, rewritten, streamed) and ``GET /v1/health``."""
        app = Starlette(
            routes=self.routes(),
            middleware=self.middleware(),
            exception_handlers={HTTPException: self.http_error},
            lifespan=self.lifespan,
        )
        app.state.proxy = self
        return app


def _upstream_headers(request: Request) -> dict[str, str]:
    """Undecoded pass-through: upstream compresses only as the *client* accepts, and the bytes go back as they
    came. Without a client preference ask for identity rather than httpx's default gzip/br list."""
    headers = {
        "accept-encoding": request.headers.get("accept-encoding", "identity"),
        "accept": request.headers.get("accept", "application/json"),
    }
    if_none_match = request.headers.get("if-none-match")
    if if_none_match is not None:
        headers["if-none-match"] = if_none_match
    return headers


def _relayed_headers(response: httpx.Response) -> dict[str, str]:
    """Upstream headers the client gets: ``electric-*`` and a few others, ``Vary: Authorization``, and a
    ``private`` cache-control (see :func:`private_cache_control`)."""
    relayed = {
        name: value
        for name, value in response.headers.items()
        if name.lower().startswith("electric-") or name.lower() in _RELAYED_HEADERS
    }
    relayed["vary"] = _vary(response.headers.get("vary"), "Authorization")
    if "cache-control" in relayed:
        relayed["cache-control"] = private_cache_control(relayed["cache-control"])
    return relayed


def create_proxy_app(config: ProxyConfig) -> Starlette:
    """The proxy's ASGI app (``ShapeProxy(config).app()``): ``GET /v1/shape`` and ``GET /v1/health``."""
    return ShapeProxy(config).app()


def private_cache_control(value: str) -> str:
    """Electric marks shape responses ``public`` (they are the same for everyone who asks); behind this proxy a
    response belongs to one user, so shared caches must not keep it even if they ignore ``Vary: Authorization``
    (some CDNs do). The browser's own cache still gets the max-age and stale-while-revalidate hints."""
    directives = [d.strip() for d in value.split(",") if d.strip()]
    kept = [d for d in directives if d.lower() not in ("public", "private") and not d.lower().startswith("s-maxage")]
    return ", ".join(["private", *kept])


async def _relay(response: httpx.Response) -> AsyncIterator[bytes]:
    """Upstream bytes as they arrive (``aiter_raw``: no decompression, no buffering). If upstream breaks off
    mid-body the client sees a truncated response and retries; the status line is already sent."""
    try:
        async for chunk in response.aiter_raw():
            yield chunk
    except httpx.HTTPError as exc:
        log.warning("upstream stream broke off", problem=type(exc).__name__)
    finally:
        await response.aclose()
