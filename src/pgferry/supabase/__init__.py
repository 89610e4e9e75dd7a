"""Supabase: the services a hosted project offers, and a stand-in for its database on local servers.

Owns the local baseline (roles, ``auth``, ``extensions``, ``supabase_realtime``) that lets pgferry's
migrations and RLS run on a plain PostgreSQL. Must never write to Supabase-managed schemas of a real project.
"""
