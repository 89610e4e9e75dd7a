"""The shape proxy over real HTTP: uvicorn serves the proxy and a stand-in Electric on loopback.

The upstream records every request it receives, so "refused" always also means "upstream never saw it": an
authorization bug that still forwards the request would otherwise pass unnoticed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import hashlib
import hmac
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from pgferry.errors import ConfigError
from pgferry.localstack.cluster import free_port
from pgferry.sync.auth import AuthenticatedUser, TokenVerifier
from pgferry.sync.errors import ProtocolError
from pgferry.sync.proxy import (
    EXPOSED_HEADERS,
    ProxyConfig,
    TableRule,
    build_upstream_params,
    create_proxy_app,
    default_tables,
    parse_table,
)
from pgferry.sync.where import parse_where, render_text

SUPABASE_URL = "https://proj.supabase.co"
ISSUER = f"{SUPABASE_URL}/auth/v1"
JWT_SECRET = "super-secret-jwt-token-with-at-least-32-characters"
ELECTRIC_SECRET = "electric-api-secret-xyz"
USER = uuid.UUID("4b0c2f1e-6a51-4e63-9d8e-1f6f0c7a2b11")
OTHER_USER = uuid.UUID("9d9e0a3c-1b2c-4d5e-8f90-a1b2c3d4e5f6")
TASK_COLUMNS = frozenset({"id", "user_id", "title", "status", "priority"})


# --------------------------------------------------------------------------------------------------------------
# Serving ASGI apps on loopback
# --------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def serve(app: Any) -> Iterator[str]:
    """Run ``app`` under uvicorn in a thread on a free loopback port; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


# --------------------------------------------------------------------------------------------------------------
# A stand-in Electric that records what it was asked
# --------------------------------------------------------------------------------------------------------------

SHAPE_BODY = [
    {
        "key": '"public"."environments"/"1"',
        "value": {"id": "1", "name": "dev"},
        "headers": {"operation": "insert", "relation": ["public", "environments"]},
    },
    {"headers": {"control": "up-to-date"}},
]
ETAG = '"shape-etag-1"'


@dataclass
class Recorded:
    query: list[tuple[str, str]]
    headers: dict[str, str]

    def get(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [value for key, value in self.query if key == name]


@dataclass
class FakeElectric:
    requests: list[Recorded] = field(default_factory=list)
    jwks: dict[str, Any] = field(default_factory=lambda: {"keys": []})
    jwks_fetches: int = 0
    release: threading.Event = field(default_factory=threading.Event)  # lets the "stream" body finish
    released: bool | None = None  # whether it finished because of release (not a 30 s timeout)

    def app(self) -> Starlette:
        async def shape(request: Request) -> Response:
            recorded = Recorded(list(request.query_params.multi_items()), dict(request.headers))
            self.requests.append(recorded)
            headers = {
                "electric-handle": "h-1",
                "electric-offset": "0_0",
                "electric-schema": json.dumps({"id": {"type": "uuid", "pk_index": 0}}),
                "electric-up-to-date": "",
                "cache-control": "public, max-age=60",
                "etag": ETAG,
                "x-internal-debug": "do-not-relay",
                "vary": "Accept-Encoding",
            }
            handle = recorded.get("handle")
            if request.headers.get("if-none-match") == ETAG:
                return Response(status_code=304, headers=headers)
            if handle == "gone":
                return JSONResponse([{"headers": {"control": "must-refetch"}}], status_code=409, headers=headers)
            if recorded.get("live") == "true":
                await asyncio.sleep(1.0)
                headers["electric-cursor"] = "1234"
                return JSONResponse([{"headers": {"control": "up-to-date"}}], headers=headers)
            if handle == "stream":

                async def chunks() -> AsyncIterator[bytes]:
                    yield b'[{"headers": {"control": "snapshot-start"}}'
                    self.released = await asyncio.to_thread(self.release.wait, 30)
                    yield b', {"headers": {"control": "up-to-date"}}]'

                return StreamingResponse(chunks(), media_type="application/json", headers=headers)
            body = json.dumps(SHAPE_BODY).encode()
            if "gzip" in request.headers.get("accept-encoding", ""):
                headers["content-encoding"] = "gzip"
                body = gzip.compress(body)
            return Response(body, media_type="application/json", headers=headers)

        async def jwks(request: Request) -> Response:
            self.jwks_fetches += 1
            return JSONResponse(self.jwks)

        return Starlette(routes=[Route("/v1/shape", shape), Route("/auth/v1/.well-known/jwks.json", jwks)])


@dataclass
class Stack:
    electric: FakeElectric
    upstream: str
    hs: str  # HS256 proxy with issuer check and an Electric secret
    jwks: str  # JWKS-only proxy
    down: str  # HS256 proxy whose upstream is not listening (and whose JWKS URL is dead)
    origins: str  # proxy with an explicit CORS origin list
    rsa_keys: dict[str, rsa.RSAPrivateKey]
    ec_key: ec.EllipticCurvePrivateKey


def _rsa_jwk(kid: str, key: rsa.RSAPrivateKey) -> dict[str, Any]:
    jwk: dict[str, Any] = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**jwk, "kid": kid, "use": "sig", "alg": "RS256"}


