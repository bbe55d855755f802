#!/usr/bin/env bash
# Profile harbor-gateway with perf on the hot pull path: manifest GETs over
# HTTP/1.1 and HTTP/2 through the static upstream (where the gateway, not the
# registry, limits the rate) and one large blob GET through the registry.
# For each workload it writes `perf stat` counters and a flat `perf record`
# profile (cpu-clock samples, no call graphs) by shared object and symbol.
#
# Usage: benches/load/profile.sh   (QUICK=1 uses a 64 MiB blob instead of 512 MiB)
# Output: benches/load/results/profile-<timestamp>/
# Needs perf (Debian package linux-perf) and the same tools as run.sh.
set -uo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$BENCH_DIR/../.." && pwd)
# shellcheck source=lib/common.sh
source "$BENCH_DIR/lib/common.sh"
# shellcheck source=lib/servers.sh
source "$BENCH_DIR/lib/servers.sh"
# shellcheck source=lib/seed.sh
source "$BENCH_DIR/lib/seed.sh"
# shellcheck source=lib/workloads.sh
source "$BENCH_DIR/lib/workloads.sh"

QUICK=${QUICK:-0}
GATEWAY_BIN=${GATEWAY_BIN:-${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/harbor-gateway}
CERT=$REPO_ROOT/certs-test/tls.crt
KEY=$REPO_ROOT/certs-test/tls.key
CA=$REPO_ROOT/certs-test/ca.crt
CONNECTIONS=64
STEP_TIMEOUT=${STEP_TIMEOUT:-120}
REQUESTS=${REQUESTS:-40000}
declare -A LAYER_SIZES=([layer4k]=4096 [layer64m]=67108864)
big=layer64m
if [[ $QUICK != 1 ]]; then
    LAYER_SIZES[layer512m]=536870912
    big=layer512m
fi

RESULTS=$BENCH_DIR/results/profile-$(date -u +%Y%m%dT%H%M%SZ)
WORK=$(mktemp -d /tmp/harbor-profile.XXXXXX)
chmod 755 "$WORK"
mkdir -p "$RESULTS"
trap 'stop_started; rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM

command -v perf >/dev/null 2>&1 || die "perf is missing; install the linux-perf package"
ensure_tools
[[ -x $GATEWAY_BIN ]] || die "gateway binary not found at $GATEWAY_BIN; build it or set GATEWAY_BIN"

# Usage: profile NAME UPSTREAM COMMAND... Runs COMMAND twice: once under
# perf stat (counters only, little overhead) and once under perf record.
profile() {
    local name=$1 upstream=$2 pid
    shift 2
    pid=${FRONT_PID[gateway/$upstream]}
    log "$name: perf stat"
    perf stat -e task-clock,context-switches,cpu-migrations,page-faults -p "$pid" \
        -o "$RESULTS/$name.stat.txt" -- "$@" >"$RESULTS/$name.client.txt" 2>&1
    log "$name: perf record"
    perf record -q -e cpu-clock -F 999 -p "$pid" -o "$WORK/$name.data" -- "$@" >/dev/null 2>&1
    perf report -i "$WORK/$name.data" --stdio --sort dso,symbol --percent-limit 0.7 \
        2>/dev/null | grep -v '^$' >"$RESULTS/$name.report.txt"
    perf report -i "$WORK/$name.data" --stdio --sort dso --percent-limit 0.5 \
        2>/dev/null | grep -v '^$' >"$RESULTS/$name.by-dso.txt"
}

main() {
    start_registries
    seed_image
    start_static
    start_gateway || die "the gateway did not start"
    local manifest=/v2/$REPO/manifests/bench
    local base_static="https://127.0.0.1:${FRONT_PORT[gateway/static]}"
    local base_registry="https://127.0.0.1:${FRONT_PORT[gateway/registry]}"

    # Warm the upstream pool and caches first.
    h2load -n 500 -c "$CONNECTIONS" -H "$MANIFEST_ACCEPT" "$base_static$manifest" >/dev/null 2>&1

    profile manifest-get-h2 static h2load -n "$REQUESTS" -c "$CONNECTIONS" -m 1 \
        -H "$MANIFEST_ACCEPT" "$base_static$manifest"
    profile manifest-get-h1 static h2load --h1 -n "$REQUESTS" -c "$CONNECTIONS" \
        -H "$MANIFEST_ACCEPT" "$base_static$manifest"
    profile "blob${big#layer}-get-h1" registry curl -sS --cacert "$CA" --http1.1 -o /dev/null \
        -w '%{http_code} %{size_download} %{speed_download}\n' \
        "$base_registry/v2/$REPO/blobs/${DIGEST[$big]}"

    log "profiles in $RESULTS"
    for file in "$RESULTS"/*.report.txt; do
        echo "== $(basename "$file" .report.txt)"
        grep -E '^ +[0-9]' "$file" | head -15
    done
}

main "$@"
