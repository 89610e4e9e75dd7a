"""Database access: connections, retry policy, server-side checksums.

Owns how pgferry talks to PostgreSQL; knows nothing about the platform's tables.
"""