def _ec_jwk(kid: str, key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    jwk: dict[str, Any] = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**jwk, "kid": kid, "use": "sig", "alg": "ES256"}


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    electric = FakeElectric()
    rsa_keys = {kid: rsa.generate_private_key(public_exponent=65537, key_size=2048) for kid in ("k1", "k2", "k3")}
    ec_key = ec.generate_private_key(ec.SECP256R1())
    electric.jwks = {"keys": [_rsa_jwk("k1", rsa_keys["k1"]), _ec_jwk("e1", ec_key)]}
    tables = {**default_tables(), "public.tasks": TableRule("user_id", ("id",), TASK_COLUMNS)}
    with contextlib.ExitStack() as stack:
        upstream = stack.enter_context(serve(electric.app()))
        hs = ProxyConfig(
            upstream=upstream,
            verifier=TokenVerifier(jwt_secret=JWT_SECRET, supabase_url=SUPABASE_URL),
            tables=tables,
            electric_secret=ELECTRIC_SECRET,
        )
        jwks = ProxyConfig(
            upstream=upstream,
            verifier=TokenVerifier(
                jwks_url=f"{upstream}/auth/v1/.well-known/jwks.json", supabase_url=SUPABASE_URL, jwks_min_refetch=0
            ),
        )
        dead = f"http://127.0.0.1:{free_port()}"
        down = ProxyConfig(
            upstream=dead,
            verifier=TokenVerifier(
                jwt_secret=JWT_SECRET, jwks_url=f"{dead}/jwks.json", supabase_url=SUPABASE_URL, http_timeout=2
            ),
        )
        origins = ProxyConfig(
            upstream=upstream,
            verifier=TokenVerifier(jwt_secret=JWT_SECRET, supabase_url=SUPABASE_URL),
            allow_origins=("https://app.example.com",),
        )
        yield Stack(
            electric=electric,
            upstream=upstream,
            hs=stack.enter_context(serve(create_proxy_app(hs))),
            jwks=stack.enter_context(serve(create_proxy_app(jwks))),
            down=stack.enter_context(serve(create_proxy_app(down))),
            origins=stack.enter_context(serve(create_proxy_app(origins))),
            rsa_keys=rsa_keys,
            ec_key=ec_key,
        )


@pytest.fixture
def env(stack: Stack) -> Stack:
    stack.electric.requests.clear()
    return stack


# --------------------------------------------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------------------------------------------


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "sub": str(USER),
        "role": "authenticated",
        "aud": "authenticated",
        "iss": ISSUER,
        "exp": now + 3600,
        "iat": now,
        "email": "ada@example.com",
        "session_id": str(uuid.uuid4()),
        "aal": "aal1",
        "is_anonymous": False,
    }
    base.update(overrides)
    return {key: value for key, value in base.items() if value is not None}


def hs_token(secret: str = JWT_SECRET, **overrides: Any) -> str:
    return jwt.encode(claims(**overrides), secret, algorithm="HS256")


