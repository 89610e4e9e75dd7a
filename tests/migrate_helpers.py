"""Shared setup for migration tests: a seeded source, a service, and checks that the move was exact."""

from __future__ import annotations

from typing import Any

from pgferry.config import parse_database_url
from pgferry.migrate.catalog import TableFilter
from pgferry.migrate.engine import MigrationOptions, MigrationService, ProgressReporter
from pgferry.testing.data import TestDataManager


def seed_source(url: str, scale: float = 0.03, seed: int = 11) -> TestDataManager:
    manager = TestDataManager(url, seed=seed)
    manager.seed(scale)
    return manager


def service_for(
    source_url: str, target_url: str, *, reporter: ProgressReporter | None = None, **options: Any
) -> MigrationService:
    table_filter = options.pop("table_filter", TableFilter())
    return MigrationService(
        MigrationOptions(
            source_url=parse_database_url(source_url, "--source"),
            target_url=parse_database_url(target_url, "--target"),
            table_filter=table_filter,
            **options,
        ),
        reporter,
    )
