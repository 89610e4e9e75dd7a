"""pgferry: move an AI-agent platform's database from Neon to Supabase, then run its data layer.

Capabilities, one package each (see the README's "What is here"): ``pgferry.migrate`` (the move),
``pgferry.replication`` (the logical replication reader), ``pgferry.sync`` (Electric's Shape API: dev server
and proxy), ``pgferry.db`` (connections, retries, checksums, RLS-scoped sessions), ``pgferry.schema`` (the
platform's models and migrations), ``pgferry.supabase`` (the local Supabase baseline).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pgferry")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
