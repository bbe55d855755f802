# Loads the benchmark libraries and the settings every benchmark script shares.
# The caller sets BENCH_DIR to benches/load first.
# shellcheck shell=bash

REPO_ROOT=$(cd "$BENCH_DIR/../.." && pwd)
# shellcheck source=common.sh
source "$BENCH_DIR/lib/common.sh"
# shellcheck source=servers.sh
source "$BENCH_DIR/lib/servers.sh"
# shellcheck source=seed.sh
source "$BENCH_DIR/lib/seed.sh"
# shellcheck source=workloads.sh
source "$BENCH_DIR/lib/workloads.sh"

QUICK=${QUICK:-0}
GATEWAY_BIN=${GATEWAY_BIN:-${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/harbor-gateway}
CERT=$REPO_ROOT/certs-test/tls.crt
KEY=$REPO_ROOT/certs-test/tls.key
CA=$REPO_ROOT/certs-test/ca.crt
CONNECTIONS=64
STEP_TIMEOUT=${STEP_TIMEOUT:-120}
