"""StorageService: objects in Supabase Storage as a user (RLS on ``storage.objects`` applies), over storage3.

Upload (content type, upsert, cache control, metadata), download, signed URLs (create, create many, use), signed
upload URLs, list, remove and bucket checks, synchronous (:class:`StorageService`) and for asyncio
(:class:`AsyncStorageService`). Every request carries the anon key as ``apikey`` and the *user's* access token
as ``Authorization``, so Storage's policies decide; :meth:`StorageService.with_service_role` is the server-side
exception, reading the key from the project's configuration only, never from a caller's token.

Errors. Storage answers nearly every failure with HTTP 400 and the meaningful status as a *string* in the body's
``statusCode``; since 2026-07 bodies also carry ``code`` (``NoSuchKey``), before they carried only the legacy
``error`` name (``not_found``), and some servers put the code in ``error``. :func:`storage_error` reads all three
variants, plus non-JSON bodies (a proxy's HTML, an empty 502), from the response as recorded by
:mod:`pgferry.supabase._http`, and returns a named class of :mod:`pgferry.supabase.errors`.

Tokens follow :mod:`pgferry.supabase.tokens`: an expired token is refreshed once (when its source can) and the
call retried, or the error says the caller must refresh.

Must not create buckets or policies except through :meth:`StorageService.ensure_bucket` (service role only).
"""

from __future__ import annotations

import builtins
import contextlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final, TypeVar

import httpx
import pydantic
from storage3 import AsyncStorageClient, SyncStorageClient
from storage3.types import FileOptions
from storage3.utils import StorageException

from pgferry.supabase._http import Exchange, call_scope
from pgferry.supabase.errors import (
    BucketNotFoundError,
    InvalidObjectKeyError,
    ObjectExistsError,
    ObjectNotFoundError,
    PayloadTooLargeError,
    StorageAccessDeniedError,
    StorageRateLimitedError,
    StorageServiceError,
    StorageUnavailableError,
    UnsupportedMediaTypeError,
    server_text,
)
from pgferry.supabase.project import SupabaseProject
from pgferry.supabase.tokens import (
    AsyncTokenSource,
    StaticToken,
    TokenSource,
    async_source,
    expired_token_error,
    is_expired,
    sync_source,
)

__all__ = [
    "AsyncStorageService",
    "BucketInfo",
    "ObjectInfo",
    "SignedUpload",
    "SignedUrl",
    "StorageService",
    "StoredObject",
    "storage_error",
]

_T = TypeVar("_T")
Data = bytes | Path | IO[bytes]

