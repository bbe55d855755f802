#!/usr/bin/env bash
# Runs every test: installs what the tests need, then unit and integration tests against
# the real registry, clients and browser, then the README's demo in smoke mode.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
# Release mode: the streaming tests move gigabytes through TLS, which takes minutes in a
# debug build.
cargo test --release --locked
scripts/run-local.sh --smoke
