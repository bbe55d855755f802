# Workloads and the measurement wrapper. Each client call has its own timeout,
# so a hung front costs at most STEP_TIMEOUT seconds per run.
# shellcheck shell=bash

# The upstream ("registry" or "static") that the next workloads go through.
UPSTREAM_NOW=registry

# Print the pids whose CPU and memory count for FRONT: nginx's master and its
# workers, the one process of the others.
front_pids() {
    pid_family "${FRONT_PID[$1/$UPSTREAM_NOW]}"
}

front_base() {
    echo "https://127.0.0.1:${FRONT_PORT[$1/$UPSTREAM_NOW]}"
}

# Usage: measure FRONT WORKLOAD ROUND KIND UNITS FUNCTION [ARGS...]
# Runs FUNCTION with RAW set to this run's raw-output prefix. It appends one
# line to runs.tsv with the wall time, the CPU ticks of the front and of its
# upstream, the front's peak RSS (VmHWM reset just before the run) and the
# CPU ticks of other processes. UNITS is the request count for request-rate
# kinds or the bytes moved for transfer kinds.
measure() {
    local front=$1 workload=$2 round=$3 kind=$4 units=$5
    shift 5
    local pids up_pids cpu0 cpu1 up0 up1 t0 t1 rc hwm busy0 busy1 client0 client1 others
    read -r -a up_pids <<< "$(pid_family "${UP_PID[$UPSTREAM_NOW]}" | tr '\n' ' ')"
    # For "direct" the front is the upstream, so no upstream CPU is counted.
    [[ $front == direct ]] && up_pids=()
    RAW=$RESULTS/raw/$workload.$front.r$round
    FRONT_NOW=$front
    if ! servers_alive "$front"; then
        printf '%s\t%s\t%s\t%s\t%s\t%s\t0\t0\t0\t0\t99\t0\n' \
            "$front" "$workload" "$round" "$kind" "$units" "$RAW" >>"$RESULTS/runs.tsv"
        return 0
    fi
    read -r -a pids <<< "$(front_pids "$front" | tr '\n' ' ')"

    reset_peak_rss "${pids[@]}"
    cpu0=$(cpu_ticks "${pids[@]}")
    up0=$(cpu_ticks "${up_pids[@]}")
    client_ticks
    client0=$CLIENT_TICKS
    busy0=$(machine_busy_ticks)
    t0=$(date +%s%N)
    "$@"
    rc=$?
    t1=$(date +%s%N)
    busy1=$(machine_busy_ticks)
    client_ticks
    client1=$CLIENT_TICKS
    read -r -a pids <<< "$(front_pids "$front" | tr '\n' ' ')"
    cpu1=$(cpu_ticks "${pids[@]}")
    up1=$(cpu_ticks "${up_pids[@]}")
    hwm=$(peak_rss_kib "${pids[@]}")
    # CPU that neither the front, its upstream nor the client used: other
    # work on the machine, which makes the run less trustworthy.
    others=$(((busy1 - busy0) - (cpu1 - cpu0) - (up1 - up0) - (client1 - client0)))
    ((others < 0)) && others=0

    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
        "$front" "$workload" "$round" "$kind" "$units" "$RAW" "$(( (t1 - t0) / 1000 ))" \
        "$((cpu1 - cpu0))" "$((up1 - up0))" "$hwm" "$rc" "$others" >>"$RESULTS/runs.tsv"
    [[ $rc -eq 0 ]] || log "  $workload on $front round $round: client exited $rc (see $RAW.*)"
}

# Check that FRONT and its upstream still run. A server that died mid-run
# would otherwise show up as a fast front that returns 502.
servers_alive() {
    local pid
    for pid in "${FRONT_PID[$1/$UPSTREAM_NOW]}" "${UP_PID[$UPSTREAM_NOW]}"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            log "  $1/$UPSTREAM_NOW: process $pid is gone; run recorded as failed (exit 99)"
            return 1
        fi
    done
}

# h2load GETs. Usage: run_h2load h1|h2 REQUESTS URL. The request count bounds
# the run because nginx closes an HTTP/2 connection after keepalive_requests.
run_h2load() {
    local proto=$1 requests=$2 url=$3 flags=()
    [[ $proto == h1 ]] && flags=(--h1)
    timeout "$STEP_TIMEOUT" h2load "${flags[@]}" -n "$requests" -c "$CONNECTIONS" -m 1 \
        -H "$MANIFEST_ACCEPT" --log-file="$RAW.log" "$url" >"$RAW.out" 2>"$RAW.err"
}

# ApacheBench HEADs with keep-alive (wrk 4.1 and h2load --h1 hang on HEAD).
run_ab_head() {
    local requests=$1 url=$2
    timeout "$STEP_TIMEOUT" ab -q -k -i -n "$requests" -c "$CONNECTIONS" \
        -H "$MANIFEST_ACCEPT" -e "$RAW.csv" "$url" >"$RAW.out" 2>"$RAW.err"
}

CURL_FORMAT='%{http_code} %{size_download} %{size_upload} %{time_total} %{http_version}\n'