# ---------------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredObject:
    """An uploaded object: ``key`` is Storage's ``<bucket>/<path>``."""

    bucket: str
    path: str
    key: str


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One entry of a listing; folders have ``id=None`` and no size."""

    name: str
    id: str | None
    size: int | None
    content_type: str | None
    updated_at: str | None
    metadata: Mapping[str, Any] = field(repr=False)


@dataclass(frozen=True, slots=True)
class SignedUrl:
    """A signed download URL for ``path`` (absolute), or ``error`` when Storage would not sign it."""

    path: str
    url: str | None = field(repr=False)
    error: str | None = None


@dataclass(frozen=True, slots=True)
class SignedUpload:
    """A one-time upload URL: whoever holds ``url`` (or ``token``) may upload to ``path`` until it expires."""

    bucket: str
    path: str
    url: str = field(repr=False)
    token: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class BucketInfo:
    id: str
    name: str
    public: bool
    file_size_limit: int | None
    allowed_mime_types: tuple[str, ...] | None


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------

_BY_CODE: Final[dict[str, type[StorageServiceError]]] = {
    "NoSuchKey": ObjectNotFoundError,
    "NoSuchBucket": BucketNotFoundError,
    "KeyAlreadyExists": ObjectExistsError,
    "BucketAlreadyExists": ObjectExistsError,
    "ResourceAlreadyExists": ObjectExistsError,
    "AccessDenied": StorageAccessDeniedError,
    "InvalidJWT": StorageAccessDeniedError,
    "EntityTooLarge": PayloadTooLargeError,
    "InvalidMimeType": UnsupportedMediaTypeError,
    "InvalidKey": InvalidObjectKeyError,
    "InvalidBucketName": InvalidObjectKeyError,
    "InvalidRequest": InvalidObjectKeyError,
    "SlowDown": StorageRateLimitedError,
    "InternalError": StorageUnavailableError,
    "DatabaseTimeout": StorageUnavailableError,
    "DatabaseConnectionLimit": StorageUnavailableError,
    "DatabaseReadOnly": StorageUnavailableError,
    "LockTimeout": StorageUnavailableError,
}
# The legacy ``error`` names (bodies without ``code``), from storage's ``ERRORS`` factories.
_BY_LEGACY: Final[dict[str, type[StorageServiceError]]] = {
    "not_found": ObjectNotFoundError,
    "Bucket not found": BucketNotFoundError,
    "Duplicate": ObjectExistsError,
    "Unauthorized": StorageAccessDeniedError,
    "Payload too large": PayloadTooLargeError,
    "invalid_mime_type": UnsupportedMediaTypeError,
    "Invalid Input": InvalidObjectKeyError,
}
_BY_STATUS: Final[dict[int, type[StorageServiceError]]] = {
    401: StorageAccessDeniedError,
    403: StorageAccessDeniedError,
    409: ObjectExistsError,
    413: PayloadTooLargeError,
    415: UnsupportedMediaTypeError,
    429: StorageRateLimitedError,
}
_ADVICE: Final[dict[type[StorageServiceError], str]] = {
    ObjectNotFoundError: "no such object, or the bucket's policies hide it from this user; check bucket and path",
    BucketNotFoundError: "no such bucket, or its policies hide it from this user; create it or fix the name",
    ObjectExistsError: "an object already exists at this path; upload with upsert=True to replace it",
    StorageAccessDeniedError: (
        "the bucket's policies on storage.objects do not allow this user to do this (or the token was refused); "
        "grant it with a policy or act as the owner"
    ),
    PayloadTooLargeError: "the object is larger than the bucket's (or the project's) size limit; raise the limit",
    UnsupportedMediaTypeError: "the bucket does not accept this content type; pass an allowed content_type",
    InvalidObjectKeyError: "the bucket name, path or request is not accepted; fix it",
    StorageRateLimitedError: "Storage is overloaded; back off and retry",
    StorageUnavailableError: "Storage failed on its side; retry later",
    StorageServiceError: "Storage refused the request",
}


def _int_status(value: object) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def storage_error(exchange: Exchange | None, action: str, storage_url: str = "") -> StorageServiceError:
    """The named error for a failed Storage response, whatever its body variant."""
    if exchange is None:
        return StorageUnavailableError(f"{action} failed without a response from Storage at {storage_url}; retry later")
    body = exchange.json()
    http_status = exchange.status
    if not isinstance(body, dict):
        status = http_status
        cls = _BY_STATUS.get(status) or (StorageUnavailableError if status >= 500 else StorageServiceError)
        snippet = server_text(exchange.text(120)) or "an empty body"
        return cls(
            f"{action} failed: {_ADVICE[cls]} (Storage answered HTTP {http_status} with a non-JSON body: {snippet!r})",
            status=status,
            http_status=http_status,
        )
    code = body.get("code") if isinstance(body.get("code"), str) else None
    legacy = body.get("error") if isinstance(body.get("error"), str) else None
    message = body.get("message") if isinstance(body.get("message"), str) else ""
    status = _int_status(body.get("statusCode")) or http_status
    cls_or_none: type[StorageServiceError] | None = None
    for name in (code, legacy):
        if name is not None and cls_or_none is None:
            cls_or_none = _BY_CODE.get(name) or _BY_LEGACY.get(name)
    if cls_or_none is None:
        cls_or_none = _BY_STATUS.get(status)
    if cls_or_none is None:
        cls_or_none = StorageUnavailableError if status >= 500 else StorageServiceError
    cls = cls_or_none
    if cls is StorageServiceError and status == 404:
        cls = ObjectNotFoundError
    shown_code = code or legacy or "error"
    detail = f"Storage {shown_code}, status {status}" + (f": {server_text(message)}" if message else "")
    retry_after = exchange.headers.get("retry-after")
    return cls(
        f"{action} failed: {_ADVICE[cls]} ({detail})",
        status=status,
        http_status=http_status,
        code=code or legacy,
        retry_after=float(retry_after) if retry_after and retry_after.isdigit() else None,
    )


def _refused_as_expired(error: StorageServiceError, token: str) -> bool:
    """Whether Storage refused the request because the token expired (its message, or the token's own ``exp``)."""
    if not isinstance(error, StorageAccessDeniedError):
        return False
    text = str(error).lower()
    return "exp" in text or is_expired(token, margin=0)


def _check_path(bucket: str, path: str | None = None) -> None:
    if not bucket or "/" in bucket:
        raise InvalidObjectKeyError(f"bucket name {bucket!r} is not valid; use the bucket's id, without slashes")
    if path is not None:
        parts = path.split("/")
        if not path or path.startswith("/") or any(part in ("", ".", "..") for part in parts):
            raise InvalidObjectKeyError(
                f"object path {path!r} is not valid; use a relative path without empty, '.' or '..' segments"
            )


def _read(data: Data) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, Path):
        return data.read_bytes()
    return data.read()


