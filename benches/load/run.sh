#!/usr/bin/env bash
# Load benchmark of the registry pull and push paths through four fronts side
# by side, on loopback. The fronts are the registry itself over TLS ("direct"),
# nginx set up like Harbor's front proxy ("nginx"), the same nginx with larger
# proxy buffers ("nginx-tuned") and harbor-gateway ("gateway").
#
# Usage: benches/load/run.sh            full run, about 10-15 min on 2 cores
#        QUICK=1 benches/load/run.sh    smoke run, under 2 min, no 512 MiB blob
# Environment:
#   GATEWAY_BIN       gateway binary (default $CARGO_TARGET_DIR/release/
#                     harbor-gateway, CARGO_TARGET_DIR defaulting to target);
#                     without it the run goes on with the other three fronts
#   REQUIRE_GATEWAY=1 fail instead when the gateway binary is missing
#   FRONTS            space-separated subset of: direct nginx nginx-tuned gateway
#   ROUNDS            rounds of each small-request workload (default 3, quick 1)
#   LARGE_ROUNDS      rounds of each large-transfer workload (default 3, quick 1)
#   REQUESTS          requests per small-request run through the registry
#                     (default 4000, quick 1000)
#   STATIC_REQUESTS   requests per run through the static upstream, a file
#                     server standing in for the registry so that the front
#                     limits the rate (default 40000, quick 4000)
#   GATEWAY_RUST_LOG  RUST_LOG for the gateway (default info)
#   GATEWAY_CONFIG_EXTRA  TOML text appended to the gateway's configuration,
#                     e.g. $'[runtime]\nworker_threads = 1'
#   NGINX_ACCESS_LOG  1 (default, as Harbor does) or 0 to turn nginx logging off
# Output: benches/load/results/<timestamp>/ (raw tool output, runs.tsv,
# summary.txt); the summary is also printed and copied to results/latest.txt.
set -uo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib/setup.sh
source "$BENCH_DIR/lib/setup.sh"

CHUNK_SIZE=$((8 * 1024 * 1024))
declare -A LAYER_SIZES=([layer4k]=4096 [layer1m]=1048576 [layer64m]=67108864)
if [[ $QUICK == 1 ]]; then
    ROUNDS=${ROUNDS:-1}
    LARGE_ROUNDS=${LARGE_ROUNDS:-1}
    REQUESTS=${REQUESTS:-1000}
    STATIC_REQUESTS=${STATIC_REQUESTS:-4000}
    # A run that overruns its budget skips the workloads still to come.
    BUDGET_SECONDS=${BUDGET_SECONDS:-110}
else
    ROUNDS=${ROUNDS:-3}
    LARGE_ROUNDS=${LARGE_ROUNDS:-3}
    REQUESTS=${REQUESTS:-4000}
    STATIC_REQUESTS=${STATIC_REQUESTS:-40000}
    BUDGET_SECONDS=${BUDGET_SECONDS:-1500}
    LAYER_SIZES[layer512m]=536870912
fi
FRONTS=${FRONTS:-direct nginx nginx-tuned gateway}
# With proxy_buffering off, nginx relays a response through one buffer of
# proxy_buffer_size (4k or 8k by default). With proxy_request_buffering off, it
# relays an upload through client_body_buffer_size. Both are raised here, and
# nginx then requires proxy_buffers and proxy_busy_buffers_size to match.
NGINX_TUNING='proxy_buffer_size 256k; proxy_buffers 4 256k; proxy_busy_buffers_size 256k; client_body_buffer_size 256k;'

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RESULTS=$BENCH_DIR/results/$STAMP
WORK=$(mktemp -d /tmp/harbor-bench.XXXXXX)
# nginx workers run as an unprivileged user and read the static files here.
chmod 755 "$WORK"
mkdir -p "$RESULTS/raw"
START_SECONDS=$SECONDS

