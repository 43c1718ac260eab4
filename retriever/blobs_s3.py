"""Blob store on S3-compatible object storage (AWS S3, MinIO, Ceph RGW, R2...), via boto3.

Same content-addressed keys as ``LocalBlobStore`` (``retriever.blobs.blob_key``), stored under
``s3://bucket/prefix/<key>``, so several vlmrag replicas share one set of blobs and stay stateless.
Credentials come from boto3's usual chain (``AWS_*`` variables, profile, IRSA / workload identity);
nothing secret lives in our settings. Writes are conditional (``If-None-Match: *``): of two replicas
storing the same image only one upload lands, the other sees ``412 PreconditionFailed`` = "already
there" (same key, same bytes). Stores without conditional writes fall back to head-then-put, which
is just as correct for content-addressed data, only not race-free in bandwidth.
"""

from __future__ import annotations

import logging
import mimetypes
import time
from pathlib import Path
from typing import Any

from retriever.blobs import blob_key, validate_key
from retriever.errors import ConfigurationError, NotFound, StoreUnavailable, UpstreamError

log = logging.getLogger(__name__)

# S3 error codes that mean "the object is not there".
_MISSING = {"NoSuchKey", "404", "NotFound"}
# Misconfiguration: retrying will not help, the operator must act.
_CONFIG = {"NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
           "InvalidBucketName", "AuthorizationHeaderMalformed", "PermanentRedirect"}
# Transient on the server side: the caller gets 503 + Retry-After.
_TRANSIENT = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
              "ThrottlingException", "RequestTimeTooSkewed"}
_CONFLICT_RETRIES = 3


def _normalize_prefix(prefix: str) -> str:
    prefix = prefix.strip().lstrip("/")
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


