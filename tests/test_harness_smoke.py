import psycopg


def test_target_has_migrations(target_url: str) -> None:
    with psycopg.connect(target_url) as conn:
        assert conn.execute("select version_num from pgferry.alembic_version").fetchone() is not None
