"""Observability: structured logs and metrics. Owns how pgferry reports on itself; decides nothing."""
