"""The http source lists directories from the index pages real servers write.

Our own test origin writes nginx-style pages; these tests run the source
against other servers: ``python -m http.server`` itself (a separate process,
which also ignores Range and sends no ETag), and a stdlib server whose
directory pages follow Apache ``mod_autoindex`` (FancyIndexing: a table,
column-sorting links ``?C=N;O=D``, an absolute "Parent Directory" link, icon
images) and nginx ``autoindex`` (``<pre>``, ``../``, names shortened in the
text but whole in the href). The tree has spaces, unicode, an empty file and
nested directories, so quoting is checked against what those servers emit.
"""

from __future__ import annotations

import html
import io
import os
import re
import subprocess
import sys
import urllib.parse
import urllib.request
from functools import partial
from http.server import SimpleHTTPRequestHandler
from pathlib import Path
from urllib.parse import quote

import pytest

from syncbit.sources import open_source

from ..servers.threaded import serving

TREE = {
    "README.md": b"# a dataset\n",
    "model card.md": b"card " * 100,
    "caf\u00e9/men\u00fc.csv": b"a,b\n1,2\n" * 1000,
    "shards/model-00001-of-00002.safetensors": os.urandom(300_000),
    "shards/model-00002-of-00002.safetensors": os.urandom(123_457),
    "shards/a-rather-long-file-name-that-nginx-shortens-in-its-listing.bin": b"x" * 77,
    "deep/a/b/c/empty": b"",
    # Servers escape these differently (Apache leaves "(", ")" and "+" alone).
    "model (v2)+x/shards/w.bin": b"w" * 10,
}


def _make_tree(root: Path) -> None:
    for rel, data in TREE.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


async def _check_listing_and_bytes(url: str, under: str = "") -> None:
    """The source at ``url`` (the tree's directory ``under``) lists that subtree and reads its bytes."""
    want = {k[len(under):]: v for k, v in TREE.items() if k.startswith(under)}
    src = await open_source(url)
    try:
        snap = await src.resolve()
        assert {f.path: f.size for f in snap.files} == {k: len(v) for k, v in want.items()}
        for entry in snap.files:
            got = bytearray()

            async def sink(chunk, got=got):
                got.extend(chunk)

            # A range in the middle, not only whole files: offsets must hold
            # whether or not the server honours Range.
            off = len(want[entry.path]) // 3
            await src.read_range(entry, off, len(want[entry.path]) - off, sink)
            assert bytes(got) == want[entry.path][off:], entry.path
    finally:
        await src.aclose()


@pytest.fixture
def http_server_module(tmp_path):
    """``python -m http.server`` on loopback, in its own process."""
    root = tmp_path / "root"
    _make_tree(root)
    proc = subprocess.Popen([sys.executable, "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", str(root)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        # "Serving HTTP on 127.0.0.1 port 41234 (http://127.0.0.1:41234/) ..."
        line = proc.stdout.readline()
        port = int(line.split(" port ")[1].split()[0])
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()


async def test_python_http_server_directory(http_server_module):
    # http.server answers every GET with 200 and the whole file: Range ignored.
    with urllib.request.urlopen(urllib.request.Request(http_server_module + "README.md",
                                                       headers={"Range": "bytes=2-3"})) as r:
        assert r.status == 200
    await _check_listing_and_bytes(http_server_module)
    await _check_listing_and_bytes(http_server_module + "shards/", under="shards/")


def _apache_escape(path: str) -> str:
    """What Apache's ap_os_escape_path writes: lowercase hex, and "$-_.+!*'(),:@&=~" left as they are."""
    return re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), quote(path, safe="$-_.+!*'(),:@&=/~"))