def _file_options(
    content_type: str | None, upsert: bool, cache_control: int | None, metadata: Mapping[str, Any] | None
) -> FileOptions:
    options: FileOptions = {
        "content-type": content_type or "application/octet-stream",
        "upsert": "true" if upsert else "false",
    }
    if cache_control is not None:
        options["cache-control"] = str(int(cache_control))
    if metadata:
        options["metadata"] = dict(metadata)
    return options


def _object_info(entry: Mapping[str, Any]) -> ObjectInfo:
    metadata = entry.get("metadata") if isinstance(entry.get("metadata"), dict) else {}
    assert isinstance(metadata, dict)
    size = metadata.get("size")
    return ObjectInfo(
        name=str(entry.get("name", "")),
        id=entry.get("id") if isinstance(entry.get("id"), str) else None,
        size=size if isinstance(size, int) else None,
        content_type=metadata.get("mimetype") if isinstance(metadata.get("mimetype"), str) else None,
        updated_at=entry.get("updated_at") if isinstance(entry.get("updated_at"), str) else None,
        metadata=dict(metadata),
    )


def _bucket_info(bucket: Any) -> BucketInfo:
    mimes = bucket.allowed_mime_types
    return BucketInfo(
        id=bucket.id,
        name=bucket.name,
        public=bucket.public,
        file_size_limit=bucket.file_size_limit,
        allowed_mime_types=tuple(mimes) if mimes is not None else None,
    )


# ---------------------------------------------------------------------------------------------------------------
# Shared part
# ---------------------------------------------------------------------------------------------------------------


class _StorageBase:
    def __init__(self, project: SupabaseProject, *, timeout: float | None, service_role: bool) -> None:
        self._project = project
        self._timeout = timeout
        self._service_role = service_role

    def _headers(self, token: str) -> dict[str, str]:
        if self._service_role:
            key = self._project.service_role_key()
            return {"apikey": key, "Authorization": f"Bearer {key}"}
        self._project.refuse_privileged(token)
        return {"apikey": self._project.anon_key, "Authorization": f"Bearer {token}"}

    def _transport_error(self, exc: Exception, action: str) -> StorageServiceError:
        if isinstance(exc, httpx.TimeoutException):
            return StorageUnavailableError(
                f"{action} failed: Storage did not answer in time ({type(exc).__name__}); retry, or raise the timeout"
            )
        if isinstance(exc, httpx.TransportError):
            return StorageUnavailableError(
                f"{action} failed: cannot reach Storage at {self._project.storage_url} ({type(exc).__name__}); check "
                "SUPABASE_URL and the network, then retry"
            )
        return StorageUnavailableError(
            f"{action} failed: Storage at {self._project.storage_url} answered with a body that is not a Storage "
            "response; check SUPABASE_URL and retry"
        )

    def _signed_url_checked(self, url: str) -> str:
        base = self._project.storage_url + "/object/sign/"
        if not url.startswith(base):
            raise InvalidObjectKeyError(
                f"refusing to fetch a signed URL outside this project's Storage ({base}...); pass a URL created by "
                "create_signed_url"
            )
        return url


