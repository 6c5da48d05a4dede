"""Unit tests for the s3:// and hf:// URI parsers: what they accept and what they refuse."""

from __future__ import annotations

import pytest

from syncbit.errors import HostileName, MalformedURI
from syncbit.sources.hf import parse_hf
from syncbit.sources.http import HttpSource
from syncbit.sources.s3 import parse_s3_uri


@pytest.mark.parametrize("uri,expected", [
    ("s3://bucket/models/llama-3-8b/", ("bucket", "models/llama-3-8b/")),
    ("s3://bucket/models/one.bin", ("bucket", "models/one.bin")),
    ("s3://bucket", ("bucket", "")),
    ("s3://bucket/", ("bucket", "")),
    ("s3://my.bucket-1/a b/é", ("my.bucket-1", "a b/é")),
])
def test_s3_uris(uri, expected):
    assert parse_s3_uri(uri) == expected


@pytest.mark.parametrize("uri", [
    "s3://", "s3:///key", "s3://bu/cket?x=1", "s3://bucket/k#frag", "s3://bu@cket/x", "s3://b\x00/x",
    "s3://bucket/a\x00b",
])
def test_malformed_s3_uris(uri):
    with pytest.raises(MalformedURI):
        parse_s3_uri(uri)


@pytest.mark.parametrize("uri,expected", [
    ("hf://meta-llama/Llama-3.1-8B", ("model", "meta-llama/Llama-3.1-8B", None, "")),
    ("hf://meta-llama/Llama-3.1-8B@main", ("model", "meta-llama/Llama-3.1-8B", "main", "")),
    ("hf://models/org/repo@v1.0/sub/dir", ("model", "org/repo", "v1.0", "sub/dir")),
    ("hf://datasets/org/set", ("dataset", "org/set", None, "")),
    ("hf://datasets/org/set@refs/convert/parquet/default", ("dataset", "org/set", "refs/convert/parquet", "default")),
    ("hf://org/repo@" + "a" * 40, ("model", "org/repo", "a" * 40, "")),
])
def test_hf_uris(uri, expected):
    assert parse_hf(uri) == expected


@pytest.mark.parametrize("uri", [
    "hf://", "hf://just-a-name", "hf://org/repo@", "hf://spaces/org/app", "hf://buckets/org/b",
    "hf://org/re po", "hf://org/repo//x",
])
def test_malformed_hf_uris(uri):
    with pytest.raises(MalformedURI):
        parse_hf(uri)


def test_hf_subdir_escaping_the_repo_is_refused():
    with pytest.raises((HostileName, MalformedURI)):
        parse_hf("hf://org/repo@main/../../etc")


@pytest.mark.parametrize("uri,rev,expected", [
    ("hf://org/repo@main", "v2", "hf://org/repo@v2"),
    ("hf://org/repo", "release/2.0", "hf://org/repo@release%2F2.0"),
    ("hf://datasets/org/set@v1/sub/dir", "v2", "hf://datasets/org/set@v2/sub/dir"),
])
def test_dataset_update_revision_rewrites_hf_uris(uri, rev, expected):
    from syncbit.server.controlplane import with_revision

    assert with_revision(uri, rev) == expected
    assert parse_hf(expected)[2] == rev


def test_revisions_are_refused_for_sources_without_them():
    from syncbit.errors import ConfigError
    from syncbit.server.controlplane import with_revision

    with pytest.raises(ConfigError):
        with_revision("s3://bucket/prefix/", "v2")


@pytest.mark.parametrize("uri", [
    "http://[::1",          # unclosed IPv6 literal
    "http://[zz]/x",        # not an address
    "http://host:abc/x",    # port not a number
    "http://host:99999/x",  # port out of range
    "http:///x",            # no host
    "https://:8080/x",      # no host, a port
])
def test_malformed_http_urls_are_malformed_uri(uri):
    # Before, the first two raised a bare ValueError (HTTP 500 from the agent,
    # exit 1) and a bad port SourceError (exit 3); all are exit 5.
    with pytest.raises(MalformedURI, match="malformed URL"):
        HttpSource(uri)


def test_credentials_in_an_http_url_are_refused_without_echoing_them():
    # They were neither sent nor kept out of error messages: now refused,
    # and the message shows neither the user name nor the password.
    with pytest.raises(MalformedURI, match="credentials") as e:
        HttpSource("http://alice:s3cr3t@127.0.0.1:8080/data/")
    assert "s3cr3t" not in str(e.value) and "alice" not in str(e.value)
    with pytest.raises(MalformedURI):
        HttpSource("https://token@example.invalid/x")
