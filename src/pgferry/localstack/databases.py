"""Databases on a local server: create, clone from a template, drop.

Tests need a fresh database each, quickly. Building the Supabase baseline and running every migration takes
seconds; cloning a prepared template takes a few milliseconds, so each server keeps templates and tests get
clones.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import psycopg
from psycopg import sql

from pgferry.db.connect import connect
from pgferry.localstack.cluster import PostgresCluster


def database_exists(cluster: PostgresCluster, name: str) -> bool:
    with connect(cluster.url(), application_name="pgferry-localstack") as conn:
        return conn.execute("select 1 from pg_database where datname = %s", (name,)).fetchone() is not None


def create_database(cluster: PostgresCluster, name: str, *, template: str | None = None) -> str:
    """Create ``name`` (from ``template`` if given) and return its URL."""
    query = sql.SQL("create database {}").format(sql.Identifier(name))
    if template is not None:
        query = sql.SQL("create database {} template {} strategy file_copy").format(
            sql.Identifier(name), sql.Identifier(template)
        )
    with connect(cluster.url(), application_name="pgferry-localstack") as conn:
        conn.execute(query)
    return cluster.url(name)


def drop_database(cluster: PostgresCluster, name: str) -> None:
    """Drop ``name`` even when a replication consumer (a sync server, an online migration) left a slot in it:
    a logical slot blocks DROP DATABASE, and on a throwaway local server nothing else needs it."""
    with connect(cluster.url(), application_name="pgferry-localstack") as conn:
        conn.execute(
            "select pg_terminate_backend(active_pid) from pg_catalog.pg_replication_slots"
            " where database = %s and active_pid is not null",
            (name,),
        )
        for _attempt in range(50):
            try:
                conn.execute(
                    "select pg_drop_replication_slot(slot_name) from pg_catalog.pg_replication_slots"
                    " where database = %s",
                    (name,),
                )
                break
            except psycopg.errors.ObjectInUse:
                time.sleep(0.1)  # the walsender we terminated has not exited yet
        drop = sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name))
        for _attempt in range(6):
            try:
                conn.execute(drop)
                return
            except psycopg.errors.ObjectInUse:
                # FORCE waits 5 s for terminated sessions to exit; on a loaded machine a backend deep in a long
                # query (a killed migration's verification) can take longer to notice.
                time.sleep(1.0)
        conn.execute(drop)


def ensure_template(cluster: PostgresCluster, name: str, prepare: Callable[[str], object]) -> None:
    """Create template ``name`` by running ``prepare(url)`` on a new database, unless it already exists.

    A half-prepared template from an interrupted run is dropped and rebuilt, never reused.
    """
    with connect(cluster.url(), application_name="pgferry-localstack") as conn:
        row = conn.execute("select datistemplate from pg_database where datname = %s", (name,)).fetchone()
        if row is not None and row[0]:
            return
        conn.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    prepare(cluster.url(name))
    with connect(cluster.url(), application_name="pgferry-localstack") as conn:
        conn.execute(sql.SQL("alter database {} with is_template true").format(sql.Identifier(name)))
