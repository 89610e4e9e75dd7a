"""Alembic environment for pgferry's platform migrations.

The version table lives in the ``pgferry`` schema rather than ``public`` because on Supabase every table in
``public`` is exposed through the API and would need RLS; bookkeeping has no business there.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool, text

from pgferry.schema.models import Base

VERSION_TABLE_SCHEMA = "pgferry"
# Supabase puts extensions in their own schema; unqualified `vector` must resolve there (as it does for
# Supabase's own roles) whichever role or tool runs the migrations.
SEARCH_PATH = "SET search_path TO public, extensions"

config = context.config
target_metadata = Base.metadata


def include_object(obj: object, name: str | None, type_: str, reflected: bool, compare_to: object) -> bool:
    """Compare only what the models describe: tables in ``public`` that the models know."""
    if type_ == "table":
        return name in target_metadata.tables
    return True


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url") or "postgresql://",
        dialect_name="postgresql",
        target_metadata=target_metadata,
        literal_binds=True,
        version_table_schema=VERSION_TABLE_SCHEMA,
        transaction_per_migration=True,
        include_object=include_object,
    )
    context.execute(f"CREATE SCHEMA IF NOT EXISTS {VERSION_TABLE_SCHEMA}")
    context.execute(SEARCH_PATH)
    context.run_migrations()


def run_migrations_online() -> None:
    connectable = config.attributes.get("connection")
    if connectable is None:
        url = config.get_main_option("sqlalchemy.url")
        assert url, "sqlalchemy.url or a connection attribute is required"
        connectable = create_engine(url, poolclass=pool.NullPool)
        with connectable.connect() as connection:
            _run(connection)
        connectable.dispose()
    else:
        _run(connectable)


def _run(connection: object) -> None:
    from sqlalchemy.engine import Connection

    assert isinstance(connection, Connection)
    connection.execute(text(f"CREATE SCHEMA IF NOT EXISTS {VERSION_TABLE_SCHEMA}"))
    connection.execute(text(SEARCH_PATH))
    connection.commit()
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table_schema=VERSION_TABLE_SCHEMA,
        transaction_per_migration=True,
        include_object=include_object,
        compare_type=True,
    )
    context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
