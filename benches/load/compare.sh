#!/usr/bin/env bash
# Compare the CPU per small request of several gateway builds (or one build
# under several environments) with Harbor-like nginx, side by side in one run,
# so that drift of a shared machine hits every variant alike. It runs only the
# small-request workloads of run.sh and prints front CPU per request (utime +
# stime over a fixed request count) with the spread across rounds.
#
# Usage: VARIANTS="base=/tmp/gw-old new=target/release/harbor-gateway" \
#            benches/load/compare.sh
#        VARIANTS="logged=BIN quiet=BIN@RUST_LOG=info,access=off" benches/load/compare.sh
# A variant is NAME=BINARY, optionally followed by @VAR=VALUE settings
# (separated by @) that go into the gateway's environment. TOML text in the
# environment variable CONFIG_<NAME>, if set, is appended to that variant's
# configuration file, for example CONFIG_one=$'[runtime]\nworker_threads = 1'.
# Environment:
#   VARIANTS          required, see above
#   WITH_NGINX        1 (default) adds the Harbor-like nginx front, 0 leaves it out
#   ROUNDS            rounds per workload (default 3)
#   STATIC_REQUESTS   requests per run through the static upstream (default 20000)
#   REQUESTS          requests per run through the registry (default 2000)
#   WORKLOADS         space-separated subset of the workload names below
#   GATEWAY_RUST_LOG  RUST_LOG for every variant (default info)
# Output: benches/load/results/compare-<timestamp>/ (runs.tsv, summary.txt).
set -uo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib/setup.sh
source "$BENCH_DIR/lib/setup.sh"

[[ -n ${VARIANTS:-} ]] || die "VARIANTS is not set; set it, for example VARIANTS=\"base=/tmp/gw-old new=target/release/harbor-gateway\""
ROUNDS=${ROUNDS:-3}
STATIC_REQUESTS=${STATIC_REQUESTS:-20000}
REQUESTS=${REQUESTS:-2000}
ALL_WORKLOADS="static-manifest-get-h1 static-manifest-get-h2 static-manifest-head-h1 static-blob4k-get-h2
manifest-get-h1 manifest-get-h2 blob-head-h1 blob4k-get-h1 blob4k-get-h2"
WORKLOADS=${WORKLOADS:-$ALL_WORKLOADS}
# seed_image needs a 4 KiB layer for the blob workloads; nothing here is large.
declare -A LAYER_SIZES=([layer4k]=4096 [layer1m]=1048576)

RESULTS=$BENCH_DIR/results/compare-$(date -u +%Y%m%dT%H%M%SZ)
WORK=$(mktemp -d /tmp/harbor-compare.XXXXXX)
chmod 755 "$WORK"
mkdir -p "$RESULTS/raw"
trap 'stop_started; rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM

# Usage: start_variant NAME BINARY[@VAR=VALUE...]. Starts the variant through
# start_gateway, with a wrapper that execs the binary (so the pid is the
# gateway's) under the extra environment, and files it under NAME.
start_variant() {
    local name=$1 spec=$2 binary settings=() upstream wrapper
    IFS=@ read -r -a settings <<<"$spec"
    binary=$(realpath "${settings[0]}") || die "variant $name: binary not found at ${settings[0]}"
    settings=("${settings[@]:1}")
    wrapper=$WORK/run-$name.sh
    printf '#!/bin/sh\nexec env %s %q "$@"\n' "${settings[*]}" "$binary" >"$wrapper"
    chmod +x "$wrapper"
    local extra=CONFIG_$name
    GATEWAY_BIN=$wrapper GATEWAY_CONFIG_EXTRA=${!extra:-} start_gateway || die "variant $name did not start"
    for upstream in "${!UP_PORT[@]}"; do
        FRONT_PID[$name/$upstream]=${FRONT_PID[gateway/$upstream]}
        FRONT_PORT[$name/$upstream]=${FRONT_PORT[gateway/$upstream]}
        unset "FRONT_PID[gateway/$upstream]" "FRONT_PORT[gateway/$upstream]"
    done
}

