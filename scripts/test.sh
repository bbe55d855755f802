#!/usr/bin/env bash
# Runs every test: installs what the tests need, then unit and integration tests against
# the real registry, clients and browser, then the README's demo in smoke mode.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
# Release mode: the streaming tests move gigabytes through TLS, which takes minutes in a
# debug build.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --release --locked 2>&1 | tee "$log"
scripts/run-local.sh --smoke

# One closing line for the whole run, summed over cargo's per-binary results.
awk '/^test result:/ { passed += $4; failed += $6 } END { printf "tests: %d passed, %d failed\n", passed, failed }' "$log" \
  > "${TEST_SUMMARY:-/dev/stdout}"
