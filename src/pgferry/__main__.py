"""``python -m pgferry``: the same CLI as the ``pgferry`` console script (handy where scripts are not on PATH)."""

from pgferry.cli.main import run

run()
