"""AuthService and AsyncAuthService against GoTrue's documented contract (``*_contract``), and what runs for real.

Contract tests: supabase-py's auth client talks, unchanged, to the loopback stand-in replaying GoTrue's recorded
responses (routes, bodies, error shapes in both API versions, the echoed ``X-Supabase-Api-Version``). Real: the
tokens are signed with real keys (HS256 secret, or ES256 keys in a JWKS that rotates) and verified for real by
``pgferry.sync.auth``; error classes are checked for pickling and one-line messages.
"""

from __future__ import annotations

import asyncio
import pickle
import time
import uuid
from typing import Any

import pytest

from pgferry.supabase import errors as e
from pgferry.supabase.auth import AsyncAuthService, AuthService
from pgferry.supabase.project import SupabaseProject
from pgferry.testing.asgi import free_port
from pgferry.testing.supabase_contract import Reply, gotrue_error
from tests.supabase_helpers import ALICE, BOB, SECRET, stack


def test_sign_in_returns_a_verified_session_and_sends_only_the_anon_key_contract() -> None:
    with stack() as s:
        auth = AuthService(s.project)
        session = auth.sign_in(*ALICE)
        assert str(session.user_id) == s.alice_id == str(session.user.id)
        assert session.verified.claims["role"] == "authenticated"
        assert session.access_token not in repr(session) and session.refresh_token not in repr(session)
        (request,) = s.server.requests_to("/auth/v1/token")
        assert request.query == "grant_type=password"
        assert request.headers["apikey"] == s.server.anon_key
        assert request.headers["x-supabase-api-version"] == "2024-01-01"
        assert s.server.service_role_key not in str(request.headers)
        assert auth.get_current_user().email == ALICE[0]
        assert s.server.requests_to("/auth/v1/user")[-1].bearer == session.access_token


def test_jwks_verification_follows_key_rotation_contract() -> None:
    with stack(asymmetric=True) as s:
        auth = AuthService(s.project)
        first = auth.sign_in(*ALICE)
        s.server.rotate_key()
        second = auth.refresh()
        assert second.access_token != first.access_token
        kids = [s.server.mint(s.alice_id).split(".")[0], first.access_token.split(".")[0]]
        assert kids[0] != kids[1]  # the new token really names another key
        assert len(s.server.requests_to("/auth/v1/.well-known/jwks.json")) == 2  # fetched again for the new kid


def test_a_session_that_fails_verification_is_discarded_contract() -> None:
    with stack() as s:
        wrong = SupabaseProject(s.server.url, s.server.anon_key, jwt_secret="another-projects-secret-0123456789")
        try:
            auth = AuthService(wrong)
            events: list[str] = []
            auth.on_auth_state_change(lambda event, _session: events.append(event))
            with pytest.raises(e.UntrustedTokenError, match="SUPABASE_JWT_SECRET"):
                auth.sign_in(*ALICE)
            assert auth.session is None and events == []
            assert s.server.requests_to("/auth/v1/logout")  # the untrusted session was revoked too
        finally:
            wrong.close()


def test_state_change_events_carry_verified_sessions_in_order_contract() -> None:
    with stack() as s:
        auth = AuthService(s.project)
        seen: list[tuple[str, Any]] = []
        unsubscribe = auth.on_auth_state_change(lambda event, session: seen.append((event, session)))
        signed_in = auth.sign_in(*ALICE)
        refreshed = auth.refresh()
        auth.sign_out()
        assert [event for event, _ in seen] == ["SIGNED_IN", "TOKEN_REFRESHED", "SIGNED_OUT"]
        assert seen[0][1] == signed_in and seen[1][1] == refreshed and seen[2][1] is None
        unsubscribe()
        auth.sign_in(*ALICE)
        assert len(seen) == 3


def test_sign_out_revokes_and_forgets_the_session_contract() -> None:
    with stack() as s:
        auth = AuthService(s.project)
        session = auth.sign_in(*ALICE)
        auth.sign_out()
        (logout,) = s.server.requests_to("/auth/v1/logout")
        assert logout.bearer == session.access_token and logout.query == "scope=global"
        assert auth.session is None
        with pytest.raises(e.NotSignedInError, match="sign_in"):
            auth.get_current_user()
        auth.sign_out()  # signing out twice is harmless


def test_sign_up_with_and_without_confirmation_contract() -> None:
    with stack() as s:
        result = AuthService(s.project).sign_up("carol@example.com", "carol-password", data={"team": "ml"})
        assert result.session is not None and not result.confirmation_required
        assert result.user.user_metadata["team"] == "ml"
        with pytest.raises(e.UserAlreadyExistsError, match="sign in instead"):
            AuthService(s.project).sign_up("carol@example.com", "carol-password")
    with stack(autoconfirm=False) as s:
        result = AuthService(s.project).sign_up("dave@example.com", "dave-password")
        assert result.confirmation_required and not result.user.confirmed
        with pytest.raises(e.EmailNotConfirmedError, match="confirmation email"):
            AuthService(s.project).sign_in("dave@example.com", "dave-password")


