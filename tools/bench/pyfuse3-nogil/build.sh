#!/usr/bin/env bash
# Build pyfuse3 3.5.0 from its PyPI sdist with reply-without-gil.patch applied,
# into DEST (default /tmp/pyfuse3-nogil), for measuring only: put DEST first on
# PYTHONPATH, e.g.
#   PYTHONPATH=/tmp/pyfuse3-nogil:. python tools/bench/read_bench.py
# The product installs the unpatched pyfuse3 from PyPI; see docs/performance.md,
# "The reply's copy holds the GIL".
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dest="${1:-/tmp/pyfuse3-nogil}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q cython "setuptools>=78.1.1" setuptools_scm wheel
"$work/venv/bin/pip" download -q --no-deps --no-binary :all: pyfuse3==3.5.0 -d "$work"
tar xzf "$work"/pyfuse3-3.5.0.tar.gz -C "$work"
cd "$work/pyfuse3-3.5.0"
patch -p1 < "$here/reply-without-gil.patch"
rm -f src/pyfuse3/__init__.c  # regenerate it from the patched .pyx
SETUPTOOLS_SCM_PRETEND_VERSION=3.5.0 "$work/venv/bin/pip" install -q --no-deps --no-build-isolation --target "$dest" .
echo "patched pyfuse3 in $dest"
