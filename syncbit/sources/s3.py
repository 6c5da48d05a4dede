"""``s3://bucket/prefix/`` (a tree) and ``s3://bucket/key`` (one object), with boto3.

boto3 is blocking, so every call runs in a worker thread under this module's
own capacity limiter. Endpoint, region and credentials come the standard AWS
ways (``AWS_ENDPOINT_URL``, ``AWS_PROFILE``, ``AWS_ACCESS_KEY_ID``..., config
files) and may be overridden per dataset with the options ``endpoint_url`` and
``region``. With a custom endpoint (MinIO, Ceph, rclone, moto) requests use
path-style addressing. Without any credentials requests go unsigned, as
``aws --no-sign-request`` does, so public buckets work.

Pinning: a versioned bucket pins each object by VersionId; any bucket pins it
by ETag and size, and every ranged GET carries ``If-Match`` so that an object
overwritten under the snapshot fails with SourceChanged instead of mixing two
versions. botocore's own retries are off: the shared Retrier and the caller's
deadline decide.

File-object ids are (endpoint, bucket, ETag, size): two prefixes or two
snapshots holding the same object content share its blocks. They are scoped
to one bucket on purpose: an ETag is computed by the server (MD5 for simple
uploads), which is good enough inside one owner's bucket but not a digest to
trust across owners.
"""

from __future__ import annotations

import logging
import os
import time
from urllib.parse import urlsplit

import trio

from ..errors import (
    AccessDenied, MalformedURI, SourceChanged, SourceError, SourceNotFound, TemporarySourceError,
)
from ..model import FileEntry, Snapshot, safe_relpath, short_hash
from .base import Sink, Source, chunk_size
from .retry import retry_within

log = logging.getLogger(__name__)

_LIMITER = trio.CapacityLimiter(32)  # threads inside boto3 calls, all S3 sources together
_CHUNK = 4 * 2**20
_RESOLVE_DEADLINE = 60.0
_TEMPORARY_CODES = {
    "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "RequestTimeTooSkewed",
    "Throttling", "ThrottlingException", "RequestLimitExceeded", "500", "502", "503", "504",
}
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "TokenRefreshRequired",
    "InvalidClientTokenId", "AuthorizationHeaderMalformed",
}


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """(bucket, key or prefix) of ``s3://bucket/key``; the key may be empty or end with ``/``."""
    parts = urlsplit(uri)
    if parts.scheme.lower() != "s3":
        raise MalformedURI(f"not an s3:// URI: {uri!r}")
    if parts.query or parts.fragment:
        raise MalformedURI(f"S3 URI {uri!r}: query strings and fragments are not supported")
    bucket = parts.netloc
    if not bucket:
        raise MalformedURI(f"malformed S3 URI {uri!r}: expected s3://BUCKET/PREFIX/ or s3://BUCKET/KEY")
    if not all(c.isalnum() or c in "-._" for c in bucket) or len(bucket) > 255:
        raise MalformedURI(f"malformed S3 URI {uri!r}: {bucket!r} is not a bucket name")
    key = parts.path[1:] if parts.path.startswith("/") else parts.path
    if "\0" in key:
        raise MalformedURI(f"NUL byte in S3 URI {uri!r}")
    return bucket, key


