"""`S3ObjectStore`: objects in one S3/MinIO bucket (URL `s3://bucket[/prefix]?endpoint=host:port`).

With a prefix every object lives under `prefix/` in the bucket (a bucket shared with other
data or other deployments); keys, listings and errors are the store's own keys, without it.

Talks to any S3-compatible endpoint through the `minio` client with path-style addressing
(`http://host:port/bucket/key`): virtual-host style needs DNS for every bucket, which MinIO in a
cluster or on a laptop does not have. A single PUT is atomic in S3, so `put` needs no temp key.

Failing fast matters more than riding out blips here: a Celery task or gRPC call that hangs on
a dead endpoint holds a worker and the caller's deadline. So the urllib3 pool gets a short
connect timeout and few retries, and every transport error becomes `StorageUnavailable`
naming the endpoint. The bucket is created on first use, not in the constructor, so building
a store (e.g. at service start) never touches the network.

Compare-and-set (`put_if`) is S3's conditional write: PUT with `If-Match: <ETag>` (or
`If-None-Match: *` to create), answered 412 PreconditionFailed (409 ConditionalRequestConflict
while another conditional write to the key is in flight) when another writer got there first.
AWS S3, MinIO (>= 2024) and moto support it.
"""

from __future__ import annotations

import io
import re
import threading
from collections.abc import Iterator, Iterable
from contextlib import contextmanager

import certifi
import urllib3
from minio import Minio
from minio.credentials import IamAwsProvider
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, S3Error, ServerError
from urllib3.util import Retry, Timeout

from personalkv.ids import InvalidIdError
from personalkv.storage.base import (
    ObjectNotFound,
    ObjectStore,
    PreconditionFailed,
    StorageError,
    StorageUnavailable,
    check_key,
    check_prefix,
)

_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_NOT_FOUND_CODES = {"NoSuchKey", "NotFound", "ResourceNotFound"}
_CONFLICT_CODES = {"PreconditionFailed", "ConditionalRequestConflict"}
_DELETE_BATCH = 1000  # S3 DeleteObjects limit


