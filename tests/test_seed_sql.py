"""supabase/seed.sql applies on top of the migrations, twice, and its two users are kept apart by RLS."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import psycopg

from pgferry.db.rls import scoped_transaction, user_claims
from pgferry.schema.models import PLATFORM_TABLES
from pgferry.testing.servers import ServerPair

SEED = Path(__file__).resolve().parents[1] / "supabase" / "seed.sql"
ADA = uuid.UUID("11111111-1111-4111-8111-111111111111")
GRACE = uuid.UUID("22222222-2222-4222-8222-222222222222")


def test_seed_sql_applies_and_respects_rls(server_pair: ServerPair, target_url: str) -> None:
    psql = str(server_pair.install.program("psql"))
    for _ in range(2):  # re-runnable
        subprocess.run(
            [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", str(SEED), target_url],
            check=True,
            capture_output=True,
            text=True,
        )
    with psycopg.connect(target_url, autocommit=True) as conn:
        total = {t: conn.execute(f"select count(*) from public.{t}").fetchone() for t in PLATFORM_TABLES}
        assert all(count is not None and count[0] >= 1 for count in total.values()), total
        for user, other in ((ADA, GRACE), (GRACE, ADA)):
            with scoped_transaction(conn, user_claims(user)):
                for table in PLATFORM_TABLES:
                    owners = {r[0] for r in conn.execute(f"select distinct user_id from public.{table}")}
                    assert other not in owners
                    assert owners <= {user}
