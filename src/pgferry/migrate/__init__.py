"""Migration engine: Neon (any PostgreSQL) to Supabase: plan, schema, data, verification, rollback.

Owns moving data and proving it arrived; must not hold runtime or sync code.
"""
