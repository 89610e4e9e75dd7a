"""FunctionsService and AsyncFunctionsService against the Edge Functions gateway's documented contract.

supabase-functions talks, unchanged, to the loopback stand-in: Python handlers stand in for deployed functions, and
scripted responses replay the platform's failures (``sb-error-code`` headers from docs ``functions/error-codes.mdx``,
``x-relay-error: true``, 429 with ``Retry-After``, non-JSON error bodies). The retry tests count the requests that
reached the gateway, which is what "retries only where safe" is about.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from pgferry.db.retry import RetryPolicy
from pgferry.supabase import errors as e
from pgferry.supabase.auth import AuthService
from pgferry.supabase.functions import AsyncFunctionsService, FunctionsService
from pgferry.supabase.project import SupabaseProject
from pgferry.testing.asgi import free_port
from pgferry.testing.supabase_contract import RecordedRequest, Reply
from tests.supabase_helpers import ALICE, BOB, SECRET, stack

FAST = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05)


def _echo(request: RecordedRequest) -> Reply:
    return Reply(
        200,
        {
            "content_type": request.headers.get("content-type"),
            "body": request.body.decode("latin-1"),
            "custom": request.headers.get("x-trace"),
            "region": request.headers.get("x-region"),
        },
    )


def test_invoke_with_json_text_and_bytes_contract() -> None:
    with stack() as s:
        s.server.functions["echo"] = _echo
        s.server.functions["blob"] = lambda _r: Reply(200, body=b"\x89PNG", headers={"content-type": "image/png"})
        token = s.server.mint(s.alice_id)
        functions = FunctionsService(s.project, token)
        answer = functions.invoke("echo", {"query": "résumé", "k": [1, 2]}, headers={"x-trace": "t1"})
        assert answer["content_type"] == "application/json"
        assert json.loads(answer["body"].encode("latin-1")) == {"query": "résumé", "k": [1, 2]}
        assert answer["custom"] == "t1"
        assert functions.invoke("echo", "plain")["content_type"] == "text/plain"
        assert functions.invoke("echo", b"\x00\x01")["content_type"] == "application/octet-stream"
        assert functions.invoke("echo", [1, 2, 3])["body"] == "[1,2,3]"
        assert functions.invoke("blob", response="bytes") == b"\x89PNG"
        # per-call headers do not stick to later calls (supabase-functions 2.30 leaked them into its defaults)
        assert functions.invoke("echo", {})["custom"] is None
        with pytest.raises(ValueError, match="Authorization"):
            functions.invoke("echo", {}, headers={"Authorization": "Bearer other"})
        request = s.server.requests_to("/functions/v1/echo")[0]
        assert request.method == "POST" and request.headers["apikey"] == s.server.anon_key
        assert request.bearer == token


def test_each_user_invokes_with_their_own_token_contract() -> None:
    with stack() as s:
        s.server.functions["whoami"] = lambda r: Reply(200, {"bearer": r.bearer})
        alice, bob = AuthService(s.project), AuthService(s.project)
        a, b = alice.sign_in(*ALICE), bob.sign_in(*BOB)
        fa, fb = FunctionsService(s.project, alice), FunctionsService(s.project, bob)
        seen = [fa.invoke("whoami")["bearer"], fb.invoke("whoami")["bearer"], fa.invoke("whoami")["bearer"]]
        assert seen == [a.access_token, b.access_token, a.access_token]
        assert all(s.server.service_role_key not in str(r.headers) for r in s.server.requests)


def test_function_and_platform_errors_are_named_contract() -> None:
    with stack() as s:
        functions = FunctionsService(s.project, s.server.mint(s.alice_id), retry=FAST)
        with pytest.raises(e.FunctionNotFoundError, match="not deployed"):
            functions.invoke("missing", {})
        s.server.functions["strict"] = lambda _r: Reply(400, {"error": "query_embedding must have 1536 numbers"})
        with pytest.raises(e.FunctionHttpError, match="1536") as caught:
            functions.invoke("strict", {})
        assert caught.value.status == 400 and caught.value.body == {"error": "query_embedding must have 1536 numbers"}
        s.server.functions["crash"] = lambda _r: Reply(
            500, body=b"Internal Server Error", headers={"content-type": "text/plain"}
        )
        with pytest.raises(e.FunctionHttpError, match="HTTP 500") as crashed:
            functions.invoke("crash", {})  # a non-JSON error body is not a JSONDecodeError
        assert crashed.value.body == "Internal Server Error"
        cases = [
            (Reply(503, {"code": "BOOT_ERROR"}, headers={"sb-error-code": "BOOT_ERROR"}), e.FunctionUnavailableError),
            (Reply(546, {}, headers={"sb-error-code": "WORKER_LIMIT"}), e.FunctionUnavailableError),
            (Reply(500, body=b"", headers={"sb-error-code": "WORKER_ERROR"}), e.FunctionUnavailableError),
            (Reply(504, body=b"", headers={"sb-error-code": "IDLE_TIMEOUT"}), e.FunctionTimeoutError),
            (
                Reply(401, {"msg": "Invalid JWT"}, headers={"sb-error-code": "UNAUTHORIZED_INVALID_JWT_FORMAT"}),
                e.FunctionHttpError,
            ),
        ]
        for reply, expected in cases:
            s.server.script("POST", "/functions/v1/work", reply)
            with pytest.raises(expected) as platform:
                functions.invoke("work", {})
            assert type(platform.value) is expected and platform.value.code == reply.headers["sb-error-code"]
        assert len(s.server.requests_to("/functions/v1/work")) == len(cases)  # none of these was retried
        s.server.functions["text"] = lambda _r: Reply(200, body=b"not json", headers={"content-type": "text/plain"})
        with pytest.raises(e.FunctionHttpError, match="response='bytes'"):
            functions.invoke("text")


def test_relay_errors_whatever_the_status_and_retried_only_when_idempotent_contract() -> None:
    relay_2xx = Reply(200, {"ok": True}, headers={"x-relay-error": "true"})
    relay_5xx = Reply(502, body=b"relay failed", headers={"x-relay-error": "true"})
    with stack() as s:
        s.server.functions["work"] = lambda _r: Reply(200, {"ok": True})
        functions = FunctionsService(s.project, s.server.mint(s.alice_id), retry=FAST)
        for reply in (relay_2xx, relay_5xx):
            before = len(s.server.requests_to("/functions/v1/work"))
            s.server.script("POST", "/functions/v1/work", reply)
            with pytest.raises(e.FunctionRelayError, match="whether the function ran is unknown"):
                functions.invoke("work", {})
            assert len(s.server.requests_to("/functions/v1/work")) == before + 1
        s.server.script("POST", "/functions/v1/work", relay_5xx, relay_2xx)
        assert functions.invoke("work", {}, idempotent=True) == {"ok": True}
        s.server.script("POST", "/functions/v1/work", relay_5xx, relay_5xx, relay_5xx)
        with pytest.raises(e.FunctionRelayError):
            functions.invoke("work", {}, idempotent=True)


def test_rate_limits_are_retried_after_retry_after_contract() -> None:
    limited = Reply(429, {"msg": "rate limited"}, headers={"sb-error-code": "RATE_LIMIT_EXCEEDED", "retry-after": "0"})
    with stack() as s:
        s.server.functions["work"] = lambda _r: Reply(200, {"ok": True})
        functions = FunctionsService(s.project, s.server.mint(s.alice_id), retry=FAST)
        s.server.script("POST", "/functions/v1/work", limited, limited)
        assert functions.invoke("work", {"n": 1}) == {"ok": True}  # the function did not run: safe to repeat
        assert len(s.server.requests_to("/functions/v1/work")) == 3
        s.server.script("POST", "/functions/v1/work", limited, limited, limited)
        with pytest.raises(e.FunctionRateLimitedError) as caught:
            functions.invoke("work", {"n": 2})
        assert caught.value.retry_after == 0.0 and isinstance(caught.value, e.RateLimitedError)


def test_timeouts_are_not_retried_unless_idempotent_contract() -> None:
    def slow(_request: Any) -> Reply:
        time.sleep(0.6)
        return Reply(200, {"late": True})

    with stack() as s:
        s.server.functions["slow"] = slow
        functions = FunctionsService(s.project, s.server.mint(s.alice_id), retry=FAST, timeout=0.2)
        with pytest.raises(e.FunctionTimeoutError, match="may have run"):
            functions.invoke("slow", {})
        assert len(s.server.requests_to("/functions/v1/slow")) == 1
        assert functions.invoke("slow", {}, timeout=5) == {"late": True}  # a per-call timeout wins


def test_unreachable_gateway_is_retried_then_named() -> None:
    project = SupabaseProject(f"http://127.0.0.1:{free_port()}", "anon", jwt_secret=SECRET)
    try:
        started = time.monotonic()
        with pytest.raises(e.FunctionUnavailableError, match="cannot reach Edge Functions"):
            FunctionsService(project, "not-a-jwt", retry=FAST).invoke("x", {})
        assert time.monotonic() - started < 5
    finally:
        project.close()


def test_expired_tokens_refresh_once_or_say_so_contract() -> None:
    with stack() as s:
        calls: list[str | None] = []

        def guarded(request: RecordedRequest) -> Reply:
            calls.append(request.bearer)
            if len(calls) == 1:
                return Reply(401, {"msg": "JWT expired"})  # the function's own check, e.g. PostgREST said so
            return Reply(200, {"ok": True})

        s.server.functions["guarded"] = guarded
        auth = AuthService(s.project)
        auth.sign_in(*ALICE)
        assert FunctionsService(s.project, auth).invoke("guarded", {}) == {"ok": True}
        assert len(calls) == 2 and s.server.requests_to("/auth/v1/token")[-1].query == "grant_type=refresh_token"

        stale = s.server.mint(s.alice_id, ttl=-5)
        with pytest.raises(e.SessionExpiredError, match="client must refresh"):
            FunctionsService(s.project, stale).invoke("guarded", {})

        s.server.functions["never"] = lambda _r: Reply(401, {"msg": "JWT expired"})
        with pytest.raises(e.SessionExpiredError, match="refused again after one refresh"):
            FunctionsService(s.project, auth).invoke("never", {})


def test_async_functions_contract() -> None:
    async def scenario() -> None:
        with stack() as s:
            s.server.functions["whoami"] = lambda r: Reply(200, {"bearer": r.bearer})
            ta, tb = s.server.mint(s.alice_id), s.server.mint(s.bob_id)
            fa, fb = AsyncFunctionsService(s.project, ta, retry=FAST), AsyncFunctionsService(s.project, tb, retry=FAST)
            results = await asyncio.gather(*(f.invoke("whoami") for f in (fa, fb, fa, fb)))
            assert [r["bearer"] for r in results] == [ta, tb, ta, tb]
            limited = Reply(429, {}, headers={"sb-error-code": "RATE_LIMIT_EXCEEDED", "retry-after": "0"})
            s.server.script("POST", "/functions/v1/whoami", limited)
            assert (await fa.invoke("whoami"))["bearer"] == ta
            with pytest.raises(e.FunctionNotFoundError):
                await fb.invoke("missing")
            await s.project.aclose()

    asyncio.run(scenario())


def test_the_service_role_key_is_refused_as_a_users_token() -> None:
    with stack() as s:
        s.server.functions["whoami"] = lambda r: Reply(200, {"bearer": r.bearer})
        for token in (s.server.service_role_key, "sb_secret_abcdef"):
            with pytest.raises(e.ServiceRoleKeyRefusedError, match="with_service_role"):
                FunctionsService(s.project, token).invoke("whoami")
        assert s.server.requests_to("/functions/v1/") == []
        server_side = FunctionsService.with_service_role(s.project)
        assert server_side.invoke("whoami")["bearer"] == s.server.service_role_key
