"""The local stack: real PostgreSQL servers on loopback standing in for Neon and Supabase.

Owns server lifecycles, the stack's state file and the preparation of each server (Neon-shaped source,
Supabase-shaped target). Must not contain migration or sync logic: those run against the stack's URLs
exactly as they run against production.
"""
