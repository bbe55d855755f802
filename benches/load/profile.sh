#!/usr/bin/env bash
# Profile harbor-gateway with perf on the hot pull path: manifest GETs over
# HTTP/1.1 and HTTP/2 through the static upstream (where the gateway, not the
# registry, limits the rate) and one large blob GET through the registry.
# For each workload it writes `perf stat` counters and a flat `perf record`
# profile (cpu-clock samples, no call graphs) by shared object and symbol.
# It also counts the system calls of the gateway and of the Harbor-like nginx
# front (master and workers) under the same load.
#
# Usage: benches/load/profile.sh   (QUICK=1 uses a 64 MiB blob instead of 512 MiB)
# Output: benches/load/results/profile-<timestamp>/
# Needs perf (Debian package linux-perf) and the same tools as run.sh.
set -uo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib/setup.sh
source "$BENCH_DIR/lib/setup.sh"

REQUESTS=${REQUESTS:-40000}
# Through the real registry, which serves about 1000 requests/s on 2 cores.
REGISTRY_REQUESTS=${REGISTRY_REQUESTS:-3000}
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

command -v perf >/dev/null 2>&1 || die "perf not found; install the linux-perf package"
ensure_tools
[[ -x $GATEWAY_BIN ]] || die "gateway binary not found at $GATEWAY_BIN; build it or set GATEWAY_BIN"

SYSCALLS=raw_syscalls:sys_enter
for call in read write readv writev recvfrom sendto recvmsg sendmsg epoll_wait futex sched_yield; do
    SYSCALLS+=",syscalls:sys_enter_$call"
done

# Usage: count_syscalls NAME FRONT UPSTREAM COMMAND... Counts the system
# calls of FRONT's processes while COMMAND runs against it.
count_syscalls() {
    local name=$1 front=$2 upstream=$3 pids
    shift 3
    pids=$(pid_family "${FRONT_PID[$front/$upstream]}" | paste -sd,)
    log "$name: system calls of $front"
    perf stat -e "$SYSCALLS" -p "$pids" -o "$RESULTS/$name.syscalls-$front.txt" -- "$@" \
        >"$RESULTS/$name.client-$front.txt" 2>&1
}

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
    start_nginx nginx ""
    local manifest=/v2/$REPO/manifests/bench front base_static base_registry

    for front in gateway nginx; do
        base_static="https://127.0.0.1:${FRONT_PORT[$front/static]}"
        base_registry="https://127.0.0.1:${FRONT_PORT[$front/registry]}"
        # Warm the upstream pool and caches first.
        h2load -n 500 -c "$CONNECTIONS" -H "$MANIFEST_ACCEPT" "$base_static$manifest" >/dev/null 2>&1
        count_syscalls manifest-get-h2 "$front" static h2load -n "$REQUESTS" -c "$CONNECTIONS" -m 1 \
            -H "$MANIFEST_ACCEPT" "$base_static$manifest"
        count_syscalls manifest-get-h1 "$front" static h2load --h1 -n "$REQUESTS" -c "$CONNECTIONS" \
            -H "$MANIFEST_ACCEPT" "$base_static$manifest"
        count_syscalls registry-blob4k-get-h1 "$front" registry h2load --h1 -n "$REGISTRY_REQUESTS" \
            -c "$CONNECTIONS" "$base_registry/v2/$REPO/blobs/${DIGEST[layer4k]}"
        count_syscalls registry-manifest-get-h2 "$front" registry h2load -n "$REGISTRY_REQUESTS" \
            -c "$CONNECTIONS" -H "$MANIFEST_ACCEPT" "$base_registry$manifest"
        count_syscalls "blob${big#layer}-get-h1" "$front" registry curl -sS --cacert "$CA" --http1.1 \
            -o /dev/null "$base_registry/v2/$REPO/blobs/${DIGEST[$big]}"
    done

    base_static="https://127.0.0.1:${FRONT_PORT[gateway/static]}"
    base_registry="https://127.0.0.1:${FRONT_PORT[gateway/registry]}"
    profile manifest-get-h2 static h2load -n "$REQUESTS" -c "$CONNECTIONS" -m 1 \
        -H "$MANIFEST_ACCEPT" "$base_static$manifest"
    profile manifest-get-h1 static h2load --h1 -n "$REQUESTS" -c "$CONNECTIONS" \
        -H "$MANIFEST_ACCEPT" "$base_static$manifest"
    profile "blob${big#layer}-get-h1" registry curl -sS --cacert "$CA" --http1.1 -o /dev/null \
        -w '%{http_code} %{size_download} %{speed_download}\n' \
        "$base_registry/v2/$REPO/blobs/${DIGEST[$big]}"

    log "profiles in $RESULTS"
    for file in "$RESULTS"/*.report.txt; do
        echo "== $(basename "$file" .report.txt): top symbols of the gateway"
        grep -E '^ +[0-9]' "$file" | head -15 | sed 's/ *- *- *$//'
    done
    for file in "$RESULTS"/*.syscalls-*.txt; do
        echo "== $(basename "$file" .txt): system calls"
        grep -E '^ +[0-9,]+ +(raw_)?syscalls' "$file" | awk '$1 != "0"'
    done
}

main "$@"
