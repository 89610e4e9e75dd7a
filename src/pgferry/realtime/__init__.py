"""Supabase Realtime's ``postgres_changes`` over pgferry's replication reader, authorized exactly like RLS.

Owns the Realtime protocol server (``pgferry realtime serve``): the Phoenix-channel websocket Supabase's clients
speak (:mod:`~pgferry.realtime.protocol`, :mod:`~pgferry.realtime.server`), the filter grammar
(:mod:`~pgferry.realtime.filters`), the joined channels (:mod:`~pgferry.realtime.channels`), the change feed from
the ``supabase_realtime`` publication (:mod:`~pgferry.realtime.feed`, on :mod:`pgferry.replication`) and the
batched RLS evaluation that decides who sees what (:mod:`~pgferry.realtime.authorize`).

Must not import the local stack or the test fixtures, and must not re-implement token verification
(:mod:`pgferry.sync.auth`), role switching (:mod:`pgferry.db.rls`) or replication (:mod:`pgferry.replication`).
The client side (``RealtimeService``) lives in :mod:`pgferry.supabase.realtime`.
"""
