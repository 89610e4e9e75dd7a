"""The runtime data layer: how the platform's Python services use the Supabase database after the move.

Modules (each imported on its own; this package imports none of them, so ``pgferry.runtime.search`` does not pull
in SQLAlchemy or supabase-py):

* ``errors`` — the named errors of the runtime layer.
* ``scoped`` — RLS-scoped transactions on pooled connections (sync and async), as PostgREST runs a request.
* ``search`` — ``search_tasks`` / ``search_memory`` over the ``match_*`` SQL functions, as the calling user.

It must not touch the migration engine, the sync servers or the local stack; it builds on ``pgferry.db`` (connect,
retry, RLS claims) and ``pgferry.sync.auth`` (token verification).
"""
