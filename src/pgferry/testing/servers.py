"""Throwaway server pairs for tests and benchmarks.

A pair is a ``source`` and a ``target`` server of one PostgreSQL installation, on free ports, in a temporary
directory that is removed afterwards. Each server keeps prepared templates (Neon-shaped, Supabase-shaped,
bare Supabase baseline) so a test gets a fresh database by cloning, in milliseconds.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from pgferry.localstack.binaries import PostgresInstall
from pgferry.localstack.cluster import (
    ClusterSettings,
    PortInUseError,
    PostgresCluster,
    free_port,
    runnable_install,
    service_user,
)
from pgferry.localstack.databases import create_database, drop_database, ensure_template
from pgferry.localstack.stack import prepare_source_database, prepare_target_database
from pgferry.supabase.baseline import apply_local_baseline

NEON_TEMPLATE = "pgferry_tpl_neon"
SUPABASE_TEMPLATE = "pgferry_tpl_supabase"
BASELINE_TEMPLATE = "pgferry_tpl_baseline"

_counter = itertools.count()


def _scratch_root() -> Path:
    """A temporary directory other users can traverse (the server may run as another account)."""
    base = Path(os.environ.get("PGFERRY_TEST_TMPDIR", tempfile.gettempdir()))
    root = Path(tempfile.mkdtemp(prefix="pgferry-servers-", dir=base))
    root.chmod(0o755)
    return root


@dataclass
class ServerPair:
    install: PostgresInstall
    root: Path = field(default_factory=_scratch_root)
    source: PostgresCluster = field(init=False)
    target: PostgresCluster = field(init=False)

    def __post_init__(self) -> None:
        user = service_user()
        self.install = runnable_install(self.install, user, Path(tempfile.gettempdir()) / "pgferry-pginstall")
        self.source = PostgresCluster(self.install, self.root / "source", user=user)
        self.target = PostgresCluster(self.install, self.root / "target", user=user)

    @property
    def label(self) -> str:
        return self.install.label

    def start(self) -> None:
        for cluster in (self.source, self.target):
            cluster.init(ClusterSettings(port=free_port(), fast=True))
            # Another process may take the free port before the server binds it (parallel test workers).
            for attempt in range(5):
                try:
                    cluster.start()
                    break
                except PortInUseError:
                    if attempt == 4:
                        raise
                    cluster.set_port(free_port())
        ensure_template(self.source, NEON_TEMPLATE, prepare_source_database)
        ensure_template(self.target, SUPABASE_TEMPLATE, prepare_target_database)
        ensure_template(self.target, BASELINE_TEMPLATE, apply_local_baseline)

    def stop(self) -> None:
        for cluster in (self.source, self.target):
            cluster.destroy()
        shutil.rmtree(self.root, ignore_errors=True)

    @staticmethod
    def new_name(prefix: str) -> str:
        return f"{prefix}_{next(_counter)}_{uuid.uuid4().hex[:8]}"

    def clone(self, cluster: PostgresCluster, template: str | None, prefix: str = "t") -> tuple[str, str]:
        """A new database (from ``template``, or empty); returns ``(name, url)``."""
        name = self.new_name(prefix)
        return name, create_database(cluster, name, template=template)

    def drop(self, cluster: PostgresCluster, name: str) -> None:
        drop_database(cluster, name)