class S3ObjectStore(ObjectStore):
    def __init__(
        self,
        bucket: str,
        endpoint: str,
        access_key: str | None = None,
        secret_key: str | None = None,
        *,
        secure: bool = False,
        region: str = "us-east-1",
        connect_timeout_s: float = 2.0,
        read_timeout_s: float = 10.0,
        retries: int = 1,
        cert_check: bool = True,
        ca_file: str | None = None,
        prefix: str = "",
    ) -> None:
        if _BUCKET_RE.fullmatch(bucket) is None:
            raise InvalidIdError(f"bucket name {bucket!r} is not a valid S3 bucket name")
        prefix = prefix.strip("/")
        self.bucket = bucket
        self.endpoint = endpoint
        #: what every object key starts with in the bucket: "" or "<prefix>/"
        self.root = check_key(prefix) + "/" if prefix else ""
        self.url = (f"s3://{bucket}{'/' + prefix if prefix else ''}?endpoint={endpoint}"
                    f"&secure={str(secure).lower()}")
        http = urllib3.PoolManager(
            timeout=Timeout(connect=connect_timeout_s, read=read_timeout_s),
            retries=Retry(
                total=retries,
                backoff_factor=0.1,
                status_forcelist=(500, 502, 503, 504),
            ),
            maxsize=16,
            cert_reqs="CERT_REQUIRED" if (secure and cert_check) else "CERT_NONE",
            ca_certs=ca_file or certifi.where(),  # StorageSettings.ca_file
        )
        self._client = Minio(
            endpoint,
            access_key=access_key,
            secret_key=secret_key,
            # No static keys: the pod's identity (IRSA web-identity token, ECS/EC2 role).
            credentials=None if access_key else IamAwsProvider(),
            secure=secure,
            region=region,
            http_client=http,
        )
        self._client.disable_virtual_style_endpoint()
        self._region = region
        self._bucket_ready = False
        self._bucket_lock = threading.Lock()

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Translate minio/urllib3 exceptions into the storage error types."""
        try:
            yield
        except S3Error as exc:
            if exc.code in _NOT_FOUND_CODES:
                raise ObjectNotFound(f"{what}: not found in {self.url}") from None
            if exc.code in _CONFLICT_CODES:
                raise PreconditionFailed(f"{what}: {exc.code}") from None
            raise StorageError(f"{what} failed on {self.url}: {exc.code}: {exc.message}") from exc
        except ServerError as exc:
            raise StorageUnavailable(f"{what}: S3 server error on {self.url}: {exc}") from exc
        except InvalidResponseError as exc:
            raise StorageError(f"{what}: unexpected response from {self.url}: {exc}") from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise StorageUnavailable(
                f"{what}: S3 endpoint {self.endpoint} is unreachable or not answering ({reason})"
            ) from exc

    def _ensure_bucket(self) -> None:
        if self._bucket_ready:
            return
        with self._bucket_lock, self._errors(f"create bucket {self.bucket}"):
            if self._bucket_ready:
                return
            if not self._client.bucket_exists(self.bucket):
                try:
                    self._client.make_bucket(self.bucket, location=self._region)
                except S3Error as exc:  # another process won the race
                    if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise
            self._bucket_ready = True

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        check_key(key)
        self._ensure_bucket()
        with self._errors(f"put {key}"):
            self._client.put_object(
                self.bucket, self.root + key, io.BytesIO(data), len(data), content_type=content_type
            )

    def get(self, key: str) -> bytes:
        check_key(key)
        self._ensure_bucket()
        with self._errors(f"get {key}"):
            response = self._client.get_object(self.bucket, self.root + key)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        check_key(key)
        self._ensure_bucket()
        with self._errors(f"get {key}"):
            response = self._client.get_object(self.bucket, self.root + key)
            try:
                return response.read(), response.headers.get("ETag", "").strip('"')
            finally:
                response.close()
                response.release_conn()

    def put_if(self, key: str, data: bytes, version: str | None,
               content_type: str = "application/octet-stream") -> None:
        check_key(key)
        self._ensure_bucket()
        condition = {"If-None-Match": "*"} if version is None else {"If-Match": f'"{version}"'}
        with self._errors(f"conditional put {key}"):
            # minio's public put_object takes no request headers; _put_object is the single
            # PUT it wraps (the same call, plus our precondition).
            self._client._put_object(self.bucket, self.root + key, data,
                                     headers={"Content-Type": content_type, **condition})

    def exists(self, key: str) -> bool:
        check_key(key)
        self._ensure_bucket()
        try:
            with self._errors(f"stat {key}"):
                self._client.stat_object(self.bucket, self.root + key)
            return True
        except ObjectNotFound:
            return False

    def delete(self, key: str) -> None:
        check_key(key)
        self._ensure_bucket()
        with self._errors(f"delete {key}"):
            # S3 answers a DELETE of a missing key 204
            self._client.remove_object(self.bucket, self.root + key)

    def list(self, prefix: str = "") -> Iterator[str]:
        check_prefix(prefix)
        self._ensure_bucket()
        with self._errors(f"list {prefix or '/'}"):
            for obj in self._client.list_objects(self.bucket, prefix=self.root + prefix,
                                                 recursive=True):
                if not obj.is_dir:
                    yield obj.object_name[len(self.root):]

    def list_children(self, prefix: str = "") -> Iterator[str]:
        check_prefix(prefix)
        self._ensure_bucket()
        with self._errors(f"list {prefix or '/'}"):
            for obj in self._client.list_objects(self.bucket, prefix=self.root + prefix,
                                                 recursive=False):
                if obj.is_dir:
                    yield obj.object_name[len(self.root + prefix) :].rstrip("/")

    def delete_prefix(self, prefix: str) -> int:
        if check_prefix(prefix) == "":
            raise InvalidIdError("delete_prefix refuses the empty prefix")
        keys = list(self.list(prefix))
        for start in range(0, len(keys), _DELETE_BATCH):
            self._delete_batch(keys[start : start + _DELETE_BATCH])
        return len(keys)

    def _delete_batch(self, keys: Iterable[str]) -> None:
        with self._errors("delete objects"):
            objects = [DeleteObject(self.root + key) for key in keys]
            errors = list(self._client.remove_objects(self.bucket, objects))
        if errors:
            first = errors[0]
            raise StorageError(
                f"could not delete {len(errors)} object(s) from {self.url}, "
                f"first {first.name}: {first.code} {first.message}"
            )

    def close(self) -> None:
        self._client._http.clear()  # minio exposes no public close
