"""Options and helpers shared by several commands."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pgferry.config import DatabaseUrl, Settings, load_settings, parse_database_url
from pgferry.errors import ConfigError

if TYPE_CHECKING:
    from pgferry.localstack.stack import LocalStack


def settings() -> Settings:
    return load_settings()


def stack(home: Path | None = None) -> LocalStack:
    from pgferry.localstack.stack import LocalStack  # only the commands that need servers pay for it

    return LocalStack(home or settings().home)


def database_url(
    value: str | None, *, env_name: str, fallback: DatabaseUrl | None, option: str = "--database-url"
) -> DatabaseUrl:
    """The URL given as ``option`` on the command line, else from the environment; a clear error otherwise."""
    if value:
        return parse_database_url(value, option)
    if fallback is not None:
        return fallback
    raise ConfigError(option, f"is required (or set {env_name}), e.g. postgresql://postgres:…@host:5432/postgres")