def rs_token(key: rsa.RSAPrivateKey, kid: str | None, **overrides: Any) -> str:
    headers = {"kid": kid} if kid else None
    return jwt.encode(claims(**overrides), key, algorithm="RS256", headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_token(header: dict[str, Any], payload: dict[str, Any], sign: Any = None) -> str:
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = sign(signing_input.encode()) if sign else b""
    return f"{signing_input}.{b64(signature)}"


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def get(base: str, params: Any = None, headers: dict[str, str] | None = None, **kwargs: Any) -> httpx.Response:
    return httpx.get(f"{base}/v1/shape", params=params, headers=headers, timeout=30, **kwargs)


SHAPE = {"table": "environments", "offset": "-1"}


# --------------------------------------------------------------------------------------------------------------
# Authentication
# --------------------------------------------------------------------------------------------------------------


def _tampered() -> str:
    header, payload, signature = hs_token().split(".")
    forged = json.loads(base64.urlsafe_b64decode(payload + "=="))
    forged["sub"] = str(OTHER_USER)
    return f"{header}.{b64(json.dumps(forged).encode())}.{signature}"


REFUSED_TOKENS = {
    "malformed": lambda: "not-a-jwt",
    "alg-none": lambda: raw_token({"alg": "none", "typ": "JWT"}, claims()),
    "alg-none-capitalised": lambda: raw_token({"alg": "None", "typ": "JWT"}, claims()),
    "wrong-secret": lambda: hs_token("another-secret-of-the-same-length-or-so-12345"),
    "tampered-payload": _tampered,
    "tampered-signature": lambda: hs_token()[:-4] + ("AAAA" if not hs_token().endswith("AAAA") else "BBBB"),
    "expired": lambda: hs_token(exp=int(time.time()) - 3600, iat=int(time.time()) - 7200),
    "not-yet-valid": lambda: hs_token(nbf=int(time.time()) + 3600),
    "issued-in-future": lambda: hs_token(iat=int(time.time()) + 3600),
    "no-exp": lambda: hs_token(exp=None),
    "wrong-aud": lambda: hs_token(aud="other"),
    "no-aud": lambda: hs_token(aud=None),
    "wrong-iss": lambda: hs_token(iss="https://evil.supabase.co/auth/v1"),
    "service-role": lambda: hs_token(role="service_role"),
    "anon": lambda: hs_token(role="anon", sub=None),
    "anon-with-sub": lambda: hs_token(role="anon"),
    "no-role": lambda: hs_token(role=None),
    "sub-not-uuid": lambda: hs_token(sub="admin"),
    "rs256-on-hs-proxy": lambda: rs_token(rsa.generate_private_key(public_exponent=65537, key_size=2048), "k1"),
}


@pytest.mark.parametrize("name", sorted(REFUSED_TOKENS))
def test_bad_tokens_are_401_and_never_forwarded(env: Stack, name: str) -> None:
    token = REFUSED_TOKENS[name]()
    response = get(env.hs, SHAPE, bearer(token))
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"].startswith('Bearer realm="pgferry", error="invalid_token"')
    body = response.json()
    assert body["message"] == "Unauthorized" and body["errors"]["authorization"]
    assert token not in response.text and JWT_SECRET not in response.text
    assert "authorization" in response.headers["vary"].lower()
    assert env.electric.requests == []


@pytest.mark.parametrize(
    "headers",
    [{}, {"authorization": ""}, {"authorization": "Basic dXNlcjpwYXNz"}, {"authorization": "Bearer"}],
    ids=["none", "empty", "basic", "bearer-without-token"],
)
def test_missing_or_non_bearer_authorization_is_401(env: Stack, headers: dict[str, str]) -> None:
    response = get(env.hs, SHAPE, headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json()["message"] == "Unauthorized"
    assert env.electric.requests == []


def test_token_in_query_string_is_not_accepted(env: Stack) -> None:
    response = get(env.hs, {**SHAPE, "token": hs_token(), "access_token": hs_token()})
    assert response.status_code == 401
    assert env.electric.requests == []


def test_expired_token_says_so(env: Stack) -> None:
    response = get(env.hs, SHAPE, bearer(hs_token(exp=int(time.time()) - 60, iat=int(time.time()) - 3600)))
    assert response.status_code == 401
    assert response.json()["errors"]["authorization"] == ["token expired"]


def test_small_clock_skew_is_tolerated(env: Stack) -> None:
    response = get(env.hs, SHAPE, bearer(hs_token(exp=int(time.time()) - 2)))
    assert response.status_code == 200


def test_disallowed_table_is_403_after_auth_only(env: Stack) -> None:
    for table in ("users", "auth.users", "pgferry.alembic_version", '"Tasks"', "public.secrets"):
        assert get(env.hs, {"table": table, "offset": "-1"}).status_code == 401  # anonymous callers learn nothing
        response = get(env.hs, {"table": table, "offset": "-1"}, bearer(hs_token()))
        assert response.status_code == 403, table
        assert response.json()["message"] == "Forbidden"
        assert "table" in response.json()["errors"]
    for bad in ("", "public.tasks; drop table x", "a.b.c", "tasks--"):
        response = get(env.hs, {"table": bad, "offset": "-1"}, bearer(hs_token()))
        assert response.status_code == 400, bad
        assert response.json()["message"] == "Invalid request"
    assert get(env.hs, {"offset": "-1"}, bearer(hs_token())).status_code == 400
    assert env.electric.requests == []


# --------------------------------------------------------------------------------------------------------------
# Forwarding
# --------------------------------------------------------------------------------------------------------------


def test_valid_hs256_token_is_forwarded_with_owner_predicate(env: Stack) -> None:
    response = get(env.hs, SHAPE, bearer(hs_token()))
    assert response.status_code == 200, response.text
    assert response.json() == SHAPE_BODY
    [seen] = env.electric.requests
    assert seen.get("table") == '"public"."environments"'
    assert seen.get("where") == '"user_id" = $1'
    assert seen.get("params[1]") == str(USER)
    assert str(USER) not in (seen.get("where") or "")
    assert "authorization" not in seen.headers  # the user's token never reaches Electric


@pytest.mark.parametrize(
    "table", ["environments", "public.environments", '"public"."environments"', "PUBLIC.Environments"]
)
def test_table_names_are_normalised(env: Stack, table: str) -> None:
    assert get(env.hs, {"table": table, "offset": "-1"}, bearer(hs_token())).status_code == 200
    assert env.electric.requests[-1].get("table") == '"public"."environments"'


def test_client_where_is_anded_with_owner_and_params_renumbered(env: Stack) -> None:
    client_where = "status = $1 AND name <> $2"
    params = {**SHAPE, "where": client_where, "params[1]": "active", "params[2]": "x' OR '1'='1"}
    response = get(env.hs, params, bearer(hs_token()))
    assert response.status_code == 200, response.text
    [seen] = env.electric.requests
    assert seen.get("where") == f'"user_id" = $3 AND ({render_text(parse_where(client_where))})'
    assert seen.get("params[1]") == "active"
    assert seen.get("params[2]") == "x' OR '1'='1"  # hostile values stay values
    assert seen.get("params[3]") == str(USER)


def test_client_where_without_params(env: Stack) -> None:
    client_where = "status = 'active'"
    response = get(env.hs, {**SHAPE, "where": client_where}, bearer(hs_token()))
    assert response.status_code == 200, response.text
    [seen] = env.electric.requests
    assert seen.get("where") == f'"user_id" = $1 AND ({render_text(parse_where(client_where))})'
    assert seen.all("params[1]") == [str(USER)]


def test_client_cannot_widen_to_another_user(env: Stack) -> None:
    params = {**SHAPE, "where": "user_id = $1", "params[1]": str(OTHER_USER)}
    response = get(env.hs, params, bearer(hs_token()))
    assert response.status_code == 200
    [seen] = env.electric.requests
    assert seen.get("where") == f'"user_id" = $2 AND ({render_text(parse_where("user_id = $1"))})'
    assert seen.get("params[2]") == str(USER)


@pytest.mark.parametrize(
    "where",
    [
        "true) OR (true",
        "1=1; drop table tasks",
        "status = 'a' -- AND user_id = 'x'",
        "status = 'a' /* comment */",
        "(select true)",
    ],
)
def test_hostile_where_is_400_and_never_forwarded(env: Stack, where: str) -> None:
    response = get(env.hs, {**SHAPE, "where": where}, bearer(hs_token()))
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["message"] == "Invalid request"
    assert list(body["errors"]) == ["where"]
    assert env.electric.requests == []


def test_params_without_where_are_refused(env: Stack) -> None:
    response = get(env.hs, {**SHAPE, "params[1]": "x"}, bearer(hs_token()))
    assert response.status_code == 400
    assert env.electric.requests == []


def test_protocol_params_forwarded_others_dropped_and_secret_added(env: Stack) -> None:
    params = [
        ("table", "environments"),
        ("offset", "26800584_4"),
        ("handle", "h-123"),
        ("cursor", "987"),
        ("expired_handle", "h-100"),
        ("replica", "full"),
        ("log", "full"),
        ("cache-buster", "abc"),
        ("secret", "client-guess"),
        ("api_secret", "client-guess"),
        ("source_secret", "client-guess"),
        ("source_id", "someone-elses-source"),
        ("user_id", str(OTHER_USER)),
        ("debug", "1"),
    ]
    response = get(env.hs, params, bearer(hs_token()))
    assert response.status_code == 200, response.text
    [seen] = env.electric.requests
    expected = {
        "offset": "26800584_4",
        "handle": "h-123",
        "cursor": "987",
        "expired_handle": "h-100",
        "replica": "full",
        "log": "full",
        "cache-buster": "abc",
    }
    for name, value in expected.items():
        assert seen.all(name) == [value], name
    assert seen.all("secret") == [ELECTRIC_SECRET]
    for dropped in ("api_secret", "source_secret", "source_id", "user_id", "debug"):
        assert seen.all(dropped) == [], dropped
    assert {name for name, _ in seen.query} == {*expected, "table", "where", "params[1]", "secret"}


def test_subset_snapshot_params_are_validated(env: Stack) -> None:
    token = hs_token()
    params = {
        **SHAPE,
        "log": "changes_only",
        "subset__where": "status = $1",
        "subset__params": json.dumps({"1": "active"}),
        "subset__where_expr": json.dumps({"type": "raw", "sql": "true) OR (true"}),
        "subset__order_by": "name DESC NULLS LAST",
        "subset__limit": "10",
        "subset__offset": "0",
    }
    response = get(env.hs, params, bearer(token))
    assert response.status_code == 200, response.text
    [seen] = env.electric.requests
    assert seen.get("subset__where") == render_text(parse_where("status = $1"))
    assert seen.get("subset__params") == json.dumps({"1": "active"})
    assert seen.get("subset__order_by") == "name DESC NULLS LAST"
    assert (seen.get("subset__limit"), seen.get("subset__offset")) == ("10", "0")
    assert seen.get("subset__where_expr") is None  # an unchecked second copy of the filter never goes upstream
    assert seen.get("where") == '"user_id" = $1'  # the shape itself stays owner-scoped
    for bad in (
        {"subset__where": "true) OR (true"},
        {"subset__where": "status = $1", "subset__params": "not json"},
        {"subset__order_by": "name; drop table tasks"},
        {"subset__limit": "-1"},
        {"subset__params": json.dumps({"1": "x"})},
    ):
        response = get(env.hs, {**SHAPE, **bad}, bearer(token))
        assert response.status_code == 400, bad
        assert response.json()["message"] == "Invalid request"
    assert len(env.electric.requests) == 1


def test_no_secret_configured_means_none_sent(env: Stack) -> None:
    token = rs_token(env.rsa_keys["k1"], "k1")
    response = get(env.jwks, [*SHAPE.items(), ("secret", "client-guess")], bearer(token))
    assert response.status_code == 200, response.text
    assert env.electric.requests[-1].all("secret") == []


def test_columns_must_be_allowed_and_include_the_primary_key(env: Stack) -> None:
    token = hs_token()
    response = get(env.hs, {"table": "tasks", "offset": "-1", "columns": '"id","title"'}, bearer(token))
    assert response.status_code == 200, response.text
    assert env.electric.requests[-1].get("columns") == '"id","title"'
    # Without a column list only the allowed columns are requested, primary key first.
    assert get(env.hs, {"table": "tasks", "offset": "-1"}, bearer(token)).status_code == 200
    assert env.electric.requests[-1].get("columns") == '"id","priority","status","title","user_id"'
    count = len(env.electric.requests)
    assert get(env.hs, {"table": "tasks", "offset": "-1", "columns": "title"}, bearer(token)).status_code == 400
    hidden = get(env.hs, {"table": "tasks", "offset": "-1", "columns": "id,description"}, bearer(token))
    assert hidden.status_code == 403
    assert "description" in hidden.json()["errors"]["columns"][0]
    # Filtering on a hidden column would leak it too.
    by_hidden = get(env.hs, {"table": "tasks", "offset": "-1", "where": "description = 'x'"}, bearer(token))
    assert by_hidden.status_code == 403
    assert len(env.electric.requests) == count
    # Tables without a column allow-list still need the primary key.
    assert get(env.hs, {**SHAPE, "columns": "name"}, bearer(token)).status_code == 400


# --------------------------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------------------------


def test_headers_are_relayed_and_vary_authorization_added(env: Stack) -> None:
    response = get(env.hs, SHAPE, {**bearer(hs_token()), "accept-encoding": "identity"})
    assert response.status_code == 200
    assert response.headers["electric-handle"] == "h-1"
    assert response.headers["electric-offset"] == "0_0"
    assert json.loads(response.headers["electric-schema"]) == {"id": {"type": "uuid", "pk_index": 0}}
    assert "electric-up-to-date" in response.headers
    # One user's shape: private, so no shared cache keeps it even if it ignores Vary.
    assert response.headers["cache-control"] == "private, max-age=60"
    assert response.headers["etag"] == ETAG
    assert response.headers["content-type"].startswith("application/json")
    assert "x-internal-debug" not in response.headers
    vary = [token.strip().lower() for token in response.headers["vary"].split(",")]
    assert "authorization" in vary and "accept-encoding" in vary


def test_gzip_is_passed_through_undecoded(env: Stack) -> None:
    with httpx.stream(
        "GET", f"{env.hs}/v1/shape", params=SHAPE, headers={**bearer(hs_token()), "accept-encoding": "gzip"}
    ) as response:
        raw = b"".join(response.iter_raw())
    assert response.status_code == 200
    assert response.headers["content-encoding"] == "gzip"
    assert json.loads(gzip.decompress(raw)) == SHAPE_BODY
    assert env.electric.requests[-1].headers["accept-encoding"] == "gzip"
    get(env.hs, SHAPE, {**bearer(hs_token()), "accept-encoding": "identity"})
    assert env.electric.requests[-1].headers["accept-encoding"] == "identity"


def test_if_none_match_gives_304(env: Stack) -> None:
    response = get(env.hs, SHAPE, {**bearer(hs_token()), "if-none-match": ETAG})
    assert response.status_code == 304
    assert response.content == b""
    assert response.headers["etag"] == ETAG
    assert "authorization" in response.headers["vary"].lower()


def test_409_must_refetch_is_relayed(env: Stack) -> None:
    response = get(env.hs, {**SHAPE, "offset": "0_0", "handle": "gone"}, bearer(hs_token()))
    assert response.status_code == 409
    assert response.json() == [{"headers": {"control": "must-refetch"}}]
    assert response.headers["electric-handle"] == "h-1"


def test_live_long_poll_waits_for_upstream(env: Stack) -> None:
    started = time.monotonic()
    response = get(env.hs, {**SHAPE, "offset": "0_0", "handle": "h-1", "live": "true"}, bearer(hs_token()))
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert elapsed >= 0.9
    assert response.headers["electric-cursor"] == "1234"
    assert response.json() == [{"headers": {"control": "up-to-date"}}]
    assert env.electric.requests[-1].get("live") == "true"


def test_body_is_streamed_not_buffered(env: Stack) -> None:
    """The upstream holds the rest of its body until the client has seen the first chunk: a buffering proxy
    could only deliver that chunk after the upstream gave up waiting (30 s), which the upstream records."""
    env.electric.release.clear()
    env.electric.released = None
    with httpx.stream(
        "GET", f"{env.hs}/v1/shape", params={**SHAPE, "handle": "stream"}, headers=bearer(hs_token()), timeout=60
    ) as response:
        chunks = response.iter_raw()
        first = next(chunks)
        env.electric.release.set()
        rest = b"".join(chunks)
    assert env.electric.released is True, "the first chunk waited for the whole upstream body"
    expected = [{"headers": {"control": "snapshot-start"}}, {"headers": {"control": "up-to-date"}}]
    assert json.loads(first + rest) == expected


def test_cors_preflight_and_exposed_headers(env: Stack) -> None:
    preflight = httpx.options(
        f"{env.hs}/v1/shape",
        headers={
            "origin": "https://app.example.com",
            "access-control-request-method": "GET",
            "access-control-request-headers": "authorization",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "*"
    allowed = {h.strip().lower() for h in preflight.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type"} <= allowed
    assert "GET" in preflight.headers["access-control-allow-methods"]
    assert env.electric.requests == []

    response = get(env.hs, SHAPE, {**bearer(hs_token()), "origin": "https://app.example.com"})
    assert response.headers["access-control-allow-origin"] == "*"
    exposed = {h.strip().lower() for h in response.headers["access-control-expose-headers"].split(",")}
    assert set(EXPOSED_HEADERS) <= exposed
    client_headers = {"electric-offset", "electric-handle", "electric-schema", "electric-cursor", "electric-up-to-date"}
    assert client_headers <= exposed
    # A browser must be able to read why it was refused, too.
    refused = get(env.hs, SHAPE, {"origin": "https://app.example.com"})
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == "*"


def test_cors_with_configured_origins(env: Stack) -> None:
    ok = get(env.origins, SHAPE, {**bearer(hs_token()), "origin": "https://app.example.com"})
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == "https://app.example.com"
    other = get(env.origins, SHAPE, {**bearer(hs_token()), "origin": "https://evil.example.com"})
    assert "access-control-allow-origin" not in other.headers
    preflight = httpx.options(
        f"{env.origins}/v1/shape",
        headers={"origin": "https://evil.example.com", "access-control-request-method": "GET"},
    )
    assert preflight.status_code == 400


def test_upstream_down_is_502(env: Stack) -> None:
    response = get(env.down, SHAPE, bearer(hs_token()))
    assert response.status_code == 502
    assert response.json()["message"] == "Bad gateway"


def test_jwks_unreachable_is_503_not_401(env: Stack) -> None:
    response = get(env.down, SHAPE, bearer(rs_token(env.rsa_keys["k1"], "k1")))
    assert response.status_code == 503
    assert response.headers["retry-after"]


def test_health_and_unknown_routes(env: Stack) -> None:
    health = httpx.get(f"{env.hs}/v1/health")
    assert health.status_code == 200
    assert health.json() == {"status": "active"}
    assert httpx.get(f"{env.hs}/v1/other").status_code == 404
    assert httpx.get(f"{env.hs}/").status_code == 404
    assert httpx.post(f"{env.hs}/v1/shape", headers=bearer(hs_token())).status_code == 405
    assert httpx.delete(f"{env.hs}/v1/shape", headers=bearer(hs_token())).status_code == 405
    assert env.electric.requests == []


# --------------------------------------------------------------------------------------------------------------
# JWKS (asymmetric keys)
# --------------------------------------------------------------------------------------------------------------


def test_jwks_rs256_and_es256_tokens_are_accepted(env: Stack) -> None:
    response = get(env.jwks, SHAPE, bearer(rs_token(env.rsa_keys["k1"], "k1")))
    assert response.status_code == 200, response.text
    assert env.electric.requests[-1].get("params[1]") == str(USER)
    es = jwt.encode(claims(sub=str(OTHER_USER)), env.ec_key, algorithm="ES256", headers={"kid": "e1"})
    response = get(env.jwks, SHAPE, bearer(es))
    assert response.status_code == 200, response.text
    assert env.electric.requests[-1].get("params[1]") == str(OTHER_USER)


def test_jwks_refuses_wrong_algorithms_and_keys(env: Stack) -> None:
    public_pem = (
        env.rsa_keys["k1"]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )

    def hmac_with_public_key(data: bytes) -> bytes:
        return hmac.new(public_pem, data, hashlib.sha256).digest()

    refused = {
        "hs256-when-only-jwks": hs_token(),
        "rs-hs-confusion": raw_token({"alg": "HS256", "kid": "k1", "typ": "JWT"}, claims(), hmac_with_public_key),
        "unknown-kid": rs_token(env.rsa_keys["k3"], "k3"),
        "wrong-key-for-kid": rs_token(env.rsa_keys["k3"], "k1"),
        "es-key-as-rsa": rs_token(env.rsa_keys["k1"], "e1"),
        "rs512": jwt.encode(claims(), env.rsa_keys["k1"], algorithm="RS512", headers={"kid": "k1"}),
        "alg-none": raw_token({"alg": "none", "kid": "k1"}, claims()),
        "service-role": rs_token(env.rsa_keys["k1"], "k1", role="service_role"),
        "wrong-iss": rs_token(env.rsa_keys["k1"], "k1", iss="https://other.supabase.co/auth/v1"),
    }
    for name, token in refused.items():
        response = get(env.jwks, SHAPE, bearer(token))
        assert response.status_code == 401, name
    assert env.electric.requests == []


def test_jwks_key_rotation_refetches_once(env: Stack) -> None:
    electric = env.electric
    assert get(env.jwks, SHAPE, bearer(rs_token(env.rsa_keys["k1"], "k1"))).status_code == 200
    original = electric.jwks
    try:
        electric.jwks = {"keys": [_rsa_jwk("k2", env.rsa_keys["k2"])]}
        before = electric.jwks_fetches
        assert get(env.jwks, SHAPE, bearer(rs_token(env.rsa_keys["k2"], "k2"))).status_code == 200
        assert electric.jwks_fetches == before + 1
        # Cached now: no fetch for a known kid.
        assert get(env.jwks, SHAPE, bearer(rs_token(env.rsa_keys["k2"], "k2"))).status_code == 200
        assert electric.jwks_fetches == before + 1
        # The retired key is gone after the refetch.
        assert get(env.jwks, SHAPE, bearer(rs_token(env.rsa_keys["k1"], "k1"))).status_code == 401
        # An unknown kid costs exactly one refetch, then 401.
        before = electric.jwks_fetches
        assert get(env.jwks, SHAPE, bearer(rs_token(env.rsa_keys["k3"], "k9"))).status_code == 401
        assert electric.jwks_fetches == before + 1
    finally:
        electric.jwks = original
        # Let the next test's k1 token trigger a refetch of the restored set.


# --------------------------------------------------------------------------------------------------------------
# Verifier and request rewriting without HTTP
# --------------------------------------------------------------------------------------------------------------


def test_verifier_returns_typed_user() -> None:
    verifier = TokenVerifier(jwt_secret=JWT_SECRET, supabase_url=SUPABASE_URL)
    user = asyncio.run(verifier.verify(hs_token()))
    assert user.user_id == USER
    assert user.claims["email"] == "ada@example.com"
    with pytest.raises(TypeError):
        user.claims["role"] = "service_role"  # type: ignore[index]


def test_verifier_requires_a_key() -> None:
    with pytest.raises(ConfigError) as excinfo:
        TokenVerifier()
    assert "SUPABASE_JWT_SECRET" in str(excinfo.value) and "SUPABASE_JWKS_URL" in str(excinfo.value)


def test_parse_table_forms() -> None:
    assert parse_table("tasks") == ("public", "tasks")
    assert parse_table("Public.Tasks") == ("public", "tasks")
    assert parse_table('"public"."Tasks"') == ("public", "Tasks")
    assert parse_table('"we""ird"') == ("public", 'we"ird')
    with pytest.raises(ProtocolError):
        parse_table("tasks where true")


def test_default_tables_are_the_eight_platform_tables() -> None:
    tables = default_tables()
    assert len(tables) == 8
    assert all(rule.owner_column == "user_id" and rule.primary_key for rule in tables.values())
    assert "public.tasks" in tables and "public.agent_memory" in tables


def test_unused_extra_params_never_share_a_number_with_the_owner() -> None:
    """Electric accepts values the clause does not use; the owner's number must be past all of them, or the
    upstream would get two values for it (one of them whatever the client chose: another user's id)."""
    config = ProxyConfig(upstream="http://127.0.0.1:1", verifier=TokenVerifier(jwt_secret=JWT_SECRET))
    user = AuthenticatedUser(user_id=USER, claims={})
    items = [
        ("table", "tasks"),
        ("where", "title = $1"),
        ("params[1]", "x"),
        ("params[2]", str(OTHER_USER)),
        ("params[3]", "unused too"),
    ]
    query = build_upstream_params(items, user, config)
    numbers = [name for name, _ in query if name.startswith("params[")]
    assert len(numbers) == len(set(numbers)) == 4, query
    forwarded = dict(query)
    assert forwarded["where"] == '"user_id" = $4 AND (("title" = $1))'
    assert forwarded["params[4]"] == str(USER)
    assert forwarded["params[2]"] == str(OTHER_USER)  # forwarded as the unused value it is, never as the owner


def test_build_upstream_params_owner_index_follows_highest_client_param() -> None:
    config = ProxyConfig(upstream="http://127.0.0.1:1", verifier=TokenVerifier(jwt_secret=JWT_SECRET))
    user = AuthenticatedUser(user_id=USER, claims={})
    items = [("table", "tasks"), ("where", "priority > $1 AND status = $2"), ("params[1]", "3"), ("params[2]", "x")]
    query = dict(build_upstream_params(items, user, config))
    assert query["where"].startswith('"user_id" = $3 AND (')
    assert query["params[3]"] == str(USER)
    assert "secret" not in query


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------


def _clean_env(**extra: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("SUPABASE_", "ELECTRIC_", "PGFERRY_PROFILE", "NEON_"))
    }
    return {**env, **extra}


def test_cli_without_jwt_key_is_a_one_line_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pgferry.cli.main", "sync", "proxy", "--port", str(free_port())],
        capture_output=True,
        text=True,
        env=_clean_env(),
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "SUPABASE_JWT_SECRET" in lines[0] and "SUPABASE_JWKS_URL" in lines[0]


def test_cli_serves_the_proxy(env: Stack, tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "pgferry.cli.main", "sync", "proxy", "--port", str(port), "--upstream", env.upstream],
        env=_clean_env(SUPABASE_JWT_SECRET=JWT_SECRET, SUPABASE_URL=SUPABASE_URL, ELECTRIC_SECRET=ELECTRIC_SECRET),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "proxy did not start"
            time.sleep(0.1)
        response = get(base, SHAPE, bearer(hs_token()))
        assert response.status_code == 200, response.text
        assert env.electric.requests[-1].all("secret") == [ELECTRIC_SECRET]
        assert get(base, SHAPE, bearer(hs_token(iss="https://x.supabase.co/auth/v1"))).status_code == 401
    finally:
        process.terminate()
        process.communicate(timeout=10)


# --------------------------------------------------------------------------------------------------------------
# Per-user limits and column allow-lists


def test_user_limits_expire_unused_shapes_and_free_snapshot_slots() -> None:
    from pgferry.sync.errors import TooManyRequestsError
    from pgferry.sync.limits import UserLimiter, UserLimits

    now = [1000.0]
    limiter = UserLimiter(UserLimits(max_shapes=2, max_concurrent_snapshots=1, shape_ttl=60), clock=lambda: now[0])
    limiter.use_shape(USER, (("where", "a"),))
    now[0] += 30
    limiter.use_shape(USER, (("where", "b"),))
    limiter.use_shape(OTHER_USER, (("where", "c"),))  # every user has their own budget
    with pytest.raises(TooManyRequestsError) as refused:
        limiter.use_shape(USER, (("where", "c"),))
    assert refused.value.status == 429 and refused.value.headers() == {"retry-after": "30"}
    limiter.use_shape(USER, (("where", "a"),))  # using a shape again is always allowed, and refreshes it
    now[0] += 31  # both last used 31 s ago: still within the TTL
    with pytest.raises(TooManyRequestsError):
        limiter.use_shape(USER, (("where", "c"),))
    now[0] += 30  # both unused for 61 s: expired, so a new one fits
    limiter.use_shape(USER, (("where", "c"),))
    with limiter.snapshot(USER):
        with pytest.raises(TooManyRequestsError) as busy:
            with limiter.snapshot(USER):
                pass
        assert busy.value.headers() == {"retry-after": "1"}
        with limiter.snapshot(OTHER_USER):
            pass
    with limiter.snapshot(USER):  # released
        pass


def test_column_rules_from_the_command_line() -> None:
    from pgferry.sync.proxy import parse_column_rules

    rules = parse_column_rules(["public.tasks=id,user_id,title,status", "agent_memory=id,content"])
    assert rules["public.tasks"].allowed_columns == frozenset({"id", "user_id", "title", "status"})
    assert rules["public.tasks"].owner_column == "user_id" and rules["public.tasks"].primary_key == ("id",)
    assert rules["public.agent_memory"].allowed_columns == frozenset({"id", "content"})
    assert rules["public.environments"].allowed_columns is None
    for bad, message in [
        ("public.tasks", "is not like"),
        ("public.tasks=", "is not like"),
        ("public.tasks=title", "primary key"),
        ("public.nope=id", "not one of the tables"),
        ("x y=id", "is not like"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_column_rules([bad])
