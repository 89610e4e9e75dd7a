"""Exception types that pgferry raises on purpose.

Anything raised from here is an *expected* failure: a bad setting, an unreachable
database, a refused migration step. The CLI catches :class:`PgferryError` and prints
``str(err)`` as a single line instead of a traceback, so each message has to stand on
its own and tell the operator what to change. Unexpected exceptions are left alone so
that they still produce a full traceback.
"""

from __future__ import annotations

__all__ = ["ConfigError", "DatabaseUrlError", "PgferryError", "ToolError"]


class PgferryError(Exception):
    """Base class for failures the operator can fix without reading a traceback.

    The message is one line and actionable: it names the thing that is wrong and says
    what it should look like. The CLI prints it verbatim and exits non-zero, so never
    put secrets (passwords, API keys, JWT secrets) into it.
    """


class ConfigError(PgferryError):
    """A setting (environment variable or command-line option) has a bad or missing value.

    ``setting`` is the name the operator typed or must type (``SUPABASE_URL``,
    ``--database-url``), so the message points straight at the line to edit in
    ``.env`` or at the flag to fix, rather than at a Python attribute name.
    """

    setting: str
    problem: str

    def __init__(self, setting: str, problem: str) -> None:
        # Both parts go into ``args`` so the exception survives pickling (e.g. across
        # multiprocessing boundaries) without a custom ``__reduce__``.
        super().__init__(setting, problem)
        self.setting = setting
        self.problem = problem

    def __str__(self) -> str:
        # Newlines would break the one-line contract the CLI relies on.
        return " ".join(f"{self.setting}: {self.problem}".split())


class DatabaseUrlError(ConfigError):
    """A PostgreSQL connection URL is malformed or incomplete.

    Separate from :class:`ConfigError` so callers that accept URLs from several places
    (environment, ``--database-url``, ``--target``) can catch URL problems specifically.
    Messages only ever echo the redacted URL, never the password.
    """


class ToolError(PgferryError):
    """A program pgferry runs (a server, ``pg_ctl``, a background service) failed.

    The message is one line that says what failed and where its log is; the program's own output (often
    many lines) travels in :attr:`output`, for a caller that wants to show or keep it. Both pickle.
    """

    output: str

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(" ".join(message.split()), output)
        self.output = output

    def __str__(self) -> str:
        return str(self.args[0])