def _apache_page(path: str, names: list[tuple[str, bool]]) -> str:
    parent = _apache_escape(path.rstrip("/").rsplit("/", 1)[0] + "/")
    rows = [
        '<tr><th valign="top"><img src="/icons/blank.gif" alt="[ICO]"></th><th><a href="?C=N;O=D">Name</a></th>'
        '<th><a href="?C=M;O=A">Last modified</a></th><th><a href="?C=S;O=A">Size</a></th>'
        '<th><a href="?C=D;O=A">Description</a></th></tr>',
        '<tr><th colspan="5"><hr></th></tr>',
        f'<tr><td valign="top"><img src="/icons/back.gif" alt="[PARENTDIR]"></td><td><a href="{parent}">Parent Directory</a>'
        '</td><td>&nbsp;</td><td align="right">  - </td><td>&nbsp;</td></tr>',
    ]
    for name, is_dir in names:
        icon, alt = ("folder.gif", "[DIR]") if is_dir else ("unknown.gif", "[   ]")
        href = _apache_escape(name) + ("/" if is_dir else "")
        rows.append(f'<tr><td valign="top"><img src="/icons/{icon}" alt="{alt}"></td><td><a href="{href}">'
                    f'{html.escape(name)}{"/" if is_dir else ""}</a></td><td align="right">2026-11-29 10:00  </td>'
                    '<td align="right">1.2K</td><td>&nbsp;</td></tr>')
    return ('<!DOCTYPE HTML PUBLIC "-//W3C//DTD HTML 3.2 Final//EN">\n<html>\n <head>\n'
            f'  <title>Index of {html.escape(path)}</title>\n </head>\n <body>\n<h1>Index of {html.escape(path)}</h1>\n'
            '  <table>\n' + "\n".join(rows) + '\n   <tr><th colspan="5"><hr></th></tr>\n</table>\n'
            '<address>Apache/2.4.62 (Debian) Server at 127.0.0.1 Port 80</address>\n</body></html>\n')


def _nginx_page(path: str, names: list[tuple[str, bool]]) -> str:
    lines = ['<a href="../">../</a>']
    for name, is_dir in names:
        shown = name + ("/" if is_dir else "")
        if len(shown) > 50:
            shown = shown[:47] + "..&gt;"  # nginx shortens the text, never the href
        else:
            shown = html.escape(shown)
        lines.append(f'<a href="{quote(name)}{"/" if is_dir else ""}">{shown}</a>'
                     f'{" " * max(1, 51 - len(name))}29-Nov-2026 10:00                   -')
    return (f"<html>\r\n<head><title>Index of {html.escape(path)}</title></head>\r\n<body>\r\n"
            f"<h1>Index of {html.escape(path)}</h1><hr><pre>" + "\r\n".join(lines) + "\r\n</pre><hr></body>\r\n</html>\r\n")


class _StyledIndex(SimpleHTTPRequestHandler):
    """The stdlib file server with Apache or nginx directory pages."""

    style = "apache"

    def list_directory(self, path):
        names = sorted((e.name, e.is_dir()) for e in os.scandir(path))
        url_path = urllib.parse.unquote(self.path.split("?", 1)[0])
        page = (_apache_page if self.style == "apache" else _nginx_page)(url_path, names).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html;charset=UTF-8")
        self.send_header("Content-Length", str(len(page)))
        self.end_headers()
        return io.BytesIO(page)

    def log_message(self, *args):
        pass


@pytest.fixture(params=[("apache", "pub/ds/"), ("nginx", "pub/ds/"), ("apache", ""), ("nginx", "")],
                ids=["apache", "nginx", "apache-at-root", "nginx-at-root"])
def styled_server(request, tmp_path):
    """A server of the tree at ``/pub/ds/``, or at its root (nginx writes "../" there too)."""
    style, under = request.param
    root = tmp_path / "root"
    (root / under).mkdir(parents=True, exist_ok=True)
    _make_tree(root / under)
    handler = type("Handler", (_StyledIndex,), {"style": style})
    with serving(partial(handler, directory=str(root))) as url:
        yield f"{url}/{under}"


async def test_apache_and_nginx_index_pages(styled_server):
    with urllib.request.urlopen(styled_server) as r:
        page = r.read().decode()
    # The pages do carry what the source must skip: sorting links, the parent.
    assert ("?C=N;O=D" in page and "Parent Directory" in page) or 'href="../"' in page
    await _check_listing_and_bytes(styled_server)