_ERRORS: Final = (httpx.TransportError, pydantic.ValidationError, ValueError, KeyError)


# ---------------------------------------------------------------------------------------------------------------
# Sync
# ---------------------------------------------------------------------------------------------------------------


class StorageService(_StorageBase):
    """Storage as one user (``token``: the user's access token, a :class:`StaticToken` or an ``AuthService``).

    ``timeout`` (seconds) bounds each request; default: the project's.
    """

    def __init__(
        self, project: SupabaseProject, token: str | StaticToken | TokenSource, *, timeout: float | None = None
    ) -> None:
        super().__init__(project, timeout=timeout, service_role=False)
        self._source = sync_source(token)

    @classmethod
    def with_service_role(cls, project: SupabaseProject, *, timeout: float | None = None) -> StorageService:
        """Server-side only: Storage as ``service_role`` (bypasses RLS), with the key from
        ``SUPABASE_SERVICE_ROLE_KEY``. Never build one from anything a client sent."""
        project.service_role_key()
        service = cls.__new__(cls)
        _StorageBase.__init__(service, project, timeout=timeout, service_role=True)
        service._source = _ServiceRoleSource()
        return service

    def _once(self, token: str, action: str, fn: Callable[[SyncStorageClient], _T]) -> _T:
        client = SyncStorageClient(
            self._project.storage_url + "/", self._headers(token), http_client=self._project.http()
        )
        with call_scope(self._timeout) as record:
            try:
                return fn(client)
            except StorageException:
                raise storage_error(record.last, action, self._project.storage_url) from None
            except httpx.HTTPStatusError:
                raise storage_error(record.last, action, self._project.storage_url) from None
            except _ERRORS as exc:
                raise self._transport_error(exc, action) from exc

    def _run(self, action: str, fn: Callable[[SyncStorageClient], _T]) -> _T:
        token = self._source.access_token()
        try:
            return self._once(token, action, fn)
        except StorageServiceError as exc:
            if self._service_role or not _refused_as_expired(exc, token):
                raise
            fresh = self._source.refreshed_access_token()
            if fresh is None:
                raise expired_token_error(can_refresh=False) from exc
        try:
            return self._once(fresh, action, fn)
        except StorageServiceError as again:
            if _refused_as_expired(again, fresh):
                raise expired_token_error(can_refresh=True, after_refresh=True) from again
            raise

    def upload(
        self,
        bucket: str,
        path: str,
        data: Data,
        *,
        content_type: str | None = None,
        upsert: bool = False,
        cache_control: int | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> StoredObject:
        """Store ``data`` at ``path``; :class:`ObjectExistsError` when something is there and ``upsert`` is off."""
        _check_path(bucket, path)
        content = _read(data)
        options = _file_options(content_type, upsert, cache_control, metadata)
        response = self._run(f"upload to {bucket}/{path}", lambda c: c.from_(bucket).upload(path, content, options))
        return StoredObject(bucket=bucket, path=path, key=response.full_path)

    def download(self, bucket: str, path: str) -> bytes:
        _check_path(bucket, path)
        return self._run(f"download of {bucket}/{path}", lambda c: c.from_(bucket).download(path))

    def create_signed_url(self, bucket: str, path: str, expires_in: int, *, download: bool | str = False) -> str:
        """An absolute URL that downloads the object without credentials for ``expires_in`` seconds."""
        _check_path(bucket, path)
        options: dict[str, Any] = {"download": download} if download else {}
        result = self._run(
            f"signing {bucket}/{path}",
            lambda c: c.from_(bucket).create_signed_url(path, expires_in, options or None),  # type: ignore[arg-type]
        )
        url = result.get("signedURL")
        if not url:
            raise StorageUnavailableError(f"signing {bucket}/{path} failed: Storage returned no URL; retry later")
        return url

    def create_signed_urls(self, bucket: str, paths: Sequence[str], expires_in: int) -> list[SignedUrl]:
        """Signed URLs for several objects; an object Storage will not sign gets ``error`` instead of ``url``."""
        _check_path(bucket)
        for path in paths:
            _check_path(bucket, path)
        items = self._run(
            f"signing {len(paths)} objects in {bucket}",
            lambda c: c.from_(bucket).create_signed_urls(list(paths), expires_in),
        )
        return [SignedUrl(path=item["path"], url=item["signedURL"], error=item["error"]) for item in items]

    def fetch_signed_url(self, url: str) -> bytes:
        """Use a signed URL (as anyone holding it would: no key, no token)."""
        url = self._signed_url_checked(url)
        with call_scope(self._timeout) as record:
            try:
                response = self._project.http().get(url)
            except _ERRORS as exc:
                raise self._transport_error(exc, "fetching a signed URL") from exc
            if response.status_code >= 300:
                raise storage_error(record.last, "fetching a signed URL", self._project.storage_url)
            return response.content

    def create_signed_upload_url(self, bucket: str, path: str, *, upsert: bool = False) -> SignedUpload:
        _check_path(bucket, path)
        from storage3.types import CreateSignedUploadUrlOptions

        options = CreateSignedUploadUrlOptions(upsert="true") if upsert else None
        result = self._run(
            f"signing an upload to {bucket}/{path}",
            lambda c: c.from_(bucket).create_signed_upload_url(path, options),
        )
        return SignedUpload(bucket=bucket, path=path, url=result["signed_url"], token=result["token"])

    def upload_to_signed_url(
        self, upload: SignedUpload, data: Data, *, content_type: str | None = None
    ) -> StoredObject:
        """Upload through a :class:`SignedUpload` (the signed token authorizes it, not the user's)."""
        content = _read(data)
        file_options: Any = {"content-type": content_type or "application/octet-stream"}
        response = self._run(
            f"upload to {upload.bucket}/{upload.path} by signed URL",
            lambda c: c.from_(upload.bucket).upload_to_signed_url(upload.path, upload.token, content, file_options),
        )
        return StoredObject(bucket=upload.bucket, path=upload.path, key=response.full_path)

    def list(
        self, bucket: str, prefix: str = "", *, limit: int = 100, offset: int = 0, search: str | None = None
    ) -> list[ObjectInfo]:
        """Objects and folders directly under ``prefix`` that this user may see."""
        _check_path(bucket)
        options: dict[str, Any] = {"limit": limit, "offset": offset}
        if search:
            options["search"] = search
        entries = self._run(
            f"listing {bucket}/{prefix}",
            lambda c: c.from_(bucket).list(prefix or None, options),  # type: ignore[arg-type]
        )
        return [_object_info(entry) for entry in entries]

    def remove(self, bucket: str, paths: Sequence[str]) -> builtins.list[str]:
        """Delete objects; returns the paths actually deleted (missing or RLS-hidden paths are silently skipped by
        Storage, so compare with what was asked)."""
        for path in paths:
            _check_path(bucket, path)
        removed = self._run(
            f"removing {len(paths)} objects from {bucket}", lambda c: c.from_(bucket).remove(list(paths))
        )
        return [str(item.get("name")) for item in removed if isinstance(item, dict)]

    def get_bucket(self, bucket: str) -> BucketInfo:
        """The bucket as this token may see it; :class:`BucketNotFoundError` when missing or hidden by RLS."""
        _check_path(bucket)
        return _bucket_info(self._run(f"reading bucket {bucket}", lambda c: c.get_bucket(bucket)))

    def bucket_exists(self, bucket: str) -> bool:
        try:
            self.get_bucket(bucket)
        except BucketNotFoundError:
            return False
        return True

    def ensure_bucket(
        self,
        bucket: str,
        *,
        public: bool = False,
        file_size_limit: int | None = None,
        allowed_mime_types: Sequence[str] | None = None,
    ) -> BucketInfo:
        """Server-side only (service role): the bucket, created with these settings if it does not exist."""
        if not self._service_role:
            raise StorageAccessDeniedError(
                "ensure_bucket creates buckets and needs the service role; use StorageService.with_service_role "
                "in server code"
            )
        if self.bucket_exists(bucket):
            return self.get_bucket(bucket)
        options: dict[str, Any] = {"public": public}
        if file_size_limit is not None:
            options["file_size_limit"] = file_size_limit
        if allowed_mime_types is not None:
            options["allowed_mime_types"] = list(allowed_mime_types)
        with contextlib.suppress(ObjectExistsError):  # created concurrently
            self._run(f"creating bucket {bucket}", lambda c: c.create_bucket(bucket, bucket, options))  # type: ignore[arg-type]
        return self.get_bucket(bucket)


class _ServiceRoleSource:
    def access_token(self) -> str:
        return ""

    def refreshed_access_token(self) -> str | None:
        return None

    async def aaccess_token(self) -> str:
        return ""


class _AsyncServiceRoleSource:
    async def access_token(self) -> str:
        return ""

    async def refreshed_access_token(self) -> str | None:
        return None


# ---------------------------------------------------------------------------------------------------------------
# Async
# ---------------------------------------------------------------------------------------------------------------


class AsyncStorageService(_StorageBase):
    """:class:`StorageService` for asyncio (same methods, awaited)."""

    def __init__(
        self, project: SupabaseProject, token: str | StaticToken | AsyncTokenSource, *, timeout: float | None = None
    ) -> None:
        super().__init__(project, timeout=timeout, service_role=False)
        self._source = async_source(token)

    @classmethod
    def with_service_role(cls, project: SupabaseProject, *, timeout: float | None = None) -> AsyncStorageService:
        """Server-side only: see :meth:`StorageService.with_service_role`."""
        project.service_role_key()
        service = cls.__new__(cls)
        _StorageBase.__init__(service, project, timeout=timeout, service_role=True)
        service._source = _AsyncServiceRoleSource()
        return service

    async def _once(self, token: str, action: str, fn: Callable[[AsyncStorageClient], Awaitable[_T]]) -> _T:
        client = AsyncStorageClient(
            self._project.storage_url + "/", self._headers(token), http_client=self._project.async_http()
        )
        with call_scope(self._timeout) as record:
            try:
                return await fn(client)
            except (StorageException, httpx.HTTPStatusError):
                raise storage_error(record.last, action, self._project.storage_url) from None
            except _ERRORS as exc:
                raise self._transport_error(exc, action) from exc

    async def _run(self, action: str, fn: Callable[[AsyncStorageClient], Awaitable[_T]]) -> _T:
        token = await self._source.access_token()
        try:
            return await self._once(token, action, fn)
        except StorageServiceError as exc:
            if self._service_role or not _refused_as_expired(exc, token):
                raise
            fresh = await self._source.refreshed_access_token()
            if fresh is None:
                raise expired_token_error(can_refresh=False) from exc
        try:
            return await self._once(fresh, action, fn)
        except StorageServiceError as again:
            if _refused_as_expired(again, fresh):
                raise expired_token_error(can_refresh=True, after_refresh=True) from again
            raise

    async def upload(
        self,
        bucket: str,
        path: str,
        data: Data,
        *,
        content_type: str | None = None,
        upsert: bool = False,
        cache_control: int | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> StoredObject:
        _check_path(bucket, path)
        content = _read(data)
        options = _file_options(content_type, upsert, cache_control, metadata)
        response = await self._run(
            f"upload to {bucket}/{path}", lambda c: c.from_(bucket).upload(path, content, options)
        )
        return StoredObject(bucket=bucket, path=path, key=response.full_path)

    async def download(self, bucket: str, path: str) -> bytes:
        _check_path(bucket, path)
        return await self._run(f"download of {bucket}/{path}", lambda c: c.from_(bucket).download(path))

    async def create_signed_url(self, bucket: str, path: str, expires_in: int, *, download: bool | str = False) -> str:
        _check_path(bucket, path)
        options: dict[str, Any] = {"download": download} if download else {}
        result = await self._run(
            f"signing {bucket}/{path}",
            lambda c: c.from_(bucket).create_signed_url(path, expires_in, options or None),  # type: ignore[arg-type]
        )
        url = result.get("signedURL")
        if not url:
            raise StorageUnavailableError(f"signing {bucket}/{path} failed: Storage returned no URL; retry later")
        return url

    async def create_signed_urls(self, bucket: str, paths: Sequence[str], expires_in: int) -> list[SignedUrl]:
        _check_path(bucket)
        for path in paths:
            _check_path(bucket, path)
        items = await self._run(
            f"signing {len(paths)} objects in {bucket}",
            lambda c: c.from_(bucket).create_signed_urls(list(paths), expires_in),
        )
        return [SignedUrl(path=item["path"], url=item["signedURL"], error=item["error"]) for item in items]

    async def fetch_signed_url(self, url: str) -> bytes:
        url = self._signed_url_checked(url)
        with call_scope(self._timeout) as record:
            try:
                response = await self._project.async_http().get(url)
            except _ERRORS as exc:
                raise self._transport_error(exc, "fetching a signed URL") from exc
            if response.status_code >= 300:
                raise storage_error(record.last, "fetching a signed URL", self._project.storage_url)
            return response.content

    async def create_signed_upload_url(self, bucket: str, path: str, *, upsert: bool = False) -> SignedUpload:
        _check_path(bucket, path)
        from storage3.types import CreateSignedUploadUrlOptions

        options = CreateSignedUploadUrlOptions(upsert="true") if upsert else None
        result = await self._run(
            f"signing an upload to {bucket}/{path}",
            lambda c: c.from_(bucket).create_signed_upload_url(path, options),
        )
        return SignedUpload(bucket=bucket, path=path, url=result["signed_url"], token=result["token"])

    async def upload_to_signed_url(
        self, upload: SignedUpload, data: Data, *, content_type: str | None = None
    ) -> StoredObject:
        content = _read(data)
        file_options: Any = {"content-type": content_type or "application/octet-stream"}
        response = await self._run(
            f"upload to {upload.bucket}/{upload.path} by signed URL",
            lambda c: c.from_(upload.bucket).upload_to_signed_url(upload.path, upload.token, content, file_options),
        )
        return StoredObject(bucket=upload.bucket, path=upload.path, key=response.full_path)

    async def ensure_bucket(
        self,
        bucket: str,
        *,
        public: bool = False,
        file_size_limit: int | None = None,
        allowed_mime_types: Sequence[str] | None = None,
    ) -> BucketInfo:
        """Server-side only (service role): see :meth:`StorageService.ensure_bucket`."""
        if not self._service_role:
            raise StorageAccessDeniedError(
                "ensure_bucket creates buckets and needs the service role; use AsyncStorageService.with_service_role "
                "in server code"
            )
        if await self.bucket_exists(bucket):
            return await self.get_bucket(bucket)
        options: dict[str, Any] = {"public": public}
        if file_size_limit is not None:
            options["file_size_limit"] = file_size_limit
        if allowed_mime_types is not None:
            options["allowed_mime_types"] = list(allowed_mime_types)
        with contextlib.suppress(ObjectExistsError):  # created concurrently
            await self._run(f"creating bucket {bucket}", lambda c: c.create_bucket(bucket, bucket, options))  # type: ignore[arg-type]
        return await self.get_bucket(bucket)

    async def list(
        self, bucket: str, prefix: str = "", *, limit: int = 100, offset: int = 0, search: str | None = None
    ) -> list[ObjectInfo]:
        _check_path(bucket)
        options: dict[str, Any] = {"limit": limit, "offset": offset}
        if search:
            options["search"] = search
        entries = await self._run(
            f"listing {bucket}/{prefix}",
            lambda c: c.from_(bucket).list(prefix or None, options),  # type: ignore[arg-type]
        )
        return [_object_info(entry) for entry in entries]

    async def remove(self, bucket: str, paths: Sequence[str]) -> builtins.list[str]:
        for path in paths:
            _check_path(bucket, path)
        removed = await self._run(
            f"removing {len(paths)} objects from {bucket}", lambda c: c.from_(bucket).remove(list(paths))
        )
        return [str(item.get("name")) for item in removed if isinstance(item, dict)]

    async def get_bucket(self, bucket: str) -> BucketInfo:
        _check_path(bucket)
        return _bucket_info(await self._run(f"reading bucket {bucket}", lambda c: c.get_bucket(bucket)))

    async def bucket_exists(self, bucket: str) -> bool:
        try:
            await self.get_bucket(bucket)
        except BucketNotFoundError:
            return False
        return True
