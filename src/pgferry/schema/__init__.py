"""The platform schema: SQLAlchemy models and the migrations that are its single source of truth.

Owns table definitions, Supabase extras (RLS, realtime publication, vector functions and indexes) and the
emission of the same migrations as plain SQL in the Supabase CLI layout. Must not hold data-moving code.
"""
