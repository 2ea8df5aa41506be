#!/usr/bin/env bash
# Set up Vesalius in ./.venv: Debian's DCMTK and Orthanc (real peers for the tests and operators)
# and the Python package.
# Usage: scripts/setup.sh [extras]   e.g. scripts/setup.sh test,ai
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
# Mesa's EGL and software rasteriser: the node renders the 3D preview off-screen at run time
packages="dcmtk python3-venv libegl1 libegl-mesa0 libgl1-mesa-dri"
# npm installs the dashboard's 3D view (three.js) that the node serves (NodeSource's nodejs
# carries npm; Debian's own splits it into the npm package)
command -v npm >/dev/null || packages="$packages npm"
# the tests also need a real PACS: Orthanc with its Python and DICOMweb plugins
[[ ",$extras," == *",test,"* ]] && packages="$packages orthanc orthanc-python orthanc-dicomweb"
# ... and a real browser for the OHIF and dashboard tests (tests/test_ohif.py, tests/test_dashboard.py)
[[ ",$extras," == *",test,"* ]] && packages="$packages chromium"
# ... and a real PostgreSQL for the shared-store tests (tests/postgres_peer.py runs its own initdb)
[[ ",$extras," == *",test,"* ]] && packages="$packages postgresql"
if ! dpkg -s $packages >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    # installing Orthanc must not start a system Orthanc on the standard ports
    own_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
        $SUDO chmod +x /usr/sbin/policy-rc.d
        own_policy=1
    fi
    # ... nor create a system PostgreSQL cluster: the tests make their own in a temporary folder
    if [ ! -e /etc/postgresql-common/createcluster.conf ]; then
        $SUDO mkdir -p /etc/postgresql-common
        echo "create_main_cluster = false" | $SUDO tee /etc/postgresql-common/createcluster.conf >/dev/null
    fi
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $packages >/dev/null
    [ -z "$own_policy" ] || $SUDO rm -f /usr/sbin/policy-rc.d
fi
# The dashboard's three.js, pinned and integrity-checked by node/api/web/package-lock.json: a runtime
# part of the node (it serves it; no CDN), so installed for every setup, once (then no network)
[ -f node/api/web/node_modules/three/build/three.module.js ] ||
    (cd node/api/web && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
if [[ ",$extras," == *",test,"* ]]; then
    # OHIF Viewer's prebuilt dist, pinned and integrity-checked by tests/ohif/package-lock.json
    # (the lock lists only @ohif/app: its dependencies are built into dist, so none is installed)
    [ -f tests/ohif/node_modules/@ohif/app/dist/index.html ] ||
        (cd tests/ohif && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
fi
# Install only on the first run, when pyproject.toml changed, or when an extra is asked for that is
# not installed yet: a later start needs no network (air-gapped servers) and takes no time.
stamp=".venv/.vesalius-installed"   # line 1: pyproject.toml's digest; line 2: the extras installed
digest="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(sed -n 1p "$stamp")" = "$digest" ]; then
    installed="$(sed -n 2p "$stamp")"
    missing=""
    for extra in ${extras//,/ }; do
        [[ ",$installed," == *",$extra,"* ]] || missing=1
    done
    [ -n "$missing" ] || exit 0
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
if [[ ",$extras," == *",ai,"* ]]; then
    # The CPU build first, so the range in the 'ai' extra is already satisfied (no multi-GB CUDA download).
    .venv/bin/pip install -q "torch==2.13.0"
fi
if [ -n "$extras" ]; then
    .venv/bin/pip install -q -e ".[$extras]"
else
    .venv/bin/pip install -q -e .
fi
printf '%s\n%s\n' "$digest" "$extras" > "$stamp"