class S3Source(Source):
    schemes = ("s3",)
    option_keys = frozenset({"endpoint_url", "region"})

    def __init__(self, uri: str, options=None) -> None:
        super().__init__(uri, options)
        self.bucket, self.key = parse_s3_uri(uri)
        self.client = None
        self.endpoint = ""

    @classmethod
    async def create(cls, uri: str, options=None) -> S3Source:
        src = cls(uri, options)
        # Creating a client reads config files and may query instance metadata.
        await trio.to_thread.run_sync(src._make_client, limiter=_LIMITER)
        return src

    def _make_client(self) -> None:
        import boto3
        import botocore
        from botocore.config import Config

        session = boto3.session.Session()
        endpoint = self.options.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL_S3") \
            or os.environ.get("AWS_ENDPOINT_URL")
        config = {
            "retries": {"total_max_attempts": 1},
            "max_pool_connections": 32,
            "connect_timeout": 10,
            "read_timeout": 30,
            "tcp_keepalive": True,
        }
        if endpoint:
            config["s3"] = {"addressing_style": "path"}
        try:
            has_credentials = session.get_credentials() is not None
        except botocore.exceptions.BotoCoreError as e:  # a broken profile, say
            raise AccessDenied(f"cannot load AWS credentials for {self.uri}: {e}") from None
        if not has_credentials:
            log.info("no AWS credentials found: requests to %s go unsigned", self.uri)
            config["signature_version"] = botocore.UNSIGNED
        try:
            self.client = session.client(
                "s3", endpoint_url=endpoint or None, region_name=self.options.get("region") or None,
                config=Config(**config),
            )
        except (ValueError, botocore.exceptions.BotoCoreError) as e:
            raise MalformedURI(f"cannot use S3 endpoint {endpoint!r} for {self.uri}: {e}") from None
        self.endpoint = self.client.meta.endpoint_url

    async def aclose(self) -> None:
        if self.client is not None:
            self.client.close()

    async def _call(self, fn, *args):
        """Run a blocking boto3 call in a worker thread; botocore errors are translated here."""
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=_LIMITER)
        except Exception as e:
            raise self._translate(e) from e

    def _translate(self, e: Exception) -> Exception:
        import botocore.exceptions as bx
        import urllib3.exceptions

        if isinstance(e, SourceError):
            return e
        where = f"s3://{self.bucket}/{self.key}"
        if isinstance(e, bx.ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            msg = err.get("Message") or code
            if code == "NoSuchBucket":
                return SourceNotFound(f"S3 bucket {self.bucket!r} does not exist at {self.endpoint}")
            if code in _CREDENTIAL_CODES:
                return AccessDenied(f"S3 rejected the credentials for {where} ({code}: {msg}); "
                                    "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE")
            if code in ("AccessDenied", "AllAccessDisabled", "403") or status == 403:
                return AccessDenied(f"access denied to {where} at {self.endpoint} ({code}: {msg})")
            if code in _TEMPORARY_CODES or status >= 500 or status == 429:
                return TemporarySourceError(f"S3 error for {where}: {code} {msg}")
            return SourceError(f"S3 error for {where}: {code} {msg}")
        if isinstance(e, bx.NoCredentialsError | bx.PartialCredentialsError):
            return AccessDenied(f"no usable AWS credentials for {where}: {e}")
        if isinstance(e, bx.EndpointConnectionError | bx.ConnectionClosedError | bx.ReadTimeoutError
                      | bx.ConnectTimeoutError | bx.IncompleteReadError | bx.ResponseStreamingError
                      | urllib3.exceptions.HTTPError | ConnectionError | TimeoutError):
            return TemporarySourceError(f"S3 request for {where} failed: {e}")
        if isinstance(e, bx.BotoCoreError):
            return SourceError(f"S3 request for {where} failed: {e}")
        return e

    # -- listing ---------------------------------------------------------

    async def resolve(self) -> Snapshot:
        return await retry_within(_RESOLVE_DEADLINE, self.is_temporary, self._resolve_once, what=f"listing {self.uri}")

    async def _resolve_once(self) -> Snapshot:
        versioned = await self._versioned()
        entries: list[FileEntry] = []
        if self.key and not self.key.endswith("/"):
            obj = await self._call(self._head_object, self.key)
            if obj is not None:
                name = self.key.rsplit("/", 1)[-1]
                version = obj.get("VersionId") if versioned else None
                entries.append(self._entry(safe_relpath(name), self.key, obj["ContentLength"], obj["ETag"],
                                           None if version == "null" else version, obj["LastModified"]))
        if not entries:
            prefix = self.key if not self.key or self.key.endswith("/") else self.key + "/"
            listing = self._list_versions if versioned else self._list_objects
            for key, size, etag, version, modified in await self._call(listing, prefix):
                if key.endswith("/") and size == 0:
                    continue  # a "folder" placeholder made by consoles and some tools
                rel = safe_relpath(key[len(prefix):])
                entries.append(self._entry(rel, key, size, etag, version, modified))
            if not entries:
                raise SourceNotFound(f"no objects at s3://{self.bucket}/{self.key} ({self.endpoint})")
        entries.sort(key=lambda f: f.path)
        revision = short_hash(*(f"{f.path}\0{f.size}\0{f.validator}" for f in entries))
        return Snapshot(uri=self.uri, revision=revision, files=tuple(entries), created=time.time(),
                        options=tuple(sorted(self.options.items())))

    async def _versioned(self) -> bool:
        try:
            status = await self._call(lambda: self.client.get_bucket_versioning(Bucket=self.bucket))
        except AccessDenied:
            # Read-only users often lack s3:GetBucketVersioning; ETags still pin.
            return False
        return status.get("Status") in ("Enabled", "Suspended")

    def _head_object(self, key: str) -> dict | None:
        import botocore.exceptions as bx

        try:
            return self.client.head_object(Bucket=self.bucket, Key=key)
        except bx.ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def _list_objects(self, prefix: str) -> list[tuple]:
        out = []
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        for page in pages:
            for o in page.get("Contents", ()):
                out.append((o["Key"], o["Size"], o["ETag"], None, o["LastModified"]))
        return out

    def _list_versions(self, prefix: str) -> list[tuple]:
        out = []
        pages = self.client.get_paginator("list_object_versions").paginate(Bucket=self.bucket, Prefix=prefix)
        for page in pages:
            # A delete marker as the latest version means the object is gone.
            for o in page.get("Versions", ()):
                if o.get("IsLatest"):
                    vid = o.get("VersionId")
                    out.append((o["Key"], o["Size"], o["ETag"], None if vid in (None, "null") else vid,
                                o["LastModified"]))
        return out

    def _entry(self, rel: str, key: str, size: int, etag: str, version: str | None, modified) -> FileEntry:
        validator = f"etag={etag}" + (f",version={version}" if version else "")
        return FileEntry(
            path=rel, size=int(size), locator=key, validator=validator,
            file_object=short_hash("s3", self.endpoint, self.bucket, etag, str(size)),
            mtime=modified.timestamp() if modified else 0.0,
        )

    # -- bytes -----------------------------------------------------------

    async def read_range(self, entry: FileEntry, offset: int, length: int, sink: Sink) -> None:
        if length > 0:
            await self._call(self._read_range_sync, entry, offset, length, sink)

    def _read_range_sync(self, entry: FileEntry, offset: int, length: int, sink: Sink) -> None:
        import botocore.exceptions as bx

        etag, _, version = entry.validator.removeprefix("etag=").partition(",version=")
        kwargs = {"Bucket": self.bucket, "Key": entry.locator, "IfMatch": etag,
                  "Range": f"bytes={offset}-{offset + length - 1}"}
        if version:
            kwargs["VersionId"] = version
        try:
            resp = self.client.get_object(**kwargs)
        except bx.ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("PreconditionFailed", "412", "InvalidRange", "416"):
                raise SourceChanged(f"s3://{self.bucket}/{entry.locator} changed since the snapshot was pinned "
                                    f"({code})") from None
            if code in ("NoSuchKey", "NoSuchVersion", "404"):
                raise SourceChanged(f"s3://{self.bucket}/{entry.locator} disappeared from the source since "
                                    "the snapshot") from None
            raise
        body = resp["Body"]
        try:
            total = (resp.get("ContentRange") or "").rpartition("/")[2]
            if total.isdigit() and int(total) != entry.size:
                raise SourceChanged(f"s3://{self.bucket}/{entry.locator} is {total} bytes now, "
                                    f"{entry.size} in the snapshot")
            remaining = length
            piece = chunk_size(sink, _CHUNK)
            while remaining:
                chunk = body.read(min(remaining, piece))
                if not chunk:
                    raise TemporarySourceError(f"s3://{self.bucket}/{entry.locator}: body ended {remaining} "
                                               "bytes short of the requested range")
                trio.from_thread.run(sink, chunk)
                remaining -= len(chunk)
        finally:
            body.close()
