"""What a migration is asked to do, validated once, where it is built.

The CLI only parses arguments into :class:`MigrationOptions`; a Python caller builds the same object. Either
way a bad value fails here with a one-line :class:`pgferry.errors.ConfigError` naming the option, before a
connection is opened.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from pgferry.config import DatabaseUrl, parse_database_url
from pgferry.db.retry import RetryPolicy
from pgferry.errors import ConfigError
from pgferry.migrate.catalog import TableFilter

__all__ = ["MAX_JOBS", "MigrationOptions", "OnError", "SchemaFrom"]

OnError = Literal["stop", "skip-table", "rollback"]
SchemaFrom = Literal["pgferry", "source"]
MAX_JOBS = 64
_MEMORY = re.compile(r"^\d+\s*(kB|MB|GB)$")


@dataclass(frozen=True)
class MigrationOptions:
    """One migration's settings. URLs may be given as strings; they are parsed (and hidden) here.

    ``jobs`` copy workers run at once, as many index builds beside them, and one verification: see the
    README's "Connections and limits" for what that holds open on each server.
    """

    source_url: DatabaseUrl
    target_url: DatabaseUrl
    jobs: int = 2
    table_filter: TableFilter = field(default_factory=TableFilter)
    schema_from: SchemaFrom = "pgferry"
    batch_rows: int | None = None
    verify: bool = True
    on_error: OnError = "stop"
    maintenance_work_mem: str = "512MB"
    online: bool = False
    """Follow the source by logical replication after the copy, until ``cutover`` (see ``migrate.online``)."""
    retry_policy: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        for name, option in (("source_url", "--source"), ("target_url", "--target")):
            value: Any = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, parse_database_url(value, option))
            elif not isinstance(value, DatabaseUrl):
                raise ConfigError(option, "must be a postgresql:// URL")
        if isinstance(self.jobs, bool) or not isinstance(self.jobs, int) or not 1 <= self.jobs <= MAX_JOBS:
            raise ConfigError("--jobs", f"must be a whole number from 1 to {MAX_JOBS}, not {self.jobs!r}")
        if self.batch_rows is not None and (
            isinstance(self.batch_rows, bool) or not isinstance(self.batch_rows, int) or self.batch_rows < 1
        ):
            raise ConfigError(
                "--batch-rows",
                f"must be a positive number of rows, not {self.batch_rows!r} (omit it for ~64 MB chunks)",
            )
        if self.schema_from not in get_args(SchemaFrom):
            raise ConfigError("--schema-from", f"must be pgferry or source, not {self.schema_from!r}")
        if self.on_error not in get_args(OnError):
            raise ConfigError("--on-error", f"must be stop, skip-table or rollback, not {self.on_error!r}")
        if not _MEMORY.match(self.maintenance_work_mem):
            raise ConfigError(
                "--maintenance-work-mem", f"must look like 512MB or 2GB, not {self.maintenance_work_mem!r}"
            )

    def as_dict(self) -> dict[str, Any]:
        return {
            "jobs": self.jobs,
            "filter": self.table_filter.as_dict(),
            "schema_from": self.schema_from,
            "batch_rows": self.batch_rows,
            "verify": self.verify,
            "on_error": self.on_error,
            "maintenance_work_mem": self.maintenance_work_mem,
            "online": self.online,
        }
