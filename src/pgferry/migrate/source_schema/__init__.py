"""Recreate the source's schema on the target (``--schema-from source``), and undo it.

The schema is taken with ``pg_dump --schema-only`` from the source, because pg_dump is the one tool that
knows how to print every kind of object every PostgreSQL version has (identity and generated columns,
partitions, ``BEGIN ATOMIC`` bodies, dropped columns, …), in dependency order. What pg_dump cannot know is
that the target is a Supabase project, so its output is rewritten before it is applied:

* Supabase-managed schemas (``auth``, ``storage``, ``extensions``, …) are never dumped: on a real project
  they already exist, are owned by Supabase's roles, and must not be created or altered by us.
* Extensions live in schema ``extensions`` on Supabase but usually in ``public`` on Neon. pg_dump prints
  every reference to an extension's type, function, operator or operator class schema-qualified
  (``"public"."vector"(1536)``, ``OPERATOR("public".<=>)``), so those references are moved to the schema the
  extension has (or will have) on the target. Only names that really belong to the extension, as recorded
  in the source's ``pg_depend``, are touched; ``"public"."tasks"`` stays where it is.
* ``CREATE EXTENSION`` is dropped for extensions the target already has (Supabase owns them: re-creating or
  commenting on them fails with "must be owner of extension"), and placed in ``extensions`` otherwise.

The SQL is applied with psycopg in one transaction, statement by statement, so a failure names the statement
that failed and leaves the target exactly as it was. :class:`SchemaInventory` and :func:`drop_statements`
let a rollback remove precisely the objects the schema phase created, and nothing that was there before.
"""

from pgferry.migrate.source_schema._apply import apply_schema_sql
from pgferry.migrate.source_schema._common import (
    MANAGED_SCHEMAS,
    SERVER_MANAGED_COLUMN_OPTIONS,
    SchemaApplyError,
    SchemaDumpError,
    SchemaRewriteError,
)
from pgferry.migrate.source_schema._dump import dump_source_schema
from pgferry.migrate.source_schema._extensions import ExtensionMember, extension_members, extension_schemas
from pgferry.migrate.source_schema._inventory import SchemaInventory, drop_statements, take_inventory
from pgferry.migrate.source_schema._rewrite import rewrite_extension_schemas, rewrite_for_target, schema_sql_for_target

__all__ = [
    "MANAGED_SCHEMAS",
    "SERVER_MANAGED_COLUMN_OPTIONS",
    "ExtensionMember",
    "SchemaApplyError",
    "SchemaDumpError",
    "SchemaInventory",
    "SchemaRewriteError",
    "apply_schema_sql",
    "drop_statements",
    "dump_source_schema",
    "extension_members",
    "extension_schemas",
    "rewrite_extension_schemas",
    "rewrite_for_target",
    "schema_sql_for_target",
    "take_inventory",
]
