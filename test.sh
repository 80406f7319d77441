#!/usr/bin/env bash
# Installs what the test suite needs, then runs it: formatting, lints (warnings are errors),
# and every test of the workspace. Safe to run again; on a machine that has everything it
# installs nothing.
set -euo pipefail
cd "$(dirname "$0")"

# A C compiler for crates with C parts (ring). Debian packages only; nothing else is fetched.
packages=()
command -v cc >/dev/null 2>&1 || packages+=(build-essential)
command -v pkg-config >/dev/null 2>&1 || packages+=(pkg-config)
# The OpenAPI fuzzer of tests/control_schemathesis.rs runs in a virtual environment.
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || packages+=(python3-venv)
if [ ${#packages[@]} -gt 0 ]; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${packages[@]}"
fi

# schemathesis, pinned, from PyPI into .venv-schemathesis/ (ignored by git); reinstalled only
# when the pinned version changes.
SCHEMATHESIS_VERSION=4.32.5
if ! .venv-schemathesis/bin/st --version 2>/dev/null | grep -qx "st, version $SCHEMATHESIS_VERSION"; then
    python3 -m venv .venv-schemathesis
    .venv-schemathesis/bin/pip install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