# Usage: run_workload NAME REQUESTS. Runs one workload against FRONT_NOW.
run_workload() {
    local workload=$1 base manifest blob4k
    base=$(front_base "$FRONT_NOW")
    manifest=$base/v2/$REPO/manifests/bench
    blob4k=$base/v2/$REPO/blobs/${DIGEST[layer4k]}
    case $workload in
        *manifest-get-h1) run_h2load h1 "$2" "$manifest" ;;
        *manifest-get-h2) run_h2load h2 "$2" "$manifest" ;;
        *manifest-head-h1) run_ab_head "$2" "$manifest" ;;
        *blob-head-h1) run_ab_head "$2" "$blob4k" ;;
        *blob4k-get-h1) run_h2load h1 "$2" "$blob4k" ;;
        *blob4k-get-h2) run_h2load h2 "$2" "$blob4k" ;;
        *) die "unknown workload $workload" ;;
    esac
}

main() {
    ensure_tools
    start_registries
    seed_image
    start_static

    ACTIVE=()
    if [[ ${WITH_NGINX:-1} == 1 ]]; then
        start_nginx nginx ""
        ACTIVE+=(nginx)
    fi
    local variant
    for variant in $VARIANTS; do
        start_variant "${variant%%=*}" "${variant#*=}"
        ACTIVE+=("${variant%%=*}")
    done
    log "fronts: ${ACTIVE[*]}"

    local workload count round i n=${#ACTIVE[@]} front
    for UPSTREAM_NOW in static registry; do
        # Warm each front's upstream pool and the upstream's caches.
        for front in "${ACTIVE[@]}"; do
            FRONT_NOW=$front RAW=$WORK/warmup run_workload manifest-get-h1 500
        done
        for workload in $WORKLOADS; do
            if [[ $UPSTREAM_NOW == static ]]; then
                [[ $workload == static-* ]] || continue
                count=$STATIC_REQUESTS
            else
                [[ $workload == static-* ]] && continue
                count=$REQUESTS
            fi
            log "$workload: $ROUNDS round(s) x $n fronts, $count requests"
            for ((round = 1; round <= ROUNDS; round++)); do
                for ((i = 0; i < n; i++)); do
                    front=${ACTIVE[$(((i + round - 1) % n))]}
                    measure "$front" "$workload" "$round" rate "$count" run_workload "$workload" "$count"
                done
            done
        done
    done
    summarize | tee "$RESULTS/summary.txt"
}

# Front CPU per request (median, min-max) and requests/s per workload and front.
summarize() {
    python3 - "$RESULTS/runs.tsv" "$(getconf CLK_TCK)" "${ACTIVE[@]}" <<'EOF'
import statistics, sys
path, ticks_per_second, fronts = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
runs = {}
for line in open(path):
    front, workload, _round, _kind, units, _raw, wall_us, cpu, _up, _hwm, rc, others = line.rstrip("\n").split("\t")
    if rc != "0":
        continue
    units, wall_us, cpu = int(units), int(wall_us), int(cpu)
    seconds = wall_us / 1e6
    runs.setdefault((workload, front), []).append(
        (cpu * 1e6 / ticks_per_second / units, units / seconds, int(others) / ticks_per_second / seconds))
workloads = list(dict.fromkeys(workload for workload, _ in runs))
print(f"{'workload':<26}" + "".join(f"{front:>26}" for front in fronts))
for workload in workloads:
    for label, column in (("CPU us/req", 0), ("req/s", 1), ("other load", 2)):
        cells = []
        for front in fronts:
            values = [run[column] for run in runs.get((workload, front), [])]
            if not values:
                cells.append(f"{'-':>26}")
                continue
            cells.append(f"{statistics.median(values):>10.1f} [{min(values):.1f}-{max(values):.1f}]".rjust(26))
        title = workload if column == 0 else "  " + label
        print(f"{title:<26}" + "".join(cells) + (f"  {label}" if column == 0 else ""))
print("CPU us/req: front utime+stime per request, median [min-max] over rounds; "
      "other load: cores busy outside front, upstream and client.")
EOF
}

main "$@"