cleanup() {
    stop_started
    local log
    cp -f "$WORK"/*.log "$RESULTS/raw/" 2>/dev/null || true
    for log in "$WORK"/*/error.log; do
        [[ -f $log ]] && cp -f "$log" "$RESULTS/raw/$(basename "$(dirname "$log")")-error.log"
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

over_budget() {
    if ((SECONDS - START_SECONDS > BUDGET_SECONDS)); then
        log "time budget of ${BUDGET_SECONDS}s used up; skipping $1"
        return 0
    fi
    return 1
}

# Run WORKLOAD on every front, ROUNDS times, changing which front goes first
# each round so a slow drift of the machine does not favour one front.
each_front() {
    local rounds=$1 workload=$2 kind=$3 units=$4 fn=$5
    shift 5
    local round i n=${#ACTIVE[@]} front
    over_budget "$workload" && return 0
    log "$workload: $rounds round(s) x ${#ACTIVE[@]} fronts"
    for ((round = 1; round <= rounds; round++)); do
        for ((i = 0; i < n; i++)); do
            front=${ACTIVE[$(((i + round - 1) % n))]}
            measure "$front" "$workload" "$round" "$kind" "$units" "$fn" "$@"
        done
    done
}

# Run FUNCTION with @BASE@ in its arguments replaced by the base URL of the
# front being measured, because each_front passes the same arguments to all.
by_front() {
    local fn=$1
    shift
    local base
    base=$(front_base "$FRONT_NOW")
    "$fn" "${@//@BASE@/$base}"
}

write_versions() {
    {
        echo "date: $STAMP"
        echo "mode: $([[ $QUICK == 1 ]] && echo quick || echo full)"
        echo "nproc: $(nproc)"
        echo "cpu: $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
        echo "memory: $(awk '/^MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)"
        echo "kernel: $(uname -r)"
        # Other work on the machine skews every column, and the load average shows it.
        echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
        echo "nginx: $(nginx -v 2>&1)"
        echo "registry: $(docker-registry --version)"
        echo "h2load: $(h2load --version | head -1)"
        echo "ab: $(ab -V | head -1)"
        echo "curl: $(curl --version | head -1)"
        if [[ -x $GATEWAY_BIN ]]; then
            echo "gateway: $GATEWAY_BIN ($(git -C "$REPO_ROOT" log -1 --format='%h %s' 2>/dev/null))"
        fi
        echo "rustc: $(rustc --version 2>/dev/null || echo unknown)"
        echo "requests per small run: $REQUESTS (static upstream: $STATIC_REQUESTS), connections: $CONNECTIONS, rounds: $ROUNDS, large rounds: $LARGE_ROUNDS"
    } >"$RESULTS/versions.txt"
}

main() {
    ensure_tools
    log "results in $RESULTS, scratch in $WORK"
    write_versions

    start_registries
    seed_image
    start_static

    ACTIVE=()
    local front
    for front in $FRONTS; do
        case $front in
            direct) ;;
            nginx) start_nginx nginx "" ;;
            nginx-tuned) start_nginx nginx-tuned "$NGINX_TUNING" ;;
            gateway)
                if ! start_gateway; then
                    [[ ${REQUIRE_GATEWAY:-0} == 1 ]] && die "REQUIRE_GATEWAY=1 but no gateway"
                    continue
                fi
                ;;
            *) die "unknown front '$front' in FRONTS" ;;
        esac
        if UPSTREAM_NOW=registry verify_front "$front" && UPSTREAM_NOW=static verify_static "$front"; then
            ACTIVE+=("$front")
        else
            log "$front failed the correctness check and is left out of the run"
            echo "$front: failed the correctness check" >>"$RESULTS/versions.txt"
        fi
    done
    [[ ${#ACTIVE[@]} -gt 0 ]] || die "no front passed the correctness check"
    log "fronts: ${ACTIVE[*]}"

    local manifest=/v2/$REPO/manifests/bench
    local blob4k=/v2/$REPO/blobs/${DIGEST[layer4k]}
    local blob64m=/v2/$REPO/blobs/${DIGEST[layer64m]}
    # The same small requests against the static upstream, where the front
    # rather than the registry limits the rate.
    UPSTREAM_NOW=static
    each_front 1 warmup rate 500 by_front run_h2load h1 500 "@BASE@$manifest"
    each_front "$ROUNDS" static-manifest-get-h1 rate "$STATIC_REQUESTS" by_front run_h2load h1 "$STATIC_REQUESTS" "@BASE@$manifest"
    each_front "$ROUNDS" static-manifest-get-h2 rate "$STATIC_REQUESTS" by_front run_h2load h2 "$STATIC_REQUESTS" "@BASE@$manifest"
    each_front "$ROUNDS" static-manifest-head-h1 rate "$STATIC_REQUESTS" by_front run_ab_head "$STATIC_REQUESTS" "@BASE@$manifest"
    each_front "$ROUNDS" static-blob4k-get-h2 rate "$STATIC_REQUESTS" by_front run_h2load h2 "$STATIC_REQUESTS" "@BASE@$blob4k"
    UPSTREAM_NOW=registry

    local big=layer512m
    [[ $QUICK == 1 ]] && big=layer64m
    local blob_big=/v2/$REPO/blobs/${DIGEST[$big]} big_bytes=${SIZE[$big]}
    local mib64=${SIZE[layer64m]}

    # Warm each front's upstream pool and the registry's caches.
    each_front 1 warmup rate 500 by_front run_h2load h1 500 "@BASE@$manifest"

    each_front "$ROUNDS" manifest-get-h1 rate "$REQUESTS" by_front run_h2load h1 "$REQUESTS" "@BASE@$manifest"
    each_front "$ROUNDS" manifest-get-h2 rate "$REQUESTS" by_front run_h2load h2 "$REQUESTS" "@BASE@$manifest"
    each_front "$ROUNDS" manifest-head-h1 rate "$REQUESTS" by_front run_ab_head "$REQUESTS" "@BASE@$manifest"
    each_front "$ROUNDS" blob-head-h1 rate "$REQUESTS" by_front run_ab_head "$REQUESTS" "@BASE@$blob4k"
    each_front "$ROUNDS" blob4k-get-h1 rate "$REQUESTS" by_front run_h2load h1 "$REQUESTS" "@BASE@$blob4k"
    each_front "$ROUNDS" blob4k-get-h2 rate "$REQUESTS" by_front run_h2load h2 "$REQUESTS" "@BASE@$blob4k"

    local label=${big#layer}
    each_front "$LARGE_ROUNDS" "blob${label}-get-h1" transfer "$big_bytes" by_front run_curl_get h1 "@BASE@$blob_big"
    each_front "$LARGE_ROUNDS" "blob${label}-get-h2" transfer "$big_bytes" by_front run_curl_get h2 "@BASE@$blob_big"
    each_front "$LARGE_ROUNDS" blob64m-x8-get-h1 transfer $((8 * mib64)) by_front run_curl_get_parallel_h1 8 "@BASE@$blob64m"
    local urls=() i
    for ((i = 0; i < 8; i++)); do urls+=("@BASE@$blob64m"); done
    each_front "$LARGE_ROUNDS" blob64m-x8-get-h2 transfer $((8 * mib64)) by_front run_curl_get h2 "${urls[@]}"

    # Pushes go to another repository. The registry deduplicates by digest, so
    # repeating a push stores nothing new.
    each_front "$LARGE_ROUNDS" "push${label}-monolithic-h1" transfer "$big_bytes" \
        by_front run_push_monolithic h1 "@BASE@" "$WORK/blobs/$big" "${DIGEST[$big]}"
    each_front "$LARGE_ROUNDS" "push${label}-monolithic-h2" transfer "$big_bytes" \
        by_front run_push_monolithic h2 "@BASE@" "$WORK/blobs/$big" "${DIGEST[$big]}"
    split -b "$CHUNK_SIZE" -d "$WORK/blobs/layer64m" "$WORK/blobs/chunk64m."
    each_front "$LARGE_ROUNDS" push64m-chunked transfer "$mib64" \
        by_front run_push_chunked "@BASE@" "${DIGEST[layer64m]}" "$WORK"/blobs/chunk64m.*

    log "finished workloads in $((SECONDS - START_SECONDS))s"
    echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$RESULTS/versions.txt"
    python3 "$BENCH_DIR/report.py" "$RESULTS" | tee "$RESULTS/summary.txt"
    cp "$RESULTS/summary.txt" "$BENCH_DIR/results/latest.txt"
}

main "$@"