def test_weak_password_carries_its_reasons_contract() -> None:
    with stack() as s, pytest.raises(e.WeakPasswordError) as caught:
        AuthService(s.project).sign_up("erin@example.com", "short")
    assert caught.value.reasons == ("length",) and caught.value.status == 422
    assert "(length)" in str(caught.value) and "\n" not in str(caught.value)


# Recorded GoTrue errors (internal/api/apierrors/errorcode.go and their call sites) and the class each becomes.
RECORDED_ERRORS = [
    ("invalid_credentials", 400, "Invalid login credentials", e.InvalidCredentialsError),
    ("email_not_confirmed", 400, "Email not confirmed", e.EmailNotConfirmedError),
    ("user_banned", 400, "User is banned", e.UserBannedError),
    ("signup_disabled", 422, "Signups not allowed for this instance", e.SignupDisabledError),
    ("email_provider_disabled", 422, "Email logins are disabled", e.SignupDisabledError),
    ("over_request_rate_limit", 429, "Request rate limit reached", e.AuthRateLimitedError),
    ("over_email_send_rate_limit", 429, "email rate limit exceeded", e.AuthRateLimitedError),
    ("validation_failed", 400, "missing email or phone", e.ValidationFailedError),
    (
        "unexpected_failure",
        500,
        "Unexpected failure, please check server logs for more information",
        e.AuthUnavailableError,
    ),
    ("some_future_code", 400, "Something new", e.AuthServiceError),
]


@pytest.mark.parametrize("api", ["2024-01-01", "legacy", "header-dropped"])
@pytest.mark.parametrize(("code", "status", "message", "expected"), RECORDED_ERRORS)
def test_every_gotrue_error_becomes_a_named_exception_contract(
    code: str, status: int, message: str, expected: type[e.AuthServiceError], api: str
) -> None:
    """All three body shapes give the same class: the new one, the legacy one (older GoTrue ignoring the version
    header) and the new one whose echoed header a proxy dropped (supabase-py then reports ``code=None``)."""

    def legacy(request: Any) -> Reply:
        return gotrue_error(code, status, message)(type(request)(**{**request.__dict__, "headers": {}}))

    responder = {
        "2024-01-01": gotrue_error(code, status, message),
        "legacy": legacy,
        "header-dropped": gotrue_error(code, status, message, echo_version=False),
    }[api]
    headers = {"retry-after": "7"} if status == 429 else {}
    with stack() as s:
        s.server.script("POST", "/auth/v1/token", lambda request: _with_headers(responder(request), headers))
        with pytest.raises(expected) as caught:
            AuthService(s.project).sign_in(*ALICE)
    error = caught.value
    assert type(error) is expected
    assert error.status == status and error.code == code
    assert "\n" not in str(error) and code in str(error)
    if status == 429:
        assert error.retry_after == 7.0 and isinstance(error, e.RateLimitedError)


def _with_headers(reply: Reply, headers: dict[str, str]) -> Reply:
    return Reply(reply.status, reply.json, reply.body, {**reply.headers, **headers})


def test_oauth_style_and_malformed_bodies_contract() -> None:
    with stack() as s:
        auth = AuthService(s.project)
        auth.sign_in(*ALICE)
        s.server.script(
            "POST",
            "/auth/v1/token",
            Reply(
                400, {"error": "invalid_grant", "error_description": "Invalid Refresh Token: Refresh Token Not Found"}
            ),
        )
        with pytest.raises(e.SessionExpiredError, match="sign in again"):
            auth.refresh()
        s.server.script("POST", "/auth/v1/token", Reply(502, body=b"<html>Bad Gateway</html>"))
        with pytest.raises(e.AuthUnavailableError, match="retry later"):
            AuthService(s.project).sign_in(*ALICE)
        s.server.script("POST", "/auth/v1/token", Reply(200, body=b"<html>captive portal</html>"))
        with pytest.raises(e.AuthUnavailableError, match="not a GoTrue response"):
            AuthService(s.project).sign_in(*ALICE)


def test_refresh_token_errors_say_sign_in_again_contract() -> None:
    with stack() as s:
        auth = AuthService(s.project)
        first = auth.sign_in(*ALICE)
        other = AuthService(s.project)
        other.sign_in(*ALICE)
        auth.refresh()
        # replaying the first refresh token, as a second client holding a stale copy would:
        s.server.script(
            "POST",
            "/auth/v1/token",
            gotrue_error("refresh_token_already_used", 400, "Invalid Refresh Token: Already Used"),
        )
        with pytest.raises(e.SessionExpiredError) as caught:
            auth.refresh()
        assert caught.value.code == "refresh_token_already_used" and first.refresh_token not in str(caught.value)
        assert auth.session is None
        # a session revoked elsewhere (sign-out everywhere from another device): the real server answers this
        other_device = AuthService(s.project)
        other_device.sign_in(*ALICE)
        other.sign_out(scope="global")
        s.server._sessions.clear()
        with pytest.raises(e.SessionExpiredError, match="No Valid Session") as caught:
            other_device.refresh()
        assert caught.value.code == "session_not_found"


