"""The platform schema as it exists on Neon, before the move: plain tables, no Supabase extras.

The local stack's ``source`` server and the migration tests need a database shaped like the team's Neon
project: the same eight tables, pgvector installed in ``public`` (Neon's default), the ``updated_at``
trigger, and none of ``auth``, RLS or the realtime publication. It is built from the models, so it can only
differ from the Supabase side in the ways the move itself has to handle.
"""

from __future__ import annotations

from sqlalchemy import create_engine, pool, text

from pgferry.db.connect import connect
from pgferry.schema.migrator import sqlalchemy_url
from pgferry.schema.models import UPDATED_AT_TABLES, Base

SET_UPDATED_AT = """
create or replace function public.set_updated_at() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  new.updated_at := pg_catalog.now();
  return new;
end
$$
"""


def neon_schema_exists(conninfo: str) -> bool:
    with connect(conninfo, application_name="pgferry-schema", autocommit=False) as conn:
        row = conn.execute("select to_regclass('public.tasks')").fetchone()
        return row is not None and row[0] is not None


def create_neon_schema(conninfo: str) -> None:
    """Create the platform tables the way the Neon project has them; harmless when they exist."""
    engine = create_engine(sqlalchemy_url(conninfo), poolclass=pool.NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(text("create extension if not exists vector"))
            Base.metadata.create_all(conn, checkfirst=True)
            conn.execute(text(SET_UPDATED_AT))
            for table in UPDATED_AT_TABLES:
                conn.execute(text(f"drop trigger if exists set_updated_at on public.{table}"))
                conn.execute(
                    text(
                        f"create trigger set_updated_at before update on public.{table} "
                        "for each row execute function public.set_updated_at()"
                    )
                )
    finally:
        engine.dispose()
