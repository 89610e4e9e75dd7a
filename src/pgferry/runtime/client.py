"""``create_database_client(settings)``: the one handle a platform service needs for Supabase's database.

It holds a psycopg_pool pool (sync, or async for :class:`AsyncDatabaseClient`), a SQLAlchemy engine and session
factory drawing from that same pool (``close_returns=True`` + ``NullPool``: SQLAlchemy hands connections back to
psycopg_pool instead of keeping a second pool of its own), the project (token verification) and supabase-py's
client with the anon key. The connection mode (direct, Supavisor session, Supavisor transaction) comes from
:mod:`pgferry.runtime.endpoints`; in transaction mode no server-side prepared statement is ever created.

Every user-facing path runs as the verified user (:mod:`pgferry.runtime.scoped`); the service role is reachable
only through methods named ``service_role_…`` that take no token, and the service-role key is read from
``SUPABASE_SERVICE_ROLE_KEY`` only by :meth:`DatabaseClient.service_role_supabase`.

Owns building and closing these resources; it does not decide retry policy (``pgferry.runtime.resilience``) or
what a user may see (the database's policies).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg
from psycopg.pq import TransactionStatus
from psycopg_pool import AsyncConnectionPool, ConnectionPool
from sqlalchemy import Engine, create_engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from pgferry.config import DatabaseMode, Settings
from pgferry.db.connect import CONNECT_PARAMS
from pgferry.errors import ConfigError
from pgferry.runtime.endpoints import ConnectionPlan, EndpointMode, plan_connection
from pgferry.runtime.query_cache import DEFAULT_PUBLICATION, QueryCache
from pgferry.runtime.scoped import (
    apply_user_to_session,
    auser_transaction,
    claims_key,
    query_as_user,
    query_as_user_bound,
    service_role_transaction,
    user_transaction,
)
from pgferry.runtime.search import MemoryMatch, TaskMatch, memory_query, tasks_query
from pgferry.supabase.project import SupabaseProject
from pgferry.sync.auth import AuthenticatedUser

if TYPE_CHECKING:
    from supabase import Client as SupabaseClient

__all__ = ["AsyncDatabaseClient", "DatabaseClient", "create_async_database_client", "create_database_client"]

APPLICATION_NAME = "pgferry-runtime"

T = TypeVar("T")


def _connection_kwargs(plan: ConnectionPlan) -> dict[str, Any]:
    return {**CONNECT_PARAMS, "application_name": APPLICATION_NAME, "autocommit": True, **plan.psycopg_options()}


class PooledConnection(psycopg.Connection[Any]):
    """The sync pool's connection: hands itself back to the pool in autocommit, as the pool gave it out.

    SQLAlchemy borrows connections with ``autocommit=False``. A pool ``reset`` callback could restore it, but
    psycopg_pool then returns *every* connection through its worker thread, a thread hand-off on each pooled
    point query that cost more than the query; restoring it here, on the caller's thread, costs nothing when
    the connection already is in autocommit (every path but SQLAlchemy's).
    """

    def close(self) -> None:
        if not self.closed and not self.autocommit and getattr(self, "_pool", None) is not None:
            status = self.info.transaction_status
            if status in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
                self.rollback()  # what the pool would do; the pool discards an ACTIVE or broken one itself
                status = self.info.transaction_status
            if status == TransactionStatus.IDLE:
                self.autocommit = True
        super().close()


async def _ato_autocommit(conn: psycopg.AsyncConnection[Any]) -> None:
    await conn.set_autocommit(True)


def _project(settings: Settings) -> SupabaseProject | None:
    if settings.supabase_url is None or settings.supabase_anon_key is None:
        return None
    return SupabaseProject.from_settings(settings)


def _require(project: SupabaseProject | None) -> SupabaseProject:
    if project is None:
        raise ConfigError(
            "SUPABASE_URL", "and SUPABASE_ANON_KEY must be set to verify users' tokens or use supabase-py"
        )
    return project


class DatabaseClient:
    """The synchronous handle; build it with :func:`create_database_client` and ``close()`` it (or ``with``)."""

    def __init__(
        self, plan: ConnectionPlan, project: SupabaseProject | None, *, min_size: int, max_size: int, timeout: float
    ) -> None:
        self.plan = plan
        self.project = project
        self.pool: ConnectionPool[PooledConnection] = ConnectionPool(
            plan.url,
            connection_class=PooledConnection,
            kwargs=_connection_kwargs(plan),
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            close_returns=True,
            name="pgferry-runtime",
            open=False,
        )
        self.engine: Engine = create_engine(
            "postgresql+psycopg://", creator=self._sqlalchemy_connection, poolclass=NullPool
        )
        self.sessions: sessionmaker[Session] = sessionmaker(self.engine, expire_on_commit=False)
        self._supabase: SupabaseClient | None = None
        self.query_cache: QueryCache | None = None
        """The optional read cache (``create_database_client(…, read_cache=True)``); ``query(…, cache=True)``."""

    def _sqlalchemy_connection(self) -> PooledConnection:
        conn = self.pool.getconn()
        conn.autocommit = False  # SQLAlchemy manages transactions itself
        return conn

    @property
    def mode(self) -> str:
        return self.plan.mode.value

    def open(self, *, wait: bool = False) -> DatabaseClient:
        self.pool.open(wait=wait)
        return self

    # -- users ---------------------------------------------------------------------------------------------------

    def verify(self, token: str) -> AuthenticatedUser:
        """The user of an access token, verified (signature, expiry, audience, issuer, role ``authenticated``)."""
        return _require(self.project).verify_sync(token)

    def user_transaction(self, user: AuthenticatedUser) -> AbstractContextManager[psycopg.Connection[Any]]:
        """``with client.user_transaction(user) as conn:`` psycopg connection in a transaction as ``user``."""
        return self._writes_invalidate(user_transaction(self.pool, user))

    def query(
        self, user: AuthenticatedUser, statement: str, params: Any = (), *, cache: bool = False
    ) -> list[tuple[Any, ...]]:
        """One statement as ``user`` in one round trip (see :func:`pgferry.runtime.scoped.query_as_user`), from
        statements prepared once per server session where the endpoint keeps sessions.

        ``cache=True`` answers from the read cache when it can (see :mod:`pgferry.runtime.query_cache`: only for
        reads whose answer depends on the rows alone); a statement that is not a plain ``SELECT`` drops the cache
        when it has run, so this process reads its own writes."""
        prepare = self.plan.mode.allows_prepared_statements
        if cache:
            query_cache = self._require_cache()
            return query_cache.read(
                claims_key(user),
                statement,
                params,
                load=lambda: query_as_user(self.pool, user, statement, params, prepare=prepare),
                explain=lambda: query_as_user(self.pool, user, "explain (verbose, format json) " + statement, params)[
                    0
                ][0],
            )
        try:
            return query_as_user(self.pool, user, statement, params, prepare=prepare)
        finally:
            if self.query_cache is not None and not _plain_select(statement):
                self.query_cache.invalidate_all()

    def _require_cache(self) -> QueryCache:
        if self.query_cache is None:
            raise ConfigError(
                "read_cache",
                "query(…, cache=True) needs the read cache: create the client with "
                "create_database_client(settings, read_cache=True)",
            )
        return self.query_cache

    @contextmanager
    def _writes_invalidate(self, transaction: AbstractContextManager[T]) -> Iterator[T]:
        """``transaction`` (a context manager), dropping the read cache when it ends: it may have written."""
        try:
            with transaction as inside:
                yield inside
        finally:
            if self.query_cache is not None:
                self.query_cache.invalidate_all()

    def search_tasks(
        self,
        user: AuthenticatedUser,
        embedding: Sequence[float] | Any,
        threshold: float,
        k: int,
        *,
        ef_search: int | None = None,
        use_index: bool = True,
    ) -> list[TaskMatch]:
        """``user``'s ``k`` tasks most similar to ``embedding`` (see :func:`pgferry.runtime.search.search_tasks`),
        in one round trip: the claims and search settings, then the query with the embedding as a binary parameter,
        pipelined as one implicit transaction (:func:`pgferry.runtime.scoped.query_as_user_bound`)."""
        statement, params, settings = tasks_query(embedding, threshold, k, ef_search=ef_search, use_index=use_index)
        rows = query_as_user_bound(self.pool, user, statement, params, settings=settings)
        return [TaskMatch(*row) for row in rows]

    def search_memory(
        self,
        user: AuthenticatedUser,
        embedding: Sequence[float] | Any,
        threshold: float,
        k: int,
        *,
        agent_name: str | None = None,
        ef_search: int | None = None,
        use_index: bool = True,
    ) -> list[MemoryMatch]:
        """``user``'s agent memories most similar to ``embedding``, in one round trip (see :meth:`search_tasks`)."""
        statement, params, settings = memory_query(
            embedding, threshold, k, agent_name=agent_name, ef_search=ef_search, use_index=use_index
        )
        rows = query_as_user_bound(self.pool, user, statement, params, settings=settings)
        return [MemoryMatch(*row) for row in rows]

    def service_role_transaction(self) -> AbstractContextManager[psycopg.Connection[Any]]:
        """A transaction as ``service_role`` (bypasses RLS): server code only, takes no token."""
        return self._writes_invalidate(service_role_transaction(self.pool))

    def session(self, user: AuthenticatedUser) -> AbstractContextManager[Session]:
        """A SQLAlchemy session whose one transaction runs as ``user``; committed at the end of the block."""
        return self._writes_invalidate(self._session_as(user))

    def service_role_session(self) -> AbstractContextManager[Session]:
        return self._writes_invalidate(self._session_as(None))

    @contextmanager
    def _session_as(self, user: AuthenticatedUser | None) -> Iterator[Session]:
        with self.sessions.begin() as session:
            apply_user_to_session(session, user)
            yield session

    # -- supabase-py ---------------------------------------------------------------------------------------------

    @property
    def supabase(self) -> SupabaseClient:
        """supabase-py's client with the anon key (what the project's clients also hold); created on first use."""
        if self._supabase is None:
            from supabase import create_client

            project = _require(self.project)
            self._supabase = create_client(project.url, project.anon_key)
        return self._supabase

    def service_role_supabase(self) -> SupabaseClient:
        """supabase-py's client with ``SUPABASE_SERVICE_ROLE_KEY``: bypasses RLS; never hand it to a client."""
        from supabase import create_client

        project = _require(self.project)
        return create_client(project.url, project.service_role_key())

    # -- lifecycle -----------------------------------------------------------------------------------------------

    def close(self) -> None:
        if self.query_cache is not None:
            self.query_cache.close()
        self.engine.dispose()
        self.pool.close()
        if self.project is not None:
            self.project.close()

    def __enter__(self) -> DatabaseClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DatabaseClient({self.plan!r})"


def create_database_client(
    settings: Settings,
    *,
    url: str | None = None,
    mode: DatabaseMode | None = None,
    min_size: int = 1,
    max_size: int = 10,
    timeout: float = 30.0,
    read_cache: bool = False,
    read_cache_publication: str = DEFAULT_PUBLICATION,
) -> DatabaseClient:
    """A ready :class:`DatabaseClient` for ``settings`` (``SUPABASE_POOLER_URL`` or ``SUPABASE_DB_URL``,
    ``PGFERRY_DB_MODE``, ``SUPABASE_URL`` + keys + JWT secret/JWKS); ``url``/``mode`` override the settings.

    The pool opens without waiting for the database: a service starts while the database is down and its first
    query waits (up to ``timeout``) or fails with a retryable error.

    ``read_cache=True`` also starts the read cache (:mod:`pgferry.runtime.query_cache`), whose feed follows
    ``read_cache_publication`` over a direct connection (``SUPABASE_DB_URL``, or ``url`` when it is direct):
    a pooler cannot carry replication, and the role needs REPLICATION.
    """
    plan = plan_connection(settings, url=url, mode=mode)
    client = DatabaseClient(plan, _project(settings), min_size=min_size, max_size=max_size, timeout=timeout)
    if read_cache:
        direct = plan.url if plan.mode == EndpointMode.DIRECT else settings.supabase_db_url
        if direct is None:
            raise ConfigError(
                "SUPABASE_DB_URL",
                "the read cache follows the database by logical replication, which needs a direct connection: "
                "set SUPABASE_DB_URL (port 5432, not the pooler) or pass a direct url=",
            )
        client.query_cache = QueryCache(str(direct), publication=read_cache_publication).start()
    return client.open()


class AsyncDatabaseClient:
    """The asyncio handle; build it with :func:`create_async_database_client` and ``await aclose()``."""

    def __init__(
        self, plan: ConnectionPlan, project: SupabaseProject | None, *, min_size: int, max_size: int, timeout: float
    ) -> None:
        self.plan = plan
        self.project = project
        self.pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
            plan.url,
            kwargs=_connection_kwargs(plan),
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            reset=_ato_autocommit,
            close_returns=True,
            name="pgferry-runtime-async",
            open=False,
        )
        self.engine: AsyncEngine = create_async_engine(
            "postgresql+psycopg://", async_creator=self._sqlalchemy_connection, poolclass=NullPool
        )
        self.sessions: async_sessionmaker[AsyncSession] = async_sessionmaker(self.engine, expire_on_commit=False)

    async def _sqlalchemy_connection(self) -> psycopg.AsyncConnection[Any]:
        conn = await self.pool.getconn()
        await conn.set_autocommit(False)
        return conn

    async def verify(self, token: str) -> AuthenticatedUser:
        return await _require(self.project).verify(token)

    def user_transaction(self, user: AuthenticatedUser) -> Any:
        """``async with client.user_transaction(user) as conn:``"""
        return auser_transaction(self.pool, user)

    def service_role_transaction(self) -> Any:
        return auser_transaction(self.pool, None)

    @asynccontextmanager
    async def session(self, user: AuthenticatedUser | None) -> AsyncIterator[AsyncSession]:
        """An async SQLAlchemy session whose transaction runs as ``user`` (``None``: service role, server code)."""
        async with self.sessions.begin() as session:
            await session.run_sync(apply_user_to_session, user)
            yield session

    async def aclose(self) -> None:
        await self.engine.dispose()
        await self.pool.close()
        if self.project is not None:
            await self.project.aclose()

    async def __aenter__(self) -> AsyncDatabaseClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def create_async_database_client(
    settings: Settings,
    *,
    url: str | None = None,
    mode: DatabaseMode | None = None,
    min_size: int = 1,
    max_size: int = 10,
    timeout: float = 30.0,
) -> AsyncDatabaseClient:
    """The asyncio :func:`create_database_client`; call it inside the event loop that will use it."""
    plan = plan_connection(settings, url=url, mode=mode)
    client = AsyncDatabaseClient(plan, _project(settings), min_size=min_size, max_size=max_size, timeout=timeout)
    await client.pool.open(wait=False)
    return client


def _plain_select(statement: str) -> bool:
    """Whether ``statement`` is a ``SELECT`` (which, short of calling a writing function, changes nothing)."""
    return statement.lstrip().lower().startswith("select")
