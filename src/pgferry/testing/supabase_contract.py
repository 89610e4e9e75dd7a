"""A loopback stand-in for Supabase Auth (GoTrue), Storage and the Edge Functions gateway, for ``*_contract`` tests.

GoTrue, the Storage API and the functions runtime cannot run on these machines. This ASGI app answers on their
documented routes with the documented responses, recorded from the sources (paths relative to each repository;
see ``../shared/facts/supabase-services.md``):

* **Auth** (``supabase/auth``): ``POST /auth/v1/signup``, ``POST /auth/v1/token?grant_type=password|refresh_token``
  (``internal/api/token.go``, ``token_refresh.go``; body ``AccessTokenResponse`` of ``internal/tokens/service.go``),
  ``GET /auth/v1/user``, ``POST /auth/v1/logout`` (204), ``GET /auth/v1/.well-known/jwks.json``. Access tokens carry
  GoTrue's claims (``GenerateAccessToken``) and are signed for real, HS256 with a secret or ES256 with a rotating
  JWKS, so the client side verifies them for real. Errors (``internal/api/errors.go``): with a request header
  ``X-Supabase-Api-Version`` ≥ 2024-01-01 the body is ``{"code": "<code>", "message": …}`` and the response echoes
  the header; without it the legacy ``{"code": <status>, "error_code": "<code>", "msg": …}``; ``x-sb-error-code``
  always.
* **Storage** (``supabase/storage``, ``src/http/routes/object/*``, ``src/internal/errors/codes.ts``): upload
  (multipart, ``x-upsert``), download, signed URLs (one and many, and their use), signed upload URLs, list, remove,
  buckets. Errors are HTTP 400 (500 for 500s) with the meaningful status as a string in ``statusCode``, in the legacy
  variant ``{"statusCode", "error", "message"}`` or the newer one with ``code`` (storage commit e845f998). Objects
  are visible to their owner only (the usual ``owner = auth.uid()`` policy); hidden objects are "not found", as
  with RLS.
* **Functions** (``/functions/v1/<name>``): Python handlers stand in for deployed functions; an unknown name is a
  404 with ``sb-error-code: NOT_FOUND`` (docs ``functions/error-codes.mdx``).

Any request can instead get a *scripted* response (:meth:`ContractServer.script`): a recorded error body, a rate
limit, a non-JSON body from a proxy, a relay error. Every request is recorded (:attr:`ContractServer.requests`)
with its headers, so tests can check which token each call carried.

Test tooling only: never imported by library code.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from pgferry.testing.asgi import ServedApp, free_port

__all__ = ["ContractServer", "RecordedRequest", "Reply", "gotrue_error", "storage_error_body"]

API_VERSION = "2024-01-01"


@dataclass(frozen=True)
class Reply:
    """A recorded response: status, headers, and a JSON body (``json``) or raw bytes (``body``)."""

    status: int
    json: Any = None
    body: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    def response(self) -> Response:
        headers = dict(self.headers)
        if self.body is not None:
            return Response(self.body, status_code=self.status, headers=headers)
        if self.json is None and self.status == 204:
            return Response(status_code=204, headers=headers)
        headers.setdefault("content-type", "application/json")
        return Response(json.dumps(self.json).encode(), status_code=self.status, headers=headers)


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    query: str
    headers: Mapping[str, str]
    body: bytes

    @property
    def bearer(self) -> str | None:
        value = self.headers.get("authorization", "")
        return value[7:] if value.lower().startswith("bearer ") else None


Responder = Callable[[RecordedRequest], Reply]


def gotrue_error(code: str, status: int, message: str, *, echo_version: bool = True, **extra: Any) -> Responder:
    """A GoTrue error as GoTrue renders it for *this* request (``HTTPError.MarshalJSON`` and the API-version
    middleware): new-style when the request asked for 2024-01-01, legacy otherwise. ``echo_version=False`` records
    a new-style body whose echoed header a proxy dropped (supabase-py then reports ``code=None``)."""

    def respond(request: RecordedRequest) -> Reply:
        headers = {"x-sb-error-code": code}
        if request.headers.get("x-supabase-api-version", "") >= API_VERSION:
            if echo_version:
                headers["X-Supabase-Api-Version"] = API_VERSION
            return Reply(status, {"code": code, "message": message, **extra}, headers=headers)
        body: dict[str, Any] = {"code": status, "error_code": code, "msg": message, **extra}
        if status >= 500:
            body["error_id"] = str(uuid.uuid4())
        return Reply(status, body, headers=headers)

    return respond


def storage_error_body(status: int, error: str, message: str, code: str | None) -> dict[str, Any]:
    """Storage's error body: ``statusCode`` is a string; ``code`` only in the newer variant."""
    body: dict[str, Any] = {"statusCode": str(status), "error": error, "message": message}
    if code is not None:
        body["code"] = code
    return body