# One GET per URL; with -Z and --http2 curl multiplexes them on one connection.
run_curl_get() {
    local proto=$1
    shift
    local flags=(--http1.1)
    [[ $proto == h2 ]] && flags=(--http2)
    if [[ $# -gt 1 && $proto == h2 ]]; then
        flags+=(-Z --parallel-max "$#")
    fi
    local url outputs=()
    for url in "$@"; do outputs+=(-o /dev/null); done
    timeout "$STEP_TIMEOUT" curl -sS --cacert "$CA" "${flags[@]}" -w "$CURL_FORMAT" \
        "${outputs[@]}" "$@" >"$RAW.out" 2>"$RAW.err"
}

# COUNT HTTP/1.1 GETs on COUNT connections at once, one curl process each.
run_curl_get_parallel_h1() {
    local count=$1 url=$2 i rc=0 pids=()
    : >"$RAW.out"
    for ((i = 0; i < count; i++)); do
        timeout "$STEP_TIMEOUT" curl -sS --cacert "$CA" --http1.1 -w "$CURL_FORMAT" \
            -o /dev/null "$url" >>"$RAW.out" 2>>"$RAW.err" &
        pids+=($!)
    done
    for i in "${pids[@]}"; do wait "$i" || rc=$?; done
    return "$rc"
}

# Start an upload session and print its absolute Location.
upload_location() {
    local base=$1 location
    location=$(curl -sS --cacert "$CA" -D - -o /dev/null -X POST "$base/v2/$REPO-push/blobs/uploads/" |
        awk 'tolower($1) == "location:" {print $2}' | tr -d '\r')
    [[ -n $location ]] || return 1
    [[ $location == /* ]] && location=$base$location
    echo "$location"
}

with_query() {
    if [[ $1 == *\?* ]]; then echo "$1&$2"; else echo "$1?$2"; fi
}

# Monolithic push: POST, then a single PUT carrying the whole blob.
run_push_monolithic() {
    local proto=$1 base=$2 file=$3 digest=$4 location version=--http2
    [[ $proto == h1 ]] && version=--http1.1
    location=$(upload_location "$base") || { echo "POST failed" >"$RAW.err"; return 1; }
    timeout "$STEP_TIMEOUT" curl -sS -f --cacert "$CA" "$version" -H 'Expect:' \
        -H 'Content-Type: application/octet-stream' -w "$CURL_FORMAT" -o /dev/null \
        -T "$file" "$(with_query "$location" "digest=$digest")" >"$RAW.out" 2>"$RAW.err"
}

# Chunked push: POST, one PATCH per chunk file with its Content-Range, then an
# empty PUT with ?digest=. Each PATCH follows the Location of the previous one.
run_push_chunked() {
    local base=$1 digest=$2
    shift 2
    local location offset=0 chunk size headers
    location=$(upload_location "$base") || { echo "POST failed" >"$RAW.err"; return 1; }
    : >"$RAW.out"
    for chunk in "$@"; do
        size=$(stat -c %s "$chunk")
        headers=$(timeout "$STEP_TIMEOUT" curl -sS -f --cacert "$CA" -X PATCH -H 'Expect:' \
            -H 'Content-Type: application/octet-stream' \
            -H "Content-Range: $offset-$((offset + size - 1))" \
            -D - -o /dev/null -T "$chunk" "$location" 2>>"$RAW.err") || return 1
        location=$(awk 'tolower($1) == "location:" {print $2}' <<<"$headers" | tr -d '\r')
        [[ $location == /* ]] && location=$base$location
        offset=$((offset + size))
    done
    timeout "$STEP_TIMEOUT" curl -sS -f --cacert "$CA" -X PUT -w "$CURL_FORMAT" -o /dev/null \
        "$(with_query "$location" "digest=$digest")" >>"$RAW.out" 2>>"$RAW.err"
}

# Check that FRONT serves the seeded image byte for byte before timing it.
verify_front() {
    local front=$1 base got
    base=$(front_base "$front")
    got=$(curl -sS -f --cacert "$CA" -H "$MANIFEST_ACCEPT" "$base/v2/$REPO/manifests/bench" | sha256sum | cut -d' ' -f1)
    [[ $got == "$(sha256_of "$WORK/blobs/manifest.json")" ]] ||
        { log "$front: manifest GET returned different bytes"; return 1; }
    got=$(curl -sS -f --cacert "$CA" "$base/v2/$REPO/blobs/${DIGEST[layer64m]}" | sha256sum | cut -d' ' -f1)
    [[ sha256:$got == "${DIGEST[layer64m]}" ]] ||
        { log "$front: 64 MiB blob GET returned different bytes"; return 1; }
    got=$(curl -sS -f --cacert "$CA" -I -H "$MANIFEST_ACCEPT" "$base/v2/$REPO/manifests/bench" |
        awk 'tolower($1) == "docker-content-digest:" {print $2}' | tr -d '\r')
    [[ -n $got ]] || { log "$front: manifest HEAD lacks Docker-Content-Digest"; return 1; }
    return 0
}

# Check that FRONT relays the static upstream's manifest unchanged.
verify_static() {
    local got
    got=$(curl -sS -f --cacert "$CA" -H "$MANIFEST_ACCEPT" "$(front_base "$1")/v2/$REPO/manifests/bench" |
        sha256sum | cut -d' ' -f1)
    [[ $got == "$(sha256_of "$WORK/blobs/manifest.json")" ]] ||
        { log "$1: manifest GET through the static upstream returned different bytes"; return 1; }
}
