#!/usr/bin/env bash
# Install what Syncbit needs on a Debian machine, as root, into ./.venv.
#   tools/install.sh demo   # the package and what the demo reads tensors with
#   tools/install.sh test   # the package and the test tools
# Debian packages are installed only when missing (after one apt-get update).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"

missing=()
pkgs=(fuse3 libfuse3-dev pkg-config gcc)
# The tests also build a multi-host bed from network namespaces (ip, tc, nsenter),
# and run a real OCI registry with the tools that read images (skopeo, umoci, containerd).
[ "$extras" = test ] && pkgs+=(iproute2 util-linux docker-registry skopeo umoci containerd)
for pkg in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
# A Python with venv and headers (pyfuse3 may compile against libfuse3).
if ! command -v python3 >/dev/null \
   || ! python3 -c 'import venv, ensurepip, sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null; then
  missing+=(python3 python3-venv python3-dev)
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
spec="."
[ -n "$extras" ] && spec=".[$extras]"
.venv/bin/python -m pip install -q -e "$spec" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c 'import syncbit, pyfuse3' # fails loudly if the install did not work
