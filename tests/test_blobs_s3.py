"""S3BlobStore against moto's standalone S3 server (a real HTTP server on loopback, boto3 unmodified).

The shared blob-store suite from tests/test_blobs.py runs here on the S3 backend too, plus what only
S3 has: conditional puts racing, stores without If-None-Match, errors naming the endpoint. Tests that
use the server are marked ``subprocess`` (left out of ``make test-fast``).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from retriever.blobs import BlobStore, blob_key
from retriever.blobs_s3 import S3BlobStore
from retriever.errors import ConfigurationError, InvalidInput, NotFound, StoreUnavailable
from server.wiring import build_blob_store
from tests.support.settings import bare_settings
from tests.test_blobs import BlobStoreContract

BUCKET = "vlmrag-test"
DUMMY_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    """moto's S3 server on an ephemeral loopback port (starts in well under a second)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def aws_env() -> Iterator[None]:
    """Dummy credentials through the environment, as boto3 finds real ones in production."""
    with pytest.MonkeyPatch.context() as mp:
        for key in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
            mp.delenv(key, raising=False)
        for key, value in DUMMY_AWS_ENV.items():
            mp.setenv(key, value)
        yield


@pytest.fixture(scope="module")
def s3_client(moto_endpoint: str, aws_env: None) -> Any:
    """One real boto3 client for the module (building one costs ~0.5 s of model loading)."""
    client = boto3.client("s3", endpoint_url=moto_endpoint)
    client.create_bucket(Bucket=BUCKET)
    return client


@pytest.fixture
def s3_store(s3_client: Any) -> S3BlobStore:
    """A fresh prefix in one bucket per test: the tests never see each other's objects."""
    return S3BlobStore(BUCKET, f"t-{uuid.uuid4().hex[:8]}/", client=s3_client)


# --- the shared suite -------------------------------------------------------------------------
@pytest.mark.subprocess
class TestS3BlobStore(BlobStoreContract):
    """Every behaviour the local backend promises (tests/test_blobs.py), on S3."""

    @pytest.fixture
    def blob_store(self, s3_store: S3BlobStore) -> BlobStore:
        return s3_store


# --- S3-specific ------------------------------------------------------------------------------
@pytest.mark.subprocess
def test_implements_protocol_and_describes_itself(s3_store: S3BlobStore, moto_endpoint: str) -> None:
    assert isinstance(s3_store, BlobStore)
    assert s3_store.description.startswith(f"s3://{BUCKET}/t-")
    described = S3BlobStore(BUCKET, "p", endpoint_url=moto_endpoint, client=s3_store._client).description
    assert described == f"s3://{BUCKET}/p/ at {moto_endpoint}"
    assert s3_store.path_for(blob_key(b"x", ".png")) is None


@pytest.mark.subprocess
def test_objects_live_under_prefix_with_content_type(s3_store: S3BlobStore, s3_client: Any) -> None:
    key = s3_store.put(b"\x89PNG fake", ".png")
    head = s3_client.head_object(Bucket=BUCKET, Key=s3_store.prefix + key)
    assert head["ContentType"] == "image/png"
    assert head["ContentLength"] == len(b"\x89PNG fake")
    listed = s3_client.list_objects_v2(Bucket=BUCKET, Prefix=s3_store.prefix)["Contents"]
    assert [o["Key"] for o in listed] == [s3_store.prefix + key]


@pytest.mark.subprocess
def test_put_is_conditional_and_never_overwrites(s3_store: S3BlobStore, s3_client: Any) -> None:
    """An existing object under the key is kept as is: the store relies on If-None-Match, not luck."""
    data = b"original bytes"
    key = blob_key(data, ".jpg")
    s3_client.put_object(Bucket=BUCKET, Key=s3_store.prefix + key, Body=b"written first by someone else")
    assert s3_store.put(data, ".jpg") == key
    assert s3_store.get(key) == b"written first by someone else"


@pytest.mark.subprocess
def test_concurrent_writers_of_same_bytes_all_succeed(s3_store: S3BlobStore, s3_client: Any) -> None:
    data = uuid.uuid4().bytes * 1000
    keys: list[str] = []
    errors: list[Exception] = []

    def writer() -> None:
        try:
            keys.append(s3_store.put(data, ".bin"))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=writer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(set(keys)) == 1 and len(keys) == 8
    assert s3_store.get(keys[0]) == data
    assert s3_client.list_objects_v2(Bucket=BUCKET, Prefix=s3_store.prefix)["KeyCount"] == 1


