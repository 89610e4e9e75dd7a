"""Settings loading, validation messages and secret redaction (no database needed)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from pydantic import ValidationError

from pgferry.config import DatabaseUrl, Settings, load_settings, parse_database_url
from pgferry.errors import ConfigError, DatabaseUrlError, PgferryError

PASSWORD = "Zq9-hunter2-SECRETPW"
SERVICE_KEY = "svc-role-KEY-do-not-leak-123"
ANON_KEY = "anon-KEY-do-not-leak-456"
JWT_SECRET = "jwt-SECRET-do-not-leak-789"

ENV_VARS = (
    "PGFERRY_PROFILE",
    "SUPABASE_URL",
    "SUPABASE_ANON_KEY",
    "SUPABASE_SERVICE_ROLE_KEY",
    "SUPABASE_DB_URL",
    "SUPABASE_POOLER_URL",
    "NEON_DATABASE_URL",
    "ELECTRIC_URL",
    "ELECTRIC_SECRET",
    "SUPABASE_JWT_SECRET",
    "SUPABASE_JWKS_URL",
    "PGFERRY_PG_BINDIR",
    "PGFERRY_HOME",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Isolate from the developer's environment and any .env in the checkout."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def set_prod_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGFERRY_PROFILE", "prod")
    monkeypatch.setenv("SUPABASE_URL", "https://abcdefgh.supabase.co")
    monkeypatch.setenv("SUPABASE_ANON_KEY", ANON_KEY)
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", SERVICE_KEY)
    monkeypatch.setenv("SUPABASE_DB_URL", f"postgresql://postgres:{PASSWORD}@db.abcdefgh.supabase.co:5432/postgres")
    monkeypatch.setenv("SUPABASE_JWT_SECRET", JWT_SECRET)


def config_error(**overrides: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_settings(**overrides)
    err = info.value
    assert "\n" not in str(err)
    assert "errors.pydantic.dev" not in str(err)
    assert "validation error" not in str(err)
    return err


# -- loading ---------------------------------------------------------------------------


def test_defaults_load_without_any_configuration() -> None:
    settings = load_settings()
    assert settings.profile == "dev"
    assert settings.supabase_url is None
    assert settings.supabase_db_url is None
    assert settings.pg_bindir is None
    assert isinstance(settings.home, Path)


def test_valid_prod_settings_load_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    set_prod_env(monkeypatch)
    monkeypatch.setenv("SUPABASE_POOLER_URL", f"postgres://postgres.abc:{PASSWORD}@pooler.example.com:6543/postgres")
    monkeypatch.setenv("NEON_DATABASE_URL", f"postgresql://neondb_owner:{PASSWORD}@ep-x.neon.tech/neondb")
    monkeypatch.setenv("ELECTRIC_URL", "http://localhost:3000/")
    monkeypatch.setenv("SUPABASE_JWKS_URL", "https://abcdefgh.supabase.co/auth/v1/.well-known/jwks.json")
    monkeypatch.setenv("PGFERRY_PG_BINDIR", "/usr/lib/postgresql/17/bin")
    monkeypatch.setenv("PGFERRY_HOME", "/srv/pgferry")

    settings = load_settings()

    assert settings.profile == "prod"
    assert settings.supabase_url == "https://abcdefgh.supabase.co"
    assert settings.supabase_anon_key is not None
    assert settings.supabase_anon_key.get_secret_value() == ANON_KEY
    assert settings.supabase_service_role_key is not None
    assert settings.supabase_service_role_key.get_secret_value() == SERVICE_KEY
    assert settings.supabase_db_url is not None
    assert settings.supabase_db_url.host == "db.abcdefgh.supabase.co"
    assert settings.supabase_db_url.dbname == "postgres"
    assert PASSWORD in settings.supabase_db_url.get_secret_value()
    assert settings.supabase_pooler_url is not None
    assert settings.supabase_pooler_url.port == 6543
    assert settings.supabase_pooler_url.get_secret_value().startswith("postgresql://")
    assert settings.neon_database_url is not None
    assert settings.neon_database_url.user == "neondb_owner"
    assert settings.electric_url == "http://localhost:3000"
    assert settings.supabase_jwks_url == "https://abcdefgh.supabase.co/auth/v1/.well-known/jwks.json"
    assert settings.pg_bindir == Path("/usr/lib/postgresql/17/bin")
    assert settings.home == Path("/srv/pgferry")


def test_env_names_are_case_insensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("supabase_url", "https://lower.supabase.co")
    assert load_settings().supabase_url == "https://lower.supabase.co"


def test_dotenv_file_is_read(clean_env: Path) -> None:
    (clean_env / ".env").write_text(
        "SUPABASE_URL=https://fromdotenv.supabase.co/\n"
        f"SUPABASE_DB_URL=postgresql://postgres:{PASSWORD}@localhost:54322/postgres\n"
        "PGFERRY_HOME=/tmp/pgferry-from-dotenv\n"
        "SOMETHING_UNRELATED=ignored\n"
    )
    settings = load_settings()
    assert settings.supabase_url == "https://fromdotenv.supabase.co"
    assert settings.supabase_db_url is not None
    assert settings.supabase_db_url.port == 54322
    assert settings.home == Path("/tmp/pgferry-from-dotenv")


def test_environment_overrides_dotenv(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (clean_env / ".env").write_text("SUPABASE_URL=https://fromdotenv.supabase.co\n")
    monkeypatch.setenv("SUPABASE_URL", "https://fromenv.supabase.co")
    assert load_settings().supabase_url == "https://fromenv.supabase.co"


def test_empty_values_count_as_unset(clean_env: Path) -> None:
    (clean_env / ".env").write_text("SUPABASE_URL=\nSUPABASE_DB_URL=\n")
    settings = load_settings()
    assert settings.supabase_url is None
    assert settings.supabase_db_url is None


def test_overrides_by_field_name_beat_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGFERRY_HOME", "/from/env")
    settings = load_settings(home="/from/override", supabase_url="https://o.supabase.co")
    assert settings.home == Path("/from/override")
    assert settings.supabase_url == "https://o.supabase.co"
    assert Settings(home="/direct").home == Path("/direct")


def test_home_is_not_read_from_plain_home_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/definitely/not/pgferry")
    monkeypatch.setenv("PROFILE", "prod")
    settings = load_settings()
    assert settings.home != Path("/definitely/not/pgferry")
    assert settings.profile == "dev"


def test_default_home_depends_on_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr("os.geteuid", lambda: 0)
    assert load_settings().home == Path("/var/lib/pgferry")
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert load_settings().home == tmp_path / ".local" / "share" / "pgferry"


def test_home_expands_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("PGFERRY_HOME", "~/state")
    assert load_settings().home == tmp_path / "state"


# -- validation errors -----------------------------------------------------------------


@pytest.mark.parametrize("bad", ["not a url", "ftp://x", "https://", "abcdefgh.supabase.co"])
def test_bad_supabase_url_names_setting_and_shape(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv("SUPABASE_URL", bad)
    err = config_error()
    assert err.setting == "SUPABASE_URL"
    assert str(err).startswith("SUPABASE_URL: ")
    assert "https://<project-ref>.supabase.co" in str(err)
    assert repr(bad) in str(err)
    assert isinstance(err, PgferryError)


def test_supabase_url_with_path_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUPABASE_URL", "https://abc.supabase.co/rest/v1")
    err = config_error()
    assert err.setting == "SUPABASE_URL"
    assert "without a path" in err.problem


def test_bad_electric_url_names_its_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ELECTRIC_URL", "localhost:3000")
    assert config_error().setting == "ELECTRIC_URL"


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        ("mysql://x", "postgresql://"),
        ("postgresql://hostonly", "database name"),
        (f"postgresql://u:{PASSWORD}@hostonly", "database name"),
        (f"mysql://u:{PASSWORD}@h/db", "postgresql://"),
        (f"postgresql://u:{PASSWORD}@/db", "host"),
        ("just some text", "postgresql://user:password@host:5432/dbname"),
    ],
)
def test_bad_supabase_db_url_names_setting(monkeypatch: pytest.MonkeyPatch, bad: str, expected: str) -> None:
    monkeypatch.setenv("SUPABASE_DB_URL", bad)
    err = config_error()
    assert isinstance(err, DatabaseUrlError)
    assert err.setting == "SUPABASE_DB_URL"
    assert str(err).startswith("SUPABASE_DB_URL: ")
    assert expected in err.problem
    assert PASSWORD not in str(err)


def test_bad_url_echo_is_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEON_DATABASE_URL", f"mysql://owner:{PASSWORD}@ep-x.neon.tech/neondb")
    err = config_error()
    assert err.setting == "NEON_DATABASE_URL"
    assert "mysql://owner:***@ep-x.neon.tech/neondb" in str(err)


def test_bad_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGFERRY_PROFILE", "staging")
    err = config_error()
    assert err.setting == "PGFERRY_PROFILE"
    assert "'dev'" in err.problem
    assert "'prod'" in err.problem
    assert "'staging'" in err.problem


def test_first_failing_setting_is_reported_and_others_mentioned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUPABASE_URL", "nope")
    monkeypatch.setenv("ELECTRIC_URL", "nope")
    err = config_error()
    assert err.setting == "SUPABASE_URL"
    assert "ELECTRIC_URL" in str(err)


@pytest.mark.parametrize(
    "missing",
    ["SUPABASE_URL", "SUPABASE_ANON_KEY", "SUPABASE_SERVICE_ROLE_KEY", "SUPABASE_DB_URL"],
)
def test_prod_profile_requires_supabase_settings(monkeypatch: pytest.MonkeyPatch, missing: str) -> None:
    set_prod_env(monkeypatch)
    monkeypatch.delenv(missing)
    err = config_error()
    assert err.setting == missing
    assert "PGFERRY_PROFILE=prod" in err.problem


def test_prod_profile_requires_a_jwt_verifier(monkeypatch: pytest.MonkeyPatch) -> None:
    set_prod_env(monkeypatch)
    monkeypatch.delenv("SUPABASE_JWT_SECRET")
    err = config_error()
    assert err.setting == "SUPABASE_JWKS_URL"
    assert "SUPABASE_JWT_SECRET" in err.problem
    monkeypatch.setenv("SUPABASE_JWKS_URL", "https://abcdefgh.supabase.co/auth/v1/.well-known/jwks.json")
    assert load_settings().profile == "prod"


def test_prod_profile_lists_every_missing_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    err = config_error(profile="prod")
    assert err.setting == "SUPABASE_URL"
    for name in ("SUPABASE_ANON_KEY", "SUPABASE_SERVICE_ROLE_KEY", "SUPABASE_DB_URL", "SUPABASE_JWKS_URL"):
        assert name in str(err)


def test_dev_profile_does_not_require_supabase() -> None:
    assert load_settings(profile="dev").supabase_service_role_key is None


# -- secrets ---------------------------------------------------------------------------


def test_secrets_never_in_settings_repr_or_str(monkeypatch: pytest.MonkeyPatch) -> None:
    set_prod_env(monkeypatch)
    monkeypatch.setenv("NEON_DATABASE_URL", f"postgresql://owner:{PASSWORD}@ep-x.neon.tech/neondb")
    monkeypatch.setenv("ELECTRIC_SECRET", SERVICE_KEY + "-electric")
    settings = load_settings()
    for text in (repr(settings), str(settings), settings.model_dump_json()):
        for secret in (PASSWORD, SERVICE_KEY, ANON_KEY, JWT_SECRET):
            assert secret not in text
    assert "postgresql://postgres:***@db.abcdefgh.supabase.co:5432/postgres" in repr(settings)


def test_secrets_never_in_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    set_prod_env(monkeypatch)
    monkeypatch.setenv("SUPABASE_POOLER_URL", f"postgresql://u:{PASSWORD}@pooler:99999/postgres")
    err = config_error()
    assert err.setting == "SUPABASE_POOLER_URL"
    assert PASSWORD not in str(err)
    assert PASSWORD not in repr(err)
    assert PASSWORD not in err.problem


def test_raw_settings_validation_error_hides_input(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUPABASE_DB_URL", f"mysql://u:{PASSWORD}@h/db")
    with pytest.raises(ValidationError) as info:
        Settings()
    assert PASSWORD not in str(info.value)


# -- DatabaseUrl -----------------------------------------------------------------------


def test_database_url_redaction() -> None:
    url = parse_database_url(f"postgresql://app:{PASSWORD}@db.example.com:6543/appdb?sslmode=require")
    expected = "postgresql://app:***@db.example.com:6543/appdb?sslmode=require"
    assert str(url) == expected
    assert url.redacted == expected
    assert repr(url) == f"DatabaseUrl({expected!r})"
    assert f"{url}" == expected
    assert url.get_secret_value() == f"postgresql://app:{PASSWORD}@db.example.com:6543/appdb?sslmode=require"
    assert (url.host, url.port, url.dbname, url.user) == ("db.example.com", 6543, "appdb", "app")


def test_database_url_redacts_password_query_parameter() -> None:
    url = parse_database_url(f"postgresql://app@db.example.com/appdb?password={PASSWORD}")
    assert PASSWORD not in str(url)
    assert PASSWORD in url.get_secret_value()


def test_database_url_defaults() -> None:
    url = parse_database_url("postgresql://db.example.com/appdb")
    assert url.port == 5432
    assert url.user is None
    assert str(url) == "postgresql://db.example.com/appdb"


@pytest.mark.parametrize("scheme", ["postgres", "postgresql+psycopg", "POSTGRESQL"])
def test_scheme_normalization(scheme: str) -> None:
    url = parse_database_url(f"{scheme}://u:{PASSWORD}@h:5433/db")
    assert url.get_secret_value() == f"postgresql://u:{PASSWORD}@h:5433/db"
    assert str(url) == "postgresql://u:***@h:5433/db"
    assert url.get_sqlalchemy_url() == f"postgresql+psycopg://u:{PASSWORD}@h:5433/db"


def test_unix_socket_url_via_host_parameter() -> None:
    url = parse_database_url("postgresql:///appdb?host=/var/run/postgresql")
    assert url.host == "/var/run/postgresql"
    assert url.dbname == "appdb"
    assert url.with_dbname("postgres").get_secret_value() == "postgresql:///postgres?host=/var/run/postgresql"


def test_with_dbname() -> None:
    url = parse_database_url(f"postgresql://app:{PASSWORD}@db.example.com:6543/appdb?sslmode=require")
    other = url.with_dbname("postgres")
    assert isinstance(other, DatabaseUrl)
    assert other.dbname == "postgres"
    assert (other.host, other.port, other.user) == ("db.example.com", 6543, "app")
    assert other.get_secret_value() == (f"postgresql://app:{PASSWORD}@db.example.com:6543/postgres?sslmode=require")
    assert url.dbname == "appdb"  # the original is unchanged
    assert url.with_dbname("test db").dbname == "test db"


def test_database_url_is_an_immutable_value() -> None:
    a = parse_database_url("postgres://u:p@h/db")
    b = parse_database_url("postgresql://u:p@h/db")
    assert a == b
    assert hash(a) == hash(b)
    assert a != parse_database_url("postgresql://u:p@h/other")
    with pytest.raises(AttributeError):
        a._url = "postgresql://evil/db"
    assert copy.deepcopy(a) == a  # goes through __reduce__, like pickle


def test_parse_database_url_names_the_option() -> None:
    with pytest.raises(DatabaseUrlError) as info:
        parse_database_url("mysql://x", "--target")
    assert info.value.setting == "--target"
    assert str(info.value).startswith("--target: ")
    assert "postgresql://user:password@host:5432/dbname" in str(info.value)

    with pytest.raises(DatabaseUrlError) as info:
        parse_database_url("postgresql://hostonly")
    assert info.value.setting == "--database-url"


def test_unescaped_at_in_password_is_explained() -> None:
    with pytest.raises(DatabaseUrlError) as info:
        parse_database_url("postgresql://u:p@ss@h/db")
    assert "%40" in str(info.value)
    assert "p@ss" not in str(info.value)


def test_config_error_is_single_line_and_copyable() -> None:
    err = ConfigError("SUPABASE_URL", "must be\nsomething")
    assert str(err) == "SUPABASE_URL: must be something"
    clone = copy.deepcopy(err)  # rebuilt from args, like pickle
    assert (clone.setting, clone.problem) == ("SUPABASE_URL", "must be\nsomething")
