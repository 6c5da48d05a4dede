"""Unit tests for syncbit.sources.base: URI schemes, the registry and the Source defaults."""

from __future__ import annotations

import sys
import time

import pytest
import trio

from syncbit.errors import ConfigError, MalformedURI, SourceChanged, TemporarySourceError, UnknownScheme
from syncbit.sources import base
from syncbit.sources.base import Source, known_schemes, open_source, scheme_of, source_key


@pytest.mark.parametrize(
    "uri,scheme",
    [
        ("https://host/file.bin", "https"),
        ("HTTP://host/", "http"),
        ("file:///mnt/nfs/set/", "file"),
        ("/mnt/nfs/set", "file"),
        ("./relative/set", "file"),
        ("s3://bucket/prefix/", "s3"),
        ("hf://meta-llama/Llama-3.1-8B@main", "hf"),
    ],
)
def test_scheme_of(uri, scheme):
    assert scheme_of(uri) == scheme


@pytest.mark.parametrize(
    "uri",
    [
        "",                 # nothing
        "   ",              # blanks
        None,               # not a string
        "bucket/prefix",    # no scheme and not a path
        "://host",          # empty scheme
        "1http://host",     # scheme must start with a letter
        "http:/host",       # one slash
    ],
)
def test_scheme_of_rejects_malformed_uris(uri):
    with pytest.raises(MalformedURI):
        scheme_of(uri)


async def test_open_source_with_an_unknown_scheme_names_the_known_ones():
    with pytest.raises(UnknownScheme) as ei:
        await open_source("gopher://host/x")
    assert "gopher" in str(ei.value)
    for s in known_schemes():
        assert s in str(ei.value)


def test_known_schemes_include_the_builtin_sources():
    assert {"file", "http", "https", "s3", "hf"} <= set(known_schemes())


async def test_unknown_source_options_are_refused_with_what_the_source_takes():
    with pytest.raises(ConfigError) as ei:
        await open_source("s3://bucket/p/", {"endpont_url": "http://x"})  # typo
    assert "endpont_url" in str(ei.value) and "endpoint_url, region" in str(ei.value)
    with pytest.raises(ConfigError):
        await open_source("https://host/x", {"region": "eu"})  # http takes none


def test_source_key_separates_options():
    assert source_key("s3://b/p/") == "s3://b/p/"
    assert source_key("s3://b/p/", {"region": "a"}) != source_key("s3://b/p/", {"region": "b"})
    assert source_key("s3://b/p/", {"region": "a", "endpoint_url": "e"}) == \
        source_key("s3://b/p/", (("endpoint_url", "e"), ("region", "a")))


class _Dummy(Source):
    async def resolve(self):
        raise NotImplementedError

    async def read_range(self, entry, offset, length, sink):
        raise NotImplementedError


async def test_source_defaults():
    src = await _Dummy.create("dummy://x")
    assert src.uri == "dummy://x"
    assert src.is_temporary(TemporarySourceError("503"))
    assert not src.is_temporary(SourceChanged("etag changed"))
    assert not src.is_temporary(OSError("raw"))
    await src.aclose()


def test_source_is_abstract():
    with pytest.raises(TypeError):
        Source("x://y")  # type: ignore[abstract]


async def test_a_slow_source_import_does_not_stall_the_trio_thread(tmp_path, monkeypatch):
    """A source module that takes 0.5 s to import (boto3 from a cold disk can)
    is imported in a worker thread: a task ticking every 10 ms on the trio
    thread meanwhile never waits more than a fraction of that."""
    (tmp_path / "slow_source_mod.py").write_text(
        "import time\n"
        "time.sleep(0.5)\n"
        "from syncbit.sources.file import FileSource as SlowSource\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(base._REGISTRY, "slow", ("slow_source_mod", "SlowSource", None))
    monkeypatch.delitem(sys.modules, "slow_source_mod", raising=False)
    gaps = []

    async def tick():
        last = time.monotonic()
        while True:
            await trio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    async with trio.open_nursery() as nursery:
        nursery.start_soon(tick)
        src = await open_source("slow:///data")
        nursery.cancel_scope.cancel()
    assert type(src).__name__ == "FileSource"  # the class the slow module exports
    assert len(gaps) >= 20, gaps  # the ticker ran during the import
    assert max(gaps) < 0.25, max(gaps)


async def test_preloading_a_broken_source_module_only_logs(tmp_path, monkeypatch, caplog):
    """The agent imports the HTTP source at start; a module that fails to
    import (here: raises at import) must not stop the agent, and a dataset
    of that scheme still gets the error when it opens its source."""
    (tmp_path / "broken_source_mod.py").write_text("raise RuntimeError('half-installed')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(base._REGISTRY, "http", ("broken_source_mod", "HttpSource", None))
    monkeypatch.delitem(sys.modules, "broken_source_mod", raising=False)
    with caplog.at_level("WARNING", logger="syncbit.sources.base"):
        await base.preload_sources()
    assert "cannot import broken_source_mod: RuntimeError: half-installed" in caplog.text
    with pytest.raises(RuntimeError, match="half-installed"):
        await open_source("http://127.0.0.1:1/x")
