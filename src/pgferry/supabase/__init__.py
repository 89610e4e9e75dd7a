"""Supabase: the services a hosted project offers, and a stand-in for its database on local servers.

- :mod:`~pgferry.supabase.auth`, :mod:`~pgferry.supabase.storage`, :mod:`~pgferry.supabase.functions` — Auth,
  Storage and Edge Functions services over supabase-py (extra ``pgferry[supabase]``), sync and async, acting as one
  user; :mod:`~pgferry.supabase.project` holds the project's URLs, keys, verification and HTTP clients;
  :mod:`~pgferry.supabase.errors` the named errors. Imported explicitly (this package does not import them), so the
  baseline works without the extra.
- :mod:`~pgferry.supabase.baseline` — the local baseline (roles, ``auth``, ``extensions``, ``supabase_realtime``)
  that lets pgferry's migrations and RLS run on a plain PostgreSQL. Must never write to Supabase-managed schemas of
  a real project.
"""
