"""ElectricSQL sync: the HTTP Shape protocol, the dev sync server and the authorizing shape proxy.

- :mod:`~pgferry.sync.protocol` — offsets, shape definitions, messages and headers (pure).
- :mod:`~pgferry.sync.where` — the where-clause subset: parsed into an AST, rendered back, never pasted.
- :mod:`~pgferry.sync.shapes`, :mod:`~pgferry.sync.store`, :mod:`~pgferry.sync.feed`,
  :mod:`~pgferry.sync.server` — the dev server: shapes from a snapshot plus the replication stream, logs on disk.
- :mod:`~pgferry.sync.auth`, :mod:`~pgferry.sync.proxy` — Supabase token verification and the proxy that scopes
  every shape to its user before it reaches Electric (or the dev server).

Must not touch migrations or the schema: sync reads the platform's tables, it never defines them.
"""