class _Wrapper:
    """Delegates to a real boto3 client; ``put_object`` first runs ``on_put`` (which may raise)."""

    def __init__(self, client: Any, on_put: Any) -> None:
        self._client, self._on_put, self.puts = client, on_put, 0

    def put_object(self, **kwargs: Any) -> Any:
        self.puts += 1
        self._on_put(self.puts, kwargs)
        return self._client.put_object(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def _client_error(code: str, status: int, op: str = "PutObject") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, op)


@pytest.mark.subprocess
def test_store_without_conditional_writes_falls_back(s3_store: S3BlobStore, s3_client: Any) -> None:
    """Some S3-compatible servers answer 501 to If-None-Match: head-then-put keeps puts idempotent."""

    def refuse_conditional(count: int, kwargs: dict[str, Any]) -> None:
        if "IfNoneMatch" in kwargs:
            raise _client_error("NotImplemented", 501)

    client = _Wrapper(s3_client, refuse_conditional)
    store = S3BlobStore(BUCKET, s3_store.prefix, client=client)
    key = store.put(b"payload", ".png")
    assert store.get(key) == b"payload"
    assert client.puts == 2  # refused conditional + plain
    assert store.put(b"payload", ".png") == key
    assert client.puts == 3  # refused conditional; the head found it, no second upload


@pytest.mark.subprocess
def test_conflicting_concurrent_upload_is_retried(s3_store: S3BlobStore, s3_client: Any) -> None:
    def conflict_once(count: int, kwargs: dict[str, Any]) -> None:
        if count == 1:
            raise _client_error("ConditionalRequestConflict", 409)

    client = _Wrapper(s3_client, conflict_once)
    store = S3BlobStore(BUCKET, s3_store.prefix, client=client)
    key = store.put(b"contended", "")
    assert client.puts == 2 and store.get(key) == b"contended"


@pytest.mark.subprocess
def test_missing_and_invalid_keys(s3_store: S3BlobStore) -> None:
    missing = blob_key(b"never stored", ".png")
    with pytest.raises(NotFound):
        s3_store.get(missing)
    assert s3_store.exists(missing) is False
    s3_store.delete(missing)  # not an error
    for bad in ("../etc/passwd", "ab/../../x", "", "AB/" + "0" * 62):
        with pytest.raises(InvalidInput):
            s3_store.get(bad)


def test_unreachable_endpoint_is_store_unavailable_naming_it(aws_env: None) -> None:
    endpoint = "http://127.0.0.1:9"  # discard port: connection refused
    store = S3BlobStore(BUCKET, "p/", endpoint_url=endpoint, connect_timeout_s=0.5)
    with pytest.raises(StoreUnavailable, match="127.0.0.1:9"):
        store.get(blob_key(b"x", ""))
    with pytest.raises(StoreUnavailable, match="127.0.0.1:9"):
        store.put(b"x", "")


@pytest.mark.subprocess
def test_missing_bucket_is_a_configuration_error(moto_endpoint: str, aws_env: None) -> None:
    store = S3BlobStore("no-such-bucket-here", "p/", endpoint_url=moto_endpoint)
    with pytest.raises(ConfigurationError, match="no-such-bucket-here"):
        store.check()
    with pytest.raises(ConfigurationError, match="NoSuchBucket"):
        store.put(b"x", ".png")


def test_missing_credentials_fail_at_construction(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    for key in [*DUMMY_AWS_ENV, "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"]:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(ConfigurationError, match="AWS_ACCESS_KEY_ID"):
        S3BlobStore(BUCKET, "p/", endpoint_url="http://127.0.0.1:9")


def test_bucket_required() -> None:
    with pytest.raises(ConfigurationError, match="VLMRAG_BLOB_S3_BUCKET"):
        S3BlobStore("", "p/")


@pytest.mark.subprocess
def test_prefix_normalised(s3_client: Any) -> None:
    assert S3BlobStore(BUCKET, "/a/b", client=s3_client).prefix == "a/b/"
    assert S3BlobStore(BUCKET, "", client=s3_client).prefix == ""


@pytest.mark.subprocess
def test_wiring_builds_s3_store_from_settings(moto_endpoint: str, s3_client: Any, tmp_path: Any) -> None:
    """The real client path: settings -> build_blob_store -> boto3 with credentials from the env."""
    s3_client.create_bucket(Bucket="vlmrag-wired")
    settings = bare_settings(
        data_dir=tmp_path, blob_backend="s3", blob_s3_bucket="vlmrag-wired",
        blob_s3_prefix="kb/", blob_s3_endpoint_url=moto_endpoint,
    )
    store = build_blob_store(settings)
    assert isinstance(store, S3BlobStore) and store.prefix == "kb/"
    key = store.put(b"wired", ".png")
    assert s3_client.get_object(Bucket="vlmrag-wired", Key=f"kb/{key}")["Body"].read() == b"wired"
