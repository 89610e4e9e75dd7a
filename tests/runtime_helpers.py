"""Shared pieces of the runtime tests: real HS256 access tokens for local users, a verifier that checks them."""

from __future__ import annotations

import time
import uuid
from typing import Any

import jwt

from pgferry.config import Settings, load_settings
from pgferry.db.rls import user_claims
from pgferry.supabase.project import SupabaseProject
from pgferry.sync.auth import TokenVerifier

SECRET = "runtime-test-jwt-secret-0123456789abcdef"
SUPABASE_URL = "http://127.0.0.1:54321"
ISSUER = f"{SUPABASE_URL}/auth/v1"


def token_for(user_id: uuid.UUID, *, secret: str = SECRET, **overrides: Any) -> str:
    """A Supabase-shaped access token for ``user_id`` signed with ``secret``; ``overrides`` replace claims."""
    claims = user_claims(user_id, issuer=ISSUER)
    claims.update(overrides)
    return jwt.encode(claims, secret, algorithm="HS256")


def service_role_key(*, secret: str = SECRET) -> str:
    """A legacy service-role API key: a JWT signed with the project secret whose role is service_role."""
    now = int(time.time())
    claims = {
        "role": "service_role",
        "iss": "supabase",
        "iat": now,
        "exp": now + 3600,
        "aud": "authenticated",
        "sub": str(uuid.uuid4()),
    }
    return jwt.encode(claims, secret, algorithm="HS256")


def verifier() -> TokenVerifier:
    return TokenVerifier(jwt_secret=SECRET, supabase_url=SUPABASE_URL)


def anon_key(*, secret: str = SECRET) -> str:
    """A legacy anon API key (role anon), what SUPABASE_ANON_KEY holds."""
    now = int(time.time())
    return jwt.encode({"role": "anon", "iss": "supabase", "iat": now, "exp": now + 3600}, secret, algorithm="HS256")


def project() -> SupabaseProject:
    """The project as server code sees it: verification with the legacy secret, sync and async."""
    return SupabaseProject(SUPABASE_URL, anon_key(), jwt_secret=SECRET)


def settings_for(url: str, **overrides: Any) -> Settings:
    """Settings as a service on the local stack has them: the database URL, the project, the JWT secret."""
    values: dict[str, Any] = {
        "supabase_db_url": url,
        "supabase_url": SUPABASE_URL,
        "supabase_anon_key": anon_key(),
        "supabase_jwt_secret": SECRET,
        "profile": "dev",
    }
    values.update(overrides)
    return load_settings(**values)