def test_a_refused_token_is_refreshed_once_and_the_call_retried_contract() -> None:
    with stack() as s:
        auth = AuthService(s.project)
        first = auth.sign_in(*ALICE)
        s.server.script("GET", "/auth/v1/user", gotrue_error("bad_jwt", 403, "invalid JWT: token is expired"))
        assert auth.get_current_user().email == ALICE[0]
        calls = [(r.path, r.query) for r in s.server.requests if r.path != "/auth/v1/token" or "refresh" in r.query]
        assert calls == [
            ("/auth/v1/user", ""),
            ("/auth/v1/token", "grant_type=refresh_token"),
            ("/auth/v1/user", ""),
        ]
        assert s.server.requests_to("/auth/v1/user")[0].bearer == first.access_token
        s.server.script(
            "GET",
            "/auth/v1/user",
            gotrue_error("bad_jwt", 403, "invalid JWT"),
            gotrue_error("bad_jwt", 403, "invalid JWT"),
        )
        with pytest.raises(e.SessionExpiredError, match="refused again after one refresh"):
            auth.get_current_user()


def test_an_expiring_session_is_refreshed_before_use_contract() -> None:
    with stack(access_ttl=5) as s:  # inside supabase-py's 10 s margin from the start
        auth = AuthService(s.project)
        first = auth.sign_in(*ALICE)
        auth.access_token()
        assert s.server.requests_to("/auth/v1/token")[-1].query == "grant_type=refresh_token"
        assert auth.session is not None and auth.session.refresh_token != first.refresh_token


def test_unreachable_auth_says_what_to_check_contract() -> None:
    project = SupabaseProject(f"http://127.0.0.1:{free_port()}", "anon", jwt_secret=SECRET)
    try:
        with pytest.raises(e.AuthUnavailableError, match=r"cannot reach Supabase Auth .* check SUPABASE_URL"):
            AuthService(project).sign_in(*ALICE)
    finally:
        project.close()


def test_two_users_sessions_never_mix_contract() -> None:
    with stack() as s:
        alice, bob = AuthService(s.project), AuthService(s.project)
        a, b = alice.sign_in(*ALICE), bob.sign_in(*BOB)
        assert alice.get_current_user().email == ALICE[0] and bob.get_current_user().email == BOB[0]
        bearers = [r.bearer for r in s.server.requests_to("/auth/v1/user")]
        assert bearers == [a.access_token, b.access_token]


def test_async_service_contract() -> None:
    async def scenario() -> None:
        with stack(asymmetric=True) as s:
            auth = AsyncAuthService(s.project)
            events: list[str] = []
            auth.on_auth_state_change(lambda event, _session: events.append(event))
            session = await auth.sign_in(*ALICE)
            assert str(session.user_id) == s.alice_id
            assert (await auth.get_current_user()).email == ALICE[0]
            refreshed = await auth.refresh()
            assert refreshed.access_token != session.access_token
            s.server.script("GET", "/auth/v1/user", gotrue_error("bad_jwt", 403, "invalid JWT"))
            assert (await auth.get_current_user()).id == session.user.id
            with pytest.raises(e.InvalidCredentialsError):
                await AsyncAuthService(s.project).sign_in(ALICE[0], "wrong")
            s.server.script(
                "POST", "/auth/v1/token", gotrue_error("over_request_rate_limit", 429, "Request rate limit reached")
            )
            with pytest.raises(e.AuthRateLimitedError):
                await AsyncAuthService(s.project).sign_in(*ALICE)
            await auth.sign_out()
            assert events == ["SIGNED_IN", "TOKEN_REFRESHED", "TOKEN_REFRESHED", "SIGNED_OUT"]
            await s.project.aclose()

    asyncio.run(scenario())


def test_errors_pickle_with_their_fields() -> None:
    samples = [
        e.WeakPasswordError("weak (x)", reasons=["length"], status=422, code="weak_password"),
        e.AuthRateLimitedError("slow down", status=429, code="over_request_rate_limit", retry_after=3.0),
        e.ObjectNotFoundError("gone", status=404, http_status=400, code="NoSuchKey"),
        e.FunctionHttpError("bad", function="search-tasks", status=400, body={"error": "x"}),
        e.SessionExpiredError("sign in again", status=401, code="token_expired"),
    ]
    for error in samples:
        copy = pickle.loads(pickle.dumps(error))  # noqa: S301 (our own bytes)
        assert type(copy) is type(error) and str(copy) == str(error) and copy.__dict__ == error.__dict__


def test_messages_never_carry_tokens() -> None:
    token = AuthService.__name__ and _hs256({"sub": str(uuid.uuid4()), "exp": int(time.time()) + 60})
    error = e.AuthServiceError(f"refused ({e.server_text('token ' + token + ' was bad')})")
    assert token not in str(error) and "<jwt redacted>" in str(error)


def _hs256(claims: dict[str, Any]) -> str:
    import jwt

    return jwt.encode(claims, SECRET, algorithm="HS256")
