"""StorageService and AsyncStorageService against the Storage API's documented contract (``*_contract``).

storage3 talks, unchanged, to the loopback stand-in replaying Storage's recorded responses: HTTP 400 with the
meaningful status as a string in ``statusCode``, with and without the newer ``code`` field (and with the code in
``error``), non-JSON bodies from proxies, 429 and 5xx. Objects are visible to their owner only (the usual policy),
so the isolation tests exercise what RLS does on ``storage.objects``; what they prove about pgferry is that every
request carries its own user's token and nothing else (no cookie, no other user's header).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import jwt
import pytest

from pgferry.errors import ConfigError
from pgferry.supabase import errors as e
from pgferry.supabase.auth import AuthService
from pgferry.supabase.project import SupabaseProject
from pgferry.supabase.storage import AsyncStorageService, StorageService
from pgferry.supabase.tokens import StaticToken
from pgferry.testing.supabase_contract import Reply, storage_error_body
from tests.supabase_helpers import ALICE, BOB, SECRET, stack


def test_upload_download_list_remove_as_the_user_contract() -> None:
    with stack() as s:
        auth = AuthService(s.project)
        session = auth.sign_in(*ALICE)
        storage = StorageService(s.project, auth)
        stored = storage.upload(
            "artifacts", "runs/1/report.json", b'{"ok": true}', content_type="application/json", cache_control=60
        )
        assert stored.key == "artifacts/runs/1/report.json"
        upload = s.server.requests_to("/storage/v1/object/artifacts/runs/1/report.json")[0]
        assert upload.method == "POST" and upload.bearer == session.access_token
        assert upload.headers["apikey"] == s.server.anon_key and upload.headers.get("x-upsert") == "false"
        assert b'name="file"' in upload.body and b"application/json" in upload.body
        assert storage.download("artifacts", "runs/1/report.json") == b'{"ok": true}'
        (entry,) = storage.list("artifacts", "runs/1")
        assert (entry.name, entry.size, entry.content_type) == ("report.json", 12, "application/json")
        with pytest.raises(e.ObjectExistsError, match="upsert=True"):
            storage.upload("artifacts", "runs/1/report.json", b"{}")
        storage.upload("artifacts", "runs/1/report.json", b"{}", upsert=True)
        assert storage.download("artifacts", "runs/1/report.json") == b"{}"
        assert storage.remove("artifacts", ["runs/1/report.json", "runs/1/missing"]) == ["runs/1/report.json"]
        with pytest.raises(e.ObjectNotFoundError, match="NoSuchKey"):
            storage.download("artifacts", "runs/1/report.json")


def test_signed_urls_create_and_use_contract() -> None:
    with stack() as s:
        token = s.server.mint(s.alice_id)
        s.server._sessions.add("x")
        storage = StorageService(s.project, token)
        storage.upload("artifacts", "a.txt", b"alpha", content_type="text/plain")
        url = storage.create_signed_url("artifacts", "a.txt", 60)
        assert url.startswith(f"{s.project.storage_url}/object/sign/artifacts/a.txt?token=")
        assert storage.fetch_signed_url(url) == b"alpha"
        fetch = s.server.requests[-1]
        assert "authorization" not in fetch.headers and "apikey" not in fetch.headers  # the URL alone authorizes
        items = storage.create_signed_urls("artifacts", ["a.txt", "hidden.txt"], 60)
        assert [(i.path, i.url is not None, i.error is None) for i in items] == [
            ("a.txt", True, True),
            ("hidden.txt", False, False),
        ]
        with pytest.raises(e.InvalidObjectKeyError, match="outside this project's Storage"):
            storage.fetch_signed_url("https://evil.example/storage/v1/object/sign/artifacts/a.txt?token=x")
        expired = (
            url.split("token=")[0]
            + "token="
            + jwt.encode(
                {"url": "artifacts/a.txt", "exp": int(time.time()) - 5}, s.server._storage_secret, algorithm="HS256"
            )
        )
        with pytest.raises(e.StorageAccessDeniedError, match="jwt expired"):
            storage.fetch_signed_url(expired)


def test_signed_upload_url_contract() -> None:
    with stack() as s:
        storage = StorageService(s.project, s.server.mint(s.alice_id))
        upload = storage.create_signed_upload_url("artifacts", "incoming/blob.bin")
        assert upload.token and upload.token not in repr(upload)
        stored = storage.upload_to_signed_url(upload, b"\x00\x01", content_type="application/octet-stream")
        assert stored.key == "artifacts/incoming/blob.bin"
        assert storage.download("artifacts", "incoming/blob.bin") == b"\x00\x01"


def test_one_users_token_never_reaches_another_users_objects_contract() -> None:
    with stack() as s:
        alice, bob = AuthService(s.project), AuthService(s.project)
        a, b = alice.sign_in(*ALICE), bob.sign_in(*BOB)
        alice_files, bob_files = StorageService(s.project, alice), StorageService(s.project, bob)
        # A response that tries to plant a cookie (on the shared HTTP client) must not ride along on later requests.
        s.server.script(
            "POST", "/storage/v1/object/list/artifacts", Reply(200, [], headers={"set-cookie": "sb=a; Path=/"})
        )
        calls: list[tuple[str, str]] = []

        def as_(who: str, token: str, action: Any) -> Any:
            before = len(s.server.requests)
            try:
                return action()
            finally:
                calls.extend((token, r.bearer or "") for r in s.server.requests[before:])

        as_("alice", a.access_token, lambda: alice_files.list("artifacts"))
        as_("alice", a.access_token, lambda: alice_files.upload("artifacts", "alice/secret.txt", b"alice's"))
        as_("bob", b.access_token, lambda: bob_files.upload("artifacts", "bob/note.txt", b"bob's"))
        with pytest.raises(e.ObjectNotFoundError):
            as_("bob", b.access_token, lambda: bob_files.download("artifacts", "alice/secret.txt"))
        assert as_("bob", b.access_token, lambda: bob_files.list("artifacts", "alice")) == []
        assert as_("bob", b.access_token, lambda: bob_files.remove("artifacts", ["alice/secret.txt"])) == []
        assert not as_(
            "bob", b.access_token, lambda: bob_files.create_signed_urls("artifacts", ["alice/secret.txt"], 60)
        )[0].url
        assert as_("alice", a.access_token, lambda: alice_files.download("artifacts", "alice/secret.txt")) == b"alice's"
        assert calls and all(expected == sent for expected, sent in calls)
        assert all("cookie" not in r.headers for r in s.server.requests)


def test_the_service_role_key_is_refused_on_user_paths() -> None:
    with stack() as s:
        for token in (
            s.server.service_role_key,
            "sb_secret_abcdef",
            jwt.encode({"role": "service_role", "iss": "supabase"}, SECRET, algorithm="HS256"),
        ):
            with pytest.raises(e.ServiceRoleKeyRefusedError, match="with_service_role"):
                StorageService(s.project, token).download("artifacts", "x")
        assert s.server.requests_to("/storage/v1/") == []  # refused before anything was sent
        with pytest.raises(ConfigError, match="SUPABASE_ANON_KEY"):
            SupabaseProject(s.server.url, "sb_secret_oops", jwt_secret=SECRET)
        unconfigured = SupabaseProject(s.server.url, s.server.anon_key, jwt_secret=SECRET)
        with pytest.raises(ConfigError, match="SUPABASE_SERVICE_ROLE_KEY"):
            StorageService.with_service_role(unconfigured)
        unconfigured.close()


def test_bucket_checks_and_server_side_bucket_creation_contract() -> None:
    with stack() as s:
        user = StorageService(s.project, s.server.mint(s.alice_id))
        assert user.get_bucket("artifacts").name == "artifacts"
        assert user.bucket_exists("artifacts") and not user.bucket_exists("nope")
        with pytest.raises(e.BucketNotFoundError, match="NoSuchBucket"):
            user.upload("nope", "a.txt", b"x")
        with pytest.raises(e.StorageAccessDeniedError, match="with_service_role"):
            user.ensure_bucket("new")
        admin = StorageService.with_service_role(s.project)
        info = admin.ensure_bucket("new", public=False)
        assert info.name == "new" and "new" in s.server.buckets
        assert admin.ensure_bucket("new").name == "new"
        create = next(r for r in s.server.requests if r.path == "/storage/v1/bucket")
        assert create.headers["apikey"] == s.server.service_role_key


# Recorded Storage errors (src/internal/errors/codes.ts): (status, legacy error, message, code, class).
RECORDED = [
    (404, "not_found", "Object not found", "NoSuchKey", e.ObjectNotFoundError),
    (404, "Bucket not found", "Bucket not found", "NoSuchBucket", e.BucketNotFoundError),
    (409, "Duplicate", "The resource already exists", "KeyAlreadyExists", e.ObjectExistsError),
    (403, "Unauthorized", "new row violates row-level security policy", "AccessDenied", e.StorageAccessDeniedError),
    (
        413,
        "Payload too large",
        "The object exceeded the maximum allowed size",
        "EntityTooLarge",
        e.PayloadTooLargeError,
    ),
    (415, "invalid_mime_type", "mime type image/x is not supported", "InvalidMimeType", e.UnsupportedMediaTypeError),
    (400, "Invalid Input", "Bucket name invalid", "InvalidBucketName", e.InvalidObjectKeyError),
    (400, "InvalidKey", "Invalid key: a//b", "InvalidKey", e.InvalidObjectKeyError),
    (429, "SlowDown", "Please reduce your request rate", "SlowDown", e.StorageRateLimitedError),
    (544, "DatabaseTimeout", "The connection to the database timed out", "DatabaseTimeout", e.StorageUnavailableError),
    (500, "Internal", "Internal Server Error", "InternalError", e.StorageUnavailableError),
]


@pytest.mark.parametrize("variant", ["code", "legacy", "error-is-code"])
@pytest.mark.parametrize(("status", "legacy", "message", "code", "expected"), RECORDED)
def test_storage_errors_in_every_body_variant_contract(
    status: int, legacy: str, message: str, code: str, expected: type[e.StorageServiceError], variant: str
) -> None:
    """``code``: bodies since storage e845f998; ``legacy``: before (no ``code``); ``error-is-code``: servers whose
    ``render()`` puts the code in ``error`` too."""
    body = {
        "code": storage_error_body(status, legacy, message, code),
        "legacy": storage_error_body(status, legacy, message, None),
        "error-is-code": storage_error_body(status, code, message, code),
    }[variant]
    http = 500 if status == 500 else 400
    with stack() as s:
        s.server.script("GET", "/storage/v1/object/artifacts/x.txt", Reply(http, body))
        with pytest.raises(expected) as caught:
            StorageService(s.project, s.server.mint(s.alice_id)).download("artifacts", "x.txt")
    error = caught.value
    assert type(error) is expected and error.status == status and error.http_status == http
    assert "\n" not in str(error) and "download of artifacts/x.txt failed" in str(error)


@pytest.mark.parametrize(
    ("http", "body", "headers", "expected"),
    [
        (502, b"<html><body>502 Bad Gateway</body></html>", {"content-type": "text/html"}, e.StorageUnavailableError),
        (504, b"", {}, e.StorageUnavailableError),
        (400, b"upstream said no", {"content-type": "text/plain"}, e.StorageServiceError),
        (429, b"Too Many Requests", {"retry-after": "3"}, e.StorageRateLimitedError),
    ],
)
def test_non_json_error_bodies_contract(
    http: int, body: bytes, headers: dict[str, str], expected: type[Exception]
) -> None:
    with stack() as s:
        s.server.script("GET", "/storage/v1/object/artifacts/x.txt", Reply(http, body=body, headers=headers))
        with pytest.raises(expected) as caught:
            StorageService(s.project, s.server.mint(s.alice_id)).download("artifacts", "x.txt")
    assert type(caught.value) is expected and "non-JSON" in str(caught.value)


def test_expired_tokens_refresh_once_or_say_so_contract() -> None:
    with stack() as s:
        stale = s.server.mint(s.alice_id, ttl=-30)
        with pytest.raises(e.SessionExpiredError, match="client must refresh its session"):
            StorageService(s.project, StaticToken(f"Bearer {stale}")).download("artifacts", "x")
        assert s.server.requests_to("/storage/v1/") == []  # no request with a token known to be expired

        auth = AuthService(s.project)
        auth.sign_in(*ALICE)
        storage = StorageService(s.project, auth)
        storage.upload("artifacts", "r.txt", b"r")
        expired = Reply(400, storage_error_body(403, "Unauthorized", "jwt expired", "AccessDenied"))
        s.server.script("GET", "/storage/v1/object/artifacts/r.txt", expired)
        assert storage.download("artifacts", "r.txt") == b"r"  # refreshed once, retried
        assert s.server.requests[-2].path == "/auth/v1/token" and "refresh_token" in s.server.requests[-2].query
        s.server.script("GET", "/storage/v1/object/artifacts/r.txt", expired, expired)
        with pytest.raises(e.SessionExpiredError, match="refused again after one refresh"):
            storage.download("artifacts", "r.txt")


def test_timeouts_and_bad_paths() -> None:
    def slow(_request: Any) -> Reply:
        time.sleep(1.5)
        return Reply(200, body=b"late")

    with stack() as s:
        s.server.script("GET", "/storage/v1/object/artifacts/slow.txt", slow)
        storage = StorageService(s.project, s.server.mint(s.alice_id), timeout=0.3)
        with pytest.raises(e.StorageUnavailableError, match="did not answer in time"):
            storage.download("artifacts", "slow.txt")
        for bad in ("../etc/passwd", "/abs", "a//b", ""):
            with pytest.raises(e.InvalidObjectKeyError):
                storage.download("artifacts", bad)


def test_async_storage_contract() -> None:
    async def scenario() -> None:
        with stack() as s:
            alice = AsyncStorageService(s.project, s.server.mint(s.alice_id))
            bob = AsyncStorageService(s.project, s.server.mint(s.bob_id))
            await alice.upload("artifacts", "a/x.bin", b"\x01", content_type="application/octet-stream")
            results = await asyncio.gather(alice.download("artifacts", "a/x.bin"), bob.list("artifacts", "a"))
            assert results == [b"\x01", []]
            with pytest.raises(e.ObjectNotFoundError):
                await bob.download("artifacts", "a/x.bin")
            url = await alice.create_signed_url("artifacts", "a/x.bin", 30)
            assert await bob.fetch_signed_url(url) == b"\x01"  # a signed URL works for whoever holds it
            assert await alice.remove("artifacts", ["a/x.bin"]) == ["a/x.bin"]
            assert await alice.bucket_exists("artifacts")
            upload = await alice.create_signed_upload_url("artifacts", "a/up.bin")
            assert (await alice.upload_to_signed_url(upload, b"\x02")).key == "artifacts/a/up.bin"
            with pytest.raises(e.StorageAccessDeniedError, match="with_service_role"):
                await alice.ensure_bucket("more")
            assert (await AsyncStorageService.with_service_role(s.project).ensure_bucket("more")).name == "more"
            await s.project.aclose()

    asyncio.run(scenario())