@dataclass
class _User:
    id: str
    email: str
    password: str
    confirmed: bool
    created_at: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def json(self) -> dict[str, Any]:
        confirmed_at = self.created_at if self.confirmed else None
        body: dict[str, Any] = {
            "id": self.id,
            "aud": "authenticated",
            "role": "authenticated",
            "email": self.email,
            "phone": "",
            "app_metadata": {"provider": "email", "providers": ["email"]},
            "user_metadata": self.metadata,
            "identities": [],
            "created_at": self.created_at,
            "updated_at": self.created_at,
            "is_anonymous": False,
        }
        if confirmed_at:
            body["email_confirmed_at"] = confirmed_at
            body["confirmed_at"] = confirmed_at
        else:
            body["confirmation_sent_at"] = self.created_at
        return body


@dataclass
class _Object:
    data: bytes
    content_type: str
    owner: str | None
    id: str
    updated_at: str


def _now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class ContractServer:
    """The stand-in. ``jwt_secret`` signs access tokens with HS256; without it tokens are ES256 from a JWKS whose
    active key :meth:`rotate_key` replaces. ``storage_variant`` picks Storage's error body variant (``"code"`` or
    ``"legacy"``). ``autoconfirm`` decides whether sign-up returns a session."""

    def __init__(
        self,
        *,
        jwt_secret: str | None = None,
        anon_key: str = "anon-key-for-tests",
        service_role_key: str = "service-role-key-for-tests",
        storage_variant: str = "code",
        autoconfirm: bool = True,
        access_ttl: int = 3600,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.jwt_secret = jwt_secret
        self.anon_key = anon_key
        self.service_role_key = service_role_key
        self.storage_variant = storage_variant
        self.autoconfirm = autoconfirm
        self.access_ttl = access_ttl
        self.requests: list[RecordedRequest] = []
        self.functions: dict[str, Responder] = {}
        self.buckets: dict[str, dict[str, Any]] = {}
        self.objects: dict[tuple[str, str], _Object] = {}
        self._users: dict[str, _User] = {}
        self._refresh: dict[str, tuple[str, str, bool]] = {}  # token -> (user id, session id, used)
        self._sessions: set[str] = set()
        self._scripts: list[tuple[str, re.Pattern[str], deque[Responder]]] = []
        self._keys: list[tuple[str, ec.EllipticCurvePrivateKey]] = []
        self._lock = threading.Lock()
        self._storage_secret = "storage-url-signing-secret-for-tests"  # noqa: S105 (a test stand-in)
        if jwt_secret is None:
            self.rotate_key()

    # -- setup ---------------------------------------------------------------------------------------------------

    @property
    def issuer(self) -> str:
        return f"{self.url}/auth/v1"

    @property
    def jwks_url(self) -> str:
        return f"{self.url}/auth/v1/.well-known/jwks.json"

    def rotate_key(self) -> str:
        """Publish a new ES256 key and sign with it from now on (the old one stays published); returns its kid."""
        kid = str(uuid.uuid4())
        self._keys.append((kid, ec.generate_private_key(ec.SECP256R1())))
        return kid

    def add_user(self, email: str, password: str, *, confirmed: bool = True, user_id: str | None = None) -> str:
        user = _User(user_id or str(uuid.uuid4()), email, password, confirmed, _now_iso())
        self._users[email] = user
        return user.id

    def add_bucket(self, name: str, *, public: bool = False) -> None:
        self.buckets[name] = {
            "id": name,
            "name": name,
            "owner": "",
            "public": public,
            "created_at": _now_iso(),
            "updated_at": _now_iso(),
            "file_size_limit": None,
            "allowed_mime_types": None,
        }

    def script(self, method: str, path: str, *replies: Reply | Responder) -> None:
        """The next requests matching ``method`` and the ``path`` regex get these responses, in order, instead of
        the default behaviour."""
        queue: deque[Responder] = deque(r if callable(r) else _constant(r) for r in replies)
        self._scripts.append((method.upper(), re.compile(path + r"\Z"), queue))

    def mint(self, user_id: str, *, ttl: int | None = None, session_id: str | None = None, **claims: Any) -> str:
        """An access token as GoTrue issues it (``GenerateAccessToken``), signed with the current key."""
        user = next((u for u in self._users.values() if u.id == user_id), None)
        now = int(time.time())
        payload: dict[str, Any] = {
            "iss": self.issuer,
            "sub": user_id,
            "aud": "authenticated",
            "exp": now + (self.access_ttl if ttl is None else ttl),
            "iat": now,
            "email": user.email if user else "",
            "phone": "",
            "app_metadata": {"provider": "email", "providers": ["email"]},
            "user_metadata": user.metadata if user else {},
            "role": "authenticated",
            "aal": "aal1",
            "amr": [{"method": "password", "timestamp": now}],
            "session_id": session_id or str(uuid.uuid4()),
            "is_anonymous": False,
            **claims,
        }
        if self.jwt_secret is not None:
            return jwt.encode(payload, self.jwt_secret, algorithm="HS256", headers={"typ": "JWT"})
        kid, key = self._keys[-1]
        return jwt.encode(payload, key, algorithm="ES256", headers={"kid": kid, "typ": "JWT"})

    def requests_to(self, prefix: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.startswith(prefix)]

    @contextmanager
    def serve(self) -> Iterator[ContractServer]:
        with ServedApp(self, port=self.port):
            yield self

    # -- ASGI ----------------------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        request = Request(scope, receive)
        body = await request.body()
        recorded = RecordedRequest(
            method=request.method,
            path=request.url.path,
            query=request.url.query,
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
        )
        with self._lock:
            self.requests.append(recorded)
            reply = self._scripted(recorded)
        if reply is None:
            reply = self._default(recorded, request)
        await reply.response()(scope, receive, send)

    def _scripted(self, request: RecordedRequest) -> Reply | None:
        for method, pattern, queue in self._scripts:
            if queue and method == request.method and pattern.match(request.path):
                return queue.popleft()(request)
        return None

    def _default(self, request: RecordedRequest, starlette_request: Request) -> Reply:
        path = request.path
        try:
            if path.startswith("/auth/v1/"):
                return self._auth(request, path.removeprefix("/auth/v1"))
            if path.startswith("/storage/v1/"):
                return self._storage(request, path.removeprefix("/storage/v1"), starlette_request)
            if path.startswith("/functions/v1/"):
                return self._function(request, path.removeprefix("/functions/v1/"))
        except _FailError as fail:
            return fail.reply
        return Reply(404, {"message": "no Route matched with those values"})

    # -- Auth ----------------------------------------------------------------------------------------------------

    def _auth_fail(self, request: RecordedRequest, code: str, status: int, message: str, **extra: Any) -> _FailError:
        return _FailError(gotrue_error(code, status, message, **extra)(request))

    def _session(self, user: _User) -> dict[str, Any]:
        session_id = str(uuid.uuid4())
        self._sessions.add(session_id)
        return self._session_body(user, session_id)

    def _session_body(self, user: _User, session_id: str) -> dict[str, Any]:
        refresh = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")[:12]
        self._refresh[refresh] = (user.id, session_id, False)
        now = int(time.time())
        return {
            "access_token": self.mint(user.id, session_id=session_id),
            "token_type": "bearer",
            "expires_in": self.access_ttl,
            "expires_at": now + self.access_ttl,
            "refresh_token": refresh,
            "user": user.json(),
        }

    def _bearer_user(self, request: RecordedRequest) -> _User:
        token = request.bearer
        if not token:
            raise self._auth_fail(request, "no_authorization", 401, "This endpoint requires a valid Bearer token")
        claims = self._verify(token)
        if claims is None:
            raise self._auth_fail(
                request, "bad_jwt", 403, "invalid JWT: unable to parse or verify signature, token has invalid claims"
            )
        user = next((u for u in self._users.values() if u.id == claims.get("sub")), None)
        if user is None:
            raise self._auth_fail(request, "user_not_found", 403, "User from sub claim in JWT does not exist")
        if claims.get("session_id") not in self._sessions:
            raise self._auth_fail(
                request, "session_not_found", 403, "Session from session_id claim in JWT does not exist"
            )
        return user

    def _verify(self, token: str) -> dict[str, Any] | None:
        try:
            if self.jwt_secret is not None:
                return jwt.decode(token, self.jwt_secret, algorithms=["HS256"], audience="authenticated")
            kid = jwt.get_unverified_header(token).get("kid")
            key = next((k for i, k in self._keys if i == kid), None)
            if key is None:
                return None
            return jwt.decode(token, key.public_key(), algorithms=["ES256"], audience="authenticated")
        except jwt.PyJWTError:
            return None

    def _auth(self, request: RecordedRequest, path: str) -> Reply:
        body = json.loads(request.body) if request.body else {}
        if path == "/.well-known/jwks.json":
            keys = []
            for kid, key in self._keys:
                public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
                keys.append({**public, "kid": kid, "alg": "ES256", "use": "sig", "key_ops": ["verify"]})
            return Reply(200, {"keys": keys}, headers={"cache-control": "public, max-age=600"})
        if path == "/token":
            grant = dict(p.split("=", 1) for p in request.query.split("&") if "=" in p).get("grant_type")
            if grant == "password":
                user = self._users.get(str(body.get("email", "")))
                if user is None or user.password != body.get("password"):
                    raise self._auth_fail(request, "invalid_credentials", 400, "Invalid login credentials")
                if not user.confirmed:
                    raise self._auth_fail(request, "email_not_confirmed", 400, "Email not confirmed")
                return Reply(200, self._session(user))
            if grant == "refresh_token":
                token = str(body.get("refresh_token", ""))
                entry = self._refresh.get(token)
                if entry is None:
                    raise self._auth_fail(
                        request, "refresh_token_not_found", 400, "Invalid Refresh Token: Refresh Token Not Found"
                    )
                user_id, session_id, used = entry
                if used:
                    raise self._auth_fail(
                        request, "refresh_token_already_used", 400, "Invalid Refresh Token: Already Used"
                    )
                if session_id not in self._sessions:
                    raise self._auth_fail(
                        request, "session_not_found", 400, "Invalid Refresh Token: No Valid Session Found"
                    )
                self._refresh[token] = (user_id, session_id, True)
                user = next(u for u in self._users.values() if u.id == user_id)
                return Reply(200, self._session_body(user, session_id))
            raise self._auth_fail(request, "invalid_credentials", 400, "unsupported_grant_type")
        if path == "/signup":
            email, password = str(body.get("email", "")), str(body.get("password", ""))
            if not email:
                raise self._auth_fail(request, "validation_failed", 400, "missing email or phone")
            if len(password) < 6:
                raise self._auth_fail(
                    request,
                    "weak_password",
                    422,
                    "Password should be at least 6 characters.",
                    weak_password={"reasons": ["length"]},
                )
            existing = self._users.get(email)
            if existing is not None:
                if self.autoconfirm:
                    raise self._auth_fail(request, "user_already_exists", 422, "User already registered")
                fake = _User(str(uuid.uuid4()), email, "", False, _now_iso())
                return Reply(200, fake.json())
            self.add_user(email, password, confirmed=self.autoconfirm)
            user = self._users[email]
            user.metadata = dict(body.get("data") or {})
            return Reply(200, self._session(user) if self.autoconfirm else user.json())
        if path == "/user":
            return Reply(200, self._bearer_user(request).json())
        if path == "/logout":
            token = request.bearer or ""
            claims = self._verify(token)
            if claims is None:
                raise self._auth_fail(request, "bad_jwt", 403, "invalid JWT: unable to parse or verify signature")
            self._sessions.discard(str(claims.get("session_id")))
            return Reply(204)
        return Reply(404, {"code": 404, "msg": "Not Found"})

    # -- Storage -------------------------------------------------------------------------------------------------

    def _storage_fail(self, status: int, error: str, message: str, code: str | None) -> _FailError:
        variant_code = code if self.storage_variant == "code" else None
        http = 500 if status == 500 else 400
        return _FailError(Reply(http, storage_error_body(status, error, message, variant_code)))

    def _storage_role(self, request: RecordedRequest) -> tuple[str, str | None]:
        """(role, user id) of the request's token, as Storage's jwt plugin decides; refusal as AccessDenied."""
        token = request.bearer or ""
        if token == self.service_role_key and request.headers.get("apikey") == self.service_role_key:
            return "service_role", None
        claims = self._verify(token)
        if claims is None:
            expired = False
            try:
                payload = jwt.decode(token, options={"verify_signature": False})
                expired = payload.get("exp", 0) < time.time()
            except jwt.PyJWTError:
                pass
            raise self._storage_fail(
                403, "Unauthorized", "jwt expired" if expired else "invalid signature", "AccessDenied"
            )
        return str(claims.get("role")), str(claims.get("sub"))

    def _visible(self, role: str, user: str | None, obj: _Object | None) -> bool:
        return obj is not None and (role == "service_role" or obj.owner == user)

    def _storage(self, request: RecordedRequest, path: str, raw: Request) -> Reply:
        method = request.method
        if match := re.fullmatch(r"/object/sign/([^/]+)/(.+)", path):
            bucket, key = match.groups()
            if method == "GET":
                return self._fetch_signed(request, bucket, key)
            role, user = self._storage_role(request)
            obj = self.objects.get((bucket, key))
            if not self._visible(role, user, obj):
                raise self._storage_fail(404, "not_found", "Object not found", "NoSuchKey")
            body = json.loads(request.body)
            token = self._sign_url(bucket, key, int(body["expiresIn"]))
            return Reply(200, {"signedURL": f"/object/sign/{bucket}/{key}?token={token}"})
        if (match := re.fullmatch(r"/object/sign/([^/]+)", path)) and method == "POST":
            bucket = match.group(1)
            role, user = self._storage_role(request)
            body = json.loads(request.body)
            items = []
            for key in body["paths"]:
                if self._visible(role, user, self.objects.get((bucket, key))):
                    token = self._sign_url(bucket, key, int(body["expiresIn"]))
                    items.append(
                        {"error": None, "path": key, "signedURL": f"/object/sign/{bucket}/{key}?token={token}"}
                    )
                else:
                    items.append(
                        {
                            "error": "Either the object does not exist or you do not have access to it",
                            "path": key,
                            "signedURL": None,
                        }
                    )
            return Reply(200, items)
        if match := re.fullmatch(r"/object/upload/sign/([^/]+)/(.+)", path):
            bucket, key = match.groups()
            if method == "POST":
                role, user = self._storage_role(request)
                token = jwt.encode(
                    {
                        "url": f"{bucket}/{key}",
                        "owner": user,
                        "upsert": request.headers.get("x-upsert") == "true",
                        "exp": int(time.time()) + 7200,
                    },
                    self._storage_secret,
                    algorithm="HS256",
                )
                return Reply(200, {"url": f"/object/upload/sign/{bucket}/{key}?token={token}", "token": token})
            query = dict(p.split("=", 1) for p in request.query.split("&") if "=" in p)
            try:
                claims = jwt.decode(query.get("token", ""), self._storage_secret, algorithms=["HS256"])
            except jwt.PyJWTError as exc:
                raise self._storage_fail(400, "InvalidSignature", str(exc), "InvalidSignature") from None
            if claims.get("url") != f"{bucket}/{key}":
                raise self._storage_fail(
                    400, "InvalidSignature", "The url do not match the signature", "InvalidSignature"
                )
            data, content_type = _multipart_file(request)
            self._put(bucket, key, data, content_type, claims.get("owner"), bool(claims.get("upsert")))
            return Reply(200, {"Key": f"{bucket}/{key}"})
        if (match := re.fullmatch(r"/object/list/([^/]+)", path)) and method == "POST":
            role, user = self._storage_role(request)
            bucket = match.group(1)
            self._need_bucket(bucket)
            body = json.loads(request.body)
            prefix = str(body.get("prefix") or "")
            entries = []
            for (b, key), obj in sorted(self.objects.items()):
                if b != bucket or not key.startswith(prefix) or not self._visible(role, user, obj):
                    continue
                name = key[len(prefix) :].lstrip("/")
                if "/" in name:
                    continue
                entries.append(
                    {
                        "name": name,
                        "id": obj.id,
                        "updated_at": obj.updated_at,
                        "created_at": obj.updated_at,
                        "last_accessed_at": obj.updated_at,
                        "metadata": {
                            "size": len(obj.data),
                            "mimetype": obj.content_type,
                            "cacheControl": "max-age=3600",
                        },
                    }
                )
            offset, limit = int(body.get("offset", 0)), int(body.get("limit", 100))
            return Reply(200, entries[offset : offset + limit])
        if match := re.fullmatch(r"/object/(?:authenticated/)?([^/]+)/(.+)", path):
            bucket, key = match.groups()
            role, user = self._storage_role(request)
            self._need_bucket(bucket)
            if method == "GET":
                obj = self.objects.get((bucket, key))
                if obj is None or not self._visible(role, user, obj):
                    raise self._storage_fail(404, "not_found", "Object not found", "NoSuchKey")
                return Reply(200, body=obj.data, headers={"content-type": obj.content_type})
            if method in ("POST", "PUT"):
                data, content_type = _multipart_file(request)
                upsert = method == "PUT" or request.headers.get("x-upsert") == "true"
                if method == "PUT" and (bucket, key) not in self.objects:
                    raise self._storage_fail(404, "not_found", "Object not found", "NoSuchKey")
                obj_id = self._put(bucket, key, data, content_type, user, upsert)
                return Reply(200, {"Id": obj_id, "Key": f"{bucket}/{key}"})
        if (match := re.fullmatch(r"/object/([^/]+)", path)) and method == "DELETE":
            role, user = self._storage_role(request)
            bucket = match.group(1)
            removed = []
            for key in json.loads(request.body).get("prefixes", []):
                obj = self.objects.get((bucket, key))
                if self._visible(role, user, obj):
                    del self.objects[(bucket, key)]
                    removed.append({"bucket_id": bucket, "name": key, "id": obj.id if obj else None})
            return Reply(200, removed)
        if match := re.fullmatch(r"/bucket/([^/]+)", path):
            self._storage_role(request)
            return Reply(200, self._need_bucket(match.group(1)))
        if path == "/bucket" and method == "POST":
            role, _user = self._storage_role(request)
            if role != "service_role":
                raise self._storage_fail(
                    403, "Unauthorized", "new row violates row-level security policy", "AccessDenied"
                )
            body = json.loads(request.body)
            if body["id"] in self.buckets:
                raise self._storage_fail(409, "Duplicate", "The resource already exists", "BucketAlreadyExists")
            self.add_bucket(body["id"], public=bool(body.get("public")))
            return Reply(200, {"name": body["id"]})
        return Reply(404, {"statusCode": "404", "error": "Not Found", "message": f"Route {method}:{path} not found"})

    def _need_bucket(self, bucket: str) -> dict[str, Any]:
        if bucket not in self.buckets:
            raise self._storage_fail(404, "Bucket not found", "Bucket not found", "NoSuchBucket")
        return self.buckets[bucket]

    def _put(self, bucket: str, key: str, data: bytes, content_type: str, owner: Any, upsert: bool) -> str:
        self._need_bucket(bucket)
        existing = self.objects.get((bucket, key))
        if existing is not None and not upsert:
            raise self._storage_fail(409, "Duplicate", "The resource already exists", "KeyAlreadyExists")
        if existing is not None and existing.owner != owner:
            raise self._storage_fail(403, "Unauthorized", "new row violates row-level security policy", "AccessDenied")
        obj_id = existing.id if existing else str(uuid.uuid4())
        self.objects[(bucket, key)] = _Object(data, content_type, owner, obj_id, _now_iso())
        return obj_id

    def _sign_url(self, bucket: str, key: str, expires_in: int) -> str:
        return jwt.encode(
            {"url": f"{bucket}/{key}", "iat": int(time.time()), "exp": int(time.time()) + expires_in},
            self._storage_secret,
            algorithm="HS256",
        )

    def _fetch_signed(self, request: RecordedRequest, bucket: str, key: str) -> Reply:
        query = dict(p.split("=", 1) for p in request.query.split("&") if "=" in p)
        try:
            claims = jwt.decode(query.get("token", ""), self._storage_secret, algorithms=["HS256"])
        except jwt.ExpiredSignatureError:
            raise self._storage_fail(400, "InvalidJWT", "jwt expired", "InvalidJWT") from None
        except jwt.PyJWTError:
            raise self._storage_fail(400, "InvalidJWT", "invalid signature", "InvalidJWT") from None
        if claims.get("url") != f"{bucket}/{key}":
            raise self._storage_fail(400, "InvalidSignature", "The url do not match the signature", "InvalidSignature")
        obj = self.objects.get((bucket, key))
        if obj is None:
            raise self._storage_fail(404, "not_found", "Object not found", "NoSuchKey")
        return Reply(200, body=obj.data, headers={"content-type": obj.content_type})

    # -- Functions -----------------------------------------------------------------------------------------------

    def _function(self, request: RecordedRequest, name: str) -> Reply:
        handler = self.functions.get(name.split("?", 1)[0])
        if handler is None:
            return Reply(
                404,
                {"code": "NOT_FOUND", "message": "Requested function was not found"},
                headers={"sb-error-code": "NOT_FOUND"},
            )
        return handler(request)


class _FailError(Exception):
    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.status)
        self.reply = reply


def _constant(reply: Reply) -> Responder:
    return lambda _request: reply


def _multipart_file(request: RecordedRequest) -> tuple[bytes, str]:
    """The ``file`` part of a multipart body (storage3 always sends multipart), or the raw body."""
    content_type = request.headers.get("content-type", "")
    match = re.search(r"boundary=([^;]+)", content_type)
    if not content_type.startswith("multipart/form-data") or match is None:
        return request.body, content_type or "application/octet-stream"
    boundary = b"--" + match.group(1).strip('"').encode()
    for part in request.body.split(boundary):
        head, sep, data = part.partition(b"\r\n\r\n")
        if not sep or b'name="file"' not in head:
            continue
        part_type = re.search(rb"content-type:\s*([^\r\n]+)", head, re.I)
        return data.removesuffix(b"\r\n"), part_type.group(1).decode() if part_type else "application/octet-stream"
    return b"", "application/octet-stream"