class S3BlobStore:
    """Content-addressed blobs in ``s3://bucket/prefix``; implements ``retriever.blobs.BlobStore``."""

    def __init__(
        self, bucket: str, prefix: str = "vlmrag/", endpoint_url: str | None = None, client: Any = None,
        *, region: str | None = None, connect_timeout_s: float = 5.0, read_timeout_s: float = 30.0,
    ) -> None:
        if not bucket or not bucket.strip():
            raise ConfigurationError("blob backend s3 needs a bucket: set VLMRAG_BLOB_S3_BUCKET",
                                     param="blob_s3_bucket")
        self.bucket = bucket.strip()
        self.prefix = _normalize_prefix(prefix)
        self.endpoint_url = endpoint_url or None
        self._where = self.endpoint_url or "AWS S3"
        self.description = f"s3://{self.bucket}/{self.prefix}" + (f" at {self.endpoint_url}" if self.endpoint_url else "")
        self._client = client if client is not None else self._build_client(region, connect_timeout_s, read_timeout_s)

    def _build_client(self, region: str | None, connect_timeout_s: float, read_timeout_s: float) -> Any:
        import boto3
        from botocore.config import Config

        # One session per store: boto3 sessions are not thread-safe, clients are.
        session = boto3.session.Session(region_name=region)
        if session.get_credentials() is None:
            raise ConfigurationError(
                f"no S3 credentials for {self.description}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "AWS_PROFILE, or use the platform's workload identity (IRSA etc.)",
                param="blob_backend",
            )
        config = Config(
            connect_timeout=connect_timeout_s, read_timeout=read_timeout_s,
            retries={"max_attempts": 3, "mode": "standard"},
            # path-style works with every S3-compatible server (MinIO, Ceph) and with AWS
            s3={"addressing_style": "path"} if self.endpoint_url else None,
        )
        return session.client("s3", endpoint_url=self.endpoint_url, config=config)

    # --- BlobStore ------------------------------------------------------------------------------
    def put(self, data: bytes, suffix: str) -> str:
        """Store ``data`` once (conditional put) and return its content-addressed key."""
        key = blob_key(data, suffix)
        object_key = self._object_key(key)
        content_type = mimetypes.guess_type(f"x{suffix}")[0] or "application/octet-stream"
        for attempt in range(_CONFLICT_RETRIES + 1):
            try:
                self._call(
                    "put", key, self._client.put_object, Bucket=self.bucket, Key=object_key, Body=data,
                    IfNoneMatch="*", ContentType=content_type,
                    CacheControl="public, max-age=31536000, immutable",  # content-addressed: never changes
                )
                return key
            except _S3Error as exc:
                if exc.code == "PreconditionFailed" or exc.status == 412:
                    return key  # another writer stored the same bytes first
                if exc.code == "ConditionalRequestConflict" or exc.status == 409:
                    # a concurrent conditional upload of the same key is in flight: wait and re-check
                    if attempt < _CONFLICT_RETRIES:
                        time.sleep(0.05 * 2**attempt)
                        continue
                    raise StoreUnavailable(f"S3 {self._where}: concurrent uploads of {key} kept conflicting") from exc
                if exc.code == "NotImplemented" or exc.status == 501:
                    return self._put_unconditional(key, object_key, data, content_type)
                raise exc.translated from exc.__cause__
        raise AssertionError("unreachable")  # pragma: no cover

    def _put_unconditional(self, key: str, object_key: str, data: bytes, content_type: str) -> str:
        """For stores without If-None-Match: skip the upload when the object exists."""
        if self.exists(key):
            return key
        try:
            self._call("put", key, self._client.put_object, Bucket=self.bucket, Key=object_key, Body=data,
                       ContentType=content_type)
        except _S3Error as exc:
            raise exc.translated from exc.__cause__
        return key

    def get(self, key: str) -> bytes:
        object_key = self._object_key(key)
        try:
            response = self._call("get", key, self._client.get_object, Bucket=self.bucket, Key=object_key)
            return self._read_body(key, response["Body"])
        except _S3Error as exc:
            if exc.code in _MISSING or exc.status == 404:
                raise NotFound(f"no blob {key!r}") from exc.__cause__
            raise exc.translated from exc.__cause__

    def exists(self, key: str) -> bool:
        object_key = self._object_key(key)
        try:
            self._call("head", key, self._client.head_object, Bucket=self.bucket, Key=object_key)
            return True
        except _S3Error as exc:
            if exc.code in _MISSING or exc.status == 404:
                return False
            raise exc.translated from exc.__cause__

    def delete(self, key: str) -> None:
        object_key = self._object_key(key)
        try:  # S3 deletes are idempotent: a missing key is not an error
            self._call("delete", key, self._client.delete_object, Bucket=self.bucket, Key=object_key)
        except _S3Error as exc:
            if exc.code in _MISSING or exc.status == 404:
                return
            raise exc.translated from exc.__cause__

    def path_for(self, key: str) -> Path | None:
        validate_key(key)
        return None  # no local file: callers stream get() bytes

    # --- extras ---------------------------------------------------------------------------------
    def check(self) -> None:
        """Fail fast (startup, readiness) when the bucket is unreachable or not ours to use."""
        try:
            self._call("check", "", self._client.head_bucket, Bucket=self.bucket)
        except _S3Error as exc:
            if exc.code in _MISSING or exc.status == 404:
                raise ConfigurationError(f"S3 bucket {self.bucket!r} does not exist at {self._where}",
                                         param="blob_s3_bucket") from exc.__cause__
            raise exc.translated from exc.__cause__

    def delete_all(self) -> int:
        """Delete every object under this store's prefix (a knowledge base's namespace); returns how many."""
        if not self.prefix:
            raise ConfigurationError("refusing to delete a whole bucket: this blob store has no prefix")
        try:
            return self._delete_prefix()
        except _S3Error as exc:
            raise exc.translated from exc.__cause__

    def _delete_prefix(self) -> int:
        deleted = 0
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix}
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call("list", self.prefix, self._client.list_objects_v2, **kwargs)
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if keys:
                self._call("delete", self.prefix, self._client.delete_objects, Bucket=self.bucket,
                           Delete={"Objects": keys, "Quiet": True})
                deleted += len(keys)
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated"):
                return deleted

    def close(self) -> None:
        """Release the client's connection pool."""
        close = getattr(self._client, "close", None)
        if callable(close):
            close()

    # --- internals ------------------------------------------------------------------------------
    def _object_key(self, key: str) -> str:
        return self.prefix + validate_key(key)

    def _read_body(self, key: str, body: Any) -> bytes:
        try:
            with body:
                return body.read()
        except Exception as exc:  # a connection dropped mid-body (urllib3 / botocore errors)
            raise StoreUnavailable(f"S3 {self._where}: reading blob {key} failed: {exc}") from exc

    def _call(self, op: str, key: str, func: Any, **kwargs: Any) -> Any:
        """Run one client call; translate botocore errors (raised as ``_S3Error`` for inspection)."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionClosedError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
            ProxyConnectionError,
            ReadTimeoutError,
        )

        try:
            return func(**kwargs)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            raise _S3Error(code, status, self._translate(op, key, code, status, exc)) from exc
        except (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError,
                ProxyConnectionError) as exc:
            raise StoreUnavailable(f"S3 endpoint {self._where} unreachable ({op} {self.bucket}): {exc}") from exc
        except (NoCredentialsError, PartialCredentialsError) as exc:
            raise ConfigurationError(
                f"S3 credentials for {self.description} missing or incomplete: {exc}", param="blob_backend"
            ) from exc
        except BotoCoreError as exc:
            raise StoreUnavailable(f"S3 {self._where}: {op} failed: {exc}") from exc

    def _translate(self, op: str, key: str, code: str, status: int, exc: Exception) -> Exception:
        what = f"{op} {key}" if key else op
        if code in _CONFIG or status in (301, 403):
            return ConfigurationError(
                f"S3 {self._where} refused {what} in {self.description}: {code} (check the bucket, prefix, "
                "endpoint and credentials)", param="blob_backend",
            )
        if code in _TRANSIENT or status in (429, 500, 502, 503, 504):
            return StoreUnavailable(f"S3 {self._where} unavailable for {what}: {code or status}")
        return UpstreamError(f"S3 {self._where}: {what} failed: {code or status} {exc}")


class _S3Error(Exception):
    """Internal: a ClientError's code and status plus the vlmrag error it maps to."""

    def __init__(self, code: str, status: int, translated: Exception) -> None:
        super().__init__(code)
        self.code = code
        self.status = status
        self.translated = translated


__all__ = ["S3BlobStore"]
