"""Databases on a local server: create, clone from a template, drop.

Tests need a fresh database each, quickly. Building the Supabase baseline and running every migration takes
seconds; cloning a prepared template takes a few milliseconds, so each server keeps templates and tests get
clones.
"""

from __future__ import annotations

from collections.abc import Callable

import psycopg
from psycopg import sql

from pgferry.localstack.cluster import PostgresCluster


def database_exists(cluster: PostgresCluster, name: str) -> bool:
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        return conn.execute("select 1 from pg_database where datname = %s", (name,)).fetchone() is not None


def create_database(cluster: PostgresCluster, name: str, *, template: str | None = None) -> str:
    """Create ``name`` (from ``template`` if given) and return its URL."""
    query = sql.SQL("create database {}").format(sql.Identifier(name))
    if template is not None:
        query = sql.SQL("create database {} template {} strategy file_copy").format(
            sql.Identifier(name), sql.Identifier(template)
        )
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        conn.execute(query)
    return cluster.url(name)


def drop_database(cluster: PostgresCluster, name: str) -> None:
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        conn.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))


def ensure_template(cluster: PostgresCluster, name: str, prepare: Callable[[str], object]) -> None:
    """Create template ``name`` by running ``prepare(url)`` on a new database, unless it already exists.

    A half-prepared template from an interrupted run is dropped and rebuilt, never reused.
    """
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        row = conn.execute("select datistemplate from pg_database where datname = %s", (name,)).fetchone()
        if row is not None and row[0]:
            return
        conn.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    prepare(cluster.url(name))
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        conn.execute(sql.SQL("alter database {} with is_template true").format(sql.Identifier(name)))
