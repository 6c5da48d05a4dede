"""Test beds: one per source, each able to publish a tree of files and to misbehave on demand.

A bed knows how to put files where its source reads them, change one under a
pinned snapshot, list hostile names, point at nothing, present bad
credentials and fail for a while. What a source cannot express (a file name
with a NUL byte on a filesystem) is declared, not faked.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from tests.conftest import write_tree

_counter = itertools.count()

# Names a listing may carry that must be refused, by what they try.
HOSTILE = {
    "parent": "../x",
    "deep-parent": "d/../../x",
    "absolute": "/etc/passwd",
    "nul": "a\x00b",
    "long": "n" * 4096,
}


def unique(prefix: str) -> str:
    return f"{prefix}{os.getpid()}-{next(_counter)}"


class Bed:
    name = ""
    # After a file changes under a pinned snapshot: "pinned" (the source still
    # serves the pinned bytes: versions, commits) or "changed" (SourceChanged).
    on_change = "changed"
    hostile_names: frozenset[str] = frozenset()  # keys of HOSTILE this source can list
    has_credentials = False  # can be given wrong credentials
    has_outages = False  # has a server that can fail for a while

    def options(self) -> dict[str, str]:
        return {}

    def make(self, files: dict[str, bytes]) -> str:
        raise NotImplementedError

    def change(self, uri: str, path: str, data: bytes) -> None:
        raise NotImplementedError

    def hostile(self, kind: str) -> str:
        """A URI whose listing holds a good file and HOSTILE[kind]."""
        raise NotImplementedError

    def missing(self) -> list[str]:
        raise NotImplementedError

    def denied(self, monkeypatch) -> str:
        """A URI plus environment (set through monkeypatch) with bad credentials."""
        raise NotImplementedError

    def outage(self, n: int) -> None:
        """Make the next ``n`` requests fail temporarily."""
        raise NotImplementedError


class FileBed(Bed):
    # A filesystem cannot hold any of the hostile names; root reads every
    # local file, so there are no credentials to get wrong; no server to fail.
    name = "file"

    def __init__(self, root: Path) -> None:
        self.root = root

    def make(self, files):
        d = self.root / unique("set")
        d.mkdir(parents=True)
        write_tree(d, files)
        return f"file://{d}/"

    def change(self, uri, path, data):
        p = Path(uri.removeprefix("file://")) / path
        p.write_bytes(data)
        os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 1_000_000))

    def missing(self):
        return [f"file://{self.root}/no-such-dir/", str(self.root / "no-such-file")]


class HttpBed(Bed):
    has_outages = True  # the origin has no credentials to get wrong: the http source sends none
    name = "http"
    hostile_names = frozenset({"parent", "deep-parent", "absolute", "nul", "long"})

    def __init__(self, root: Path, origin_factory) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.origin = origin_factory(root)

    def make(self, files):
        name = unique("set")
        write_tree(self.root / name, files)
        return f"{self.origin.url}{name}/"

    def change(self, uri, path, data):
        rel = uri.removeprefix(self.origin.url)
        p = self.root / rel / path
        p.write_bytes(data)
        os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 2_000_000_000))  # Last-Modified has 1 s

    def hostile(self, kind):
        uri = self.make({"good.bin": b"good"})
        from urllib.parse import quote

        self.origin.extra_links = [quote(HOSTILE[kind], safe="/")]
        return uri

    def missing(self):
        return [f"{self.origin.url}no-such-dir/", f"{self.origin.url}no-such-file.bin"]

    def outage(self, n):
        self.origin.fail_next = n


class S3Bed(Bed):
    has_credentials = True
    has_outages = True
    name = "s3"
    # Keys are any UTF-8 up to 1,024 bytes: NUL cannot travel in S3's XML and
    # 4,096-byte keys do not exist, so those two are not listable.
    hostile_names = frozenset({"parent", "deep-parent", "absolute"})

    def __init__(self, server, proxy, versioned: bool = False) -> None:
        self.server = server
        self.proxy = proxy
        self.versioned = versioned
        self.on_change = "pinned" if versioned else "changed"
        self.name = "s3-versioned" if versioned else "s3"
        self.client = server.client()
        self.bucket = unique("bed-versioned-" if versioned else "bed-")
        self.client.create_bucket(Bucket=self.bucket)
        if versioned:
            self.client.put_bucket_versioning(Bucket=self.bucket, VersioningConfiguration={"Status": "Enabled"})

    def options(self):
        return {"endpoint_url": self.proxy.url}

    def make(self, files):
        prefix = unique("set")
        for path, data in files.items():
            self.client.put_object(Bucket=self.bucket, Key=f"{prefix}/{path}", Body=data)
        return f"s3://{self.bucket}/{prefix}/"

    def change(self, uri, path, data):
        key = uri.removeprefix(f"s3://{self.bucket}/") + path
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data)

    def hostile(self, kind):
        uri = self.make({"good.bin": b"good"})
        prefix = uri.removeprefix(f"s3://{self.bucket}/")
        self.client.put_object(Bucket=self.bucket, Key=prefix + HOSTILE[kind], Body=b"evil")
        return uri

    def missing(self):
        return ["s3://no-such-bucket-here/x/", f"s3://{self.bucket}/no-such-prefix/",
                f"s3://{self.bucket}/no-such-key.bin"]

    def denied(self, monkeypatch):
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        return self.make({"a.bin": b"a"})

    def outage(self, n):
        self.proxy.fail_next(n)


class HfBed(Bed):
    has_credentials = True
    has_outages = True
    name = "hf"
    on_change = "pinned"  # the snapshot pins a commit sha
    hostile_names = frozenset(HOSTILE)

    def __init__(self, hub, repo_type: str = "model") -> None:
        self.hub = hub
        self.repo_type = repo_type
        self._uris: dict[str, str] = {}

    def make(self, files, private: bool = False):
        repo_id = f"org/{unique('repo')}"
        self.hub.create_repo(repo_id, repo_type=self.repo_type, private=private)
        self.hub.commit(repo_id, files, repo_type=self.repo_type)
        prefix = "datasets/" if self.repo_type == "dataset" else ""
        uri = f"hf://{prefix}{repo_id}"
        self._uris[uri] = repo_id
        return uri

    def change(self, uri, path, data):
        self.hub.commit(self._uris[uri], {path: data}, repo_type=self.repo_type)

    def hostile(self, kind):
        uri = self.make({"good.bin": b"good"})
        self.hub.extra_tree_entries(self._uris[uri], [{"type": "file", "path": HOSTILE[kind], "oid": "0" * 40,
                                                       "size": 4}], repo_type=self.repo_type)
        return uri

    def missing(self):
        return ["hf://nobody/no-such-repo", "hf://datasets/nobody/no-such-set"]

    def denied(self, monkeypatch):
        uri = self.make({"a.bin": b"a"}, private=True)
        self.hub.add_token("hf_right", repos=[self._uris[uri]])
        monkeypatch.setenv("HF_TOKEN", "hf_wrong")
        return uri

    def outage(self, n):
        self.hub.fail_next(n)
