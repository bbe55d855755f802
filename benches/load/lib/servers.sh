# Start the upstreams (registry and static stand-in) and the fronts on loopback.
# Every server is recorded in FRONT_PORT / FRONT_PID under "front/upstream",
# where upstream is "registry" or "static", and its upstream's pid in UP_PID.
# shellcheck shell=bash

declare -A FRONT_PORT FRONT_PID UP_PID UP_PORT

# Upstream registry (plain HTTP, as Harbor core is behind its front proxy) and
# a second process on the same storage with TLS, the "direct" baseline, so the
# direct column pays for TLS and speaks HTTP/2 like the fronts do.
start_registries() {
    local root=$WORK/registry-root secret port direct_port
    mkdir -p "$root"
    secret=$(openssl rand -hex 16)
    port=$(free_port)
    direct_port=$(free_port)

    write_registry_config "$WORK/registry-upstream.yml" "$port" "$root" "$secret" ""
    write_registry_config "$WORK/registry-direct.yml" "$direct_port" "$root" "$secret" \
        "  tls: {certificate: $CERT, key: $KEY}"

    docker-registry serve "$WORK/registry-upstream.yml" >"$WORK/registry-upstream.log" 2>&1 &
    UP_PID[registry]=$!
    UP_PORT[registry]=$port
    track_pid "$!"
    docker-registry serve "$WORK/registry-direct.yml" >"$WORK/registry-direct.log" 2>&1 &
    FRONT_PID[direct/registry]=$!
    FRONT_PORT[direct/registry]=$direct_port
    track_pid "$!"

    wait_http "http://127.0.0.1:$port/v2/" ||
        die "registry did not start on port $port; see $WORK/registry-upstream.log"
    wait_http "https://127.0.0.1:$direct_port/v2/" ||
        die "TLS registry did not start on port $direct_port; see $WORK/registry-direct.log"
    log "registry: upstream http://127.0.0.1:$port, direct https://127.0.0.1:$direct_port"
}

write_registry_config() {
    local file=$1 port=$2 root=$3 secret=$4 tls_line=$5
    # Access logs and info logs are off so the upstream's own logging does not
    # weigh on the cores the fronts compete for.
    cat >"$file" <<EOF
version: 0.1
log:
  level: warn
  accesslog: {disabled: true}
storage:
  filesystem: {rootdirectory: $root}
  cache: {blobdescriptor: inmemory}
  delete: {enabled: true}
http:
  addr: 127.0.0.1:$port
  secret: $secret
$tls_line
EOF
}

# Serve the seeded manifest and 4 KiB blob as static files (after seed_image).
start_static() {
    local prefix=$WORK/static root=$WORK/static/root plain_port tls_port
    mkdir -p "$root/v2/$REPO/manifests" "$root/v2/$REPO/blobs"
    cp "$WORK/blobs/manifest.json" "$root/v2/$REPO/manifests/bench"
    cp "$WORK/blobs/layer4k" "$root/v2/$REPO/blobs/${DIGEST[layer4k]}"
    plain_port=$(free_port)
    tls_port=$(free_port)
    sed -e "s|@PREFIX@|$prefix|g" -e "s|@ROOT@|$root|g" \
        -e "s|@PLAIN_PORT@|$plain_port|g" -e "s|@TLS_PORT@|$tls_port|g" \
        -e "s|@CERT@|$CERT|g" -e "s|@KEY@|$KEY|g" \
        -e "s|@MANIFEST_DIGEST@|sha256:$(sha256_of "$WORK/blobs/manifest.json")|g" \
        "$BENCH_DIR/nginx-static.conf.in" >"$prefix/nginx.conf"
    nginx -t -q -p "$prefix" -e "$prefix/error.log" -c "$prefix/nginx.conf" ||
        die "nginx rejected $prefix/nginx.conf; see the nginx -t output above"
    nginx -p "$prefix" -e "$prefix/error.log" -c "$prefix/nginx.conf" &
    track_pid "$!"
    UP_PID[static]=$!
    UP_PORT[static]=$plain_port
    FRONT_PID[direct/static]=$!
    FRONT_PORT[direct/static]=$tls_port
    wait_http "http://127.0.0.1:$plain_port/v2/" || die "static upstream did not start; see $prefix/error.log"
    log "static: upstream http://127.0.0.1:$plain_port, direct https://127.0.0.1:$tls_port"
}

# Usage: start_nginx NAME TUNING_TEXT. One nginx with a listener per upstream.
start_nginx() {
    local name=$1 tuning=$2 prefix=$WORK/$1 access_log upstream port pid
    mkdir -p "$prefix/servers"
    if [[ ${NGINX_ACCESS_LOG:-1} == 1 ]]; then
        access_log="$prefix/access.log timed_combined"
    else
        access_log=off
    fi
    sed -e "s|@PREFIX@|$prefix|g" -e "s|@ACCESS_LOG@|$access_log|g" \
        "$BENCH_DIR/nginx.conf.in" >"$prefix/nginx.conf"
    for upstream in "${!UP_PORT[@]}"; do
        port=$(free_port)
        FRONT_PORT[$name/$upstream]=$port
        sed -e "s|@PORT@|$port|g" -e "s|@UPSTREAM_NAME@|$upstream|g" \
            -e "s|@UPSTREAM@|127.0.0.1:${UP_PORT[$upstream]}|g" \
            -e "s|@CERT@|$CERT|g" -e "s|@KEY@|$KEY|g" -e "s|@TUNING@|$tuning|g" \
            "$BENCH_DIR/nginx-server.conf.in" >"$prefix/servers/$upstream.conf"
    done

    nginx -t -q -p "$prefix" -e "$prefix/error.log" -c "$prefix/nginx.conf" ||
        die "nginx rejected $prefix/nginx.conf; see the nginx -t output above"
    nginx -p "$prefix" -e "$prefix/error.log" -c "$prefix/nginx.conf" &
    pid=$!
    track_pid "$pid"
    for upstream in "${!UP_PORT[@]}"; do
        FRONT_PID[$name/$upstream]=$pid
        wait_http "https://127.0.0.1:${FRONT_PORT[$name/$upstream]}/v2/" ||
            die "$name did not start; see $prefix/error.log"
    done
    log "$name: master pid $pid, ports $(for u in "${!UP_PORT[@]}"; do printf '%s=%s ' "$u" "${FRONT_PORT[$name/$u]}"; done)"
}

# Start one harbor-gateway per upstream, each with a configuration that uses
# only the documented keys, plus GATEWAY_CONFIG_EXTRA (TOML text) when set.
# Returns 1 (and logs why) when the binary is missing, so the run goes on
# without a gateway column.
start_gateway() {
    local upstream port admin_port config pid
    if [[ ! -x $GATEWAY_BIN ]]; then
        log "gateway binary not found at $GATEWAY_BIN (set GATEWAY_BIN); skipping the gateway"
        return 1
    fi
    for upstream in "${!UP_PORT[@]}"; do
        port=$(free_port)
        admin_port=$(free_port)
        config=$WORK/gateway-$upstream.toml
        cat >"$config" <<EOF
[listen]
https = "127.0.0.1:$port"
admin = "127.0.0.1:$admin_port"

[tls]
cert = "$CERT"
key = "$KEY"

[upstreams]
harbor_core = "http://127.0.0.1:${UP_PORT[$upstream]}"

[timeouts]
connect = 10
registry_idle = 900
default_idle = 1800
${GATEWAY_CONFIG_EXTRA:-}
EOF
        "$GATEWAY_BIN" check --config "$config" >"$WORK/gateway-$upstream-check.log" 2>&1 ||
            die "gateway check failed; see $WORK/gateway-$upstream-check.log"
        RUST_LOG=${GATEWAY_RUST_LOG:-info} "$GATEWAY_BIN" --config "$config" \
            >"$WORK/gateway-$upstream.log" 2>&1 &
        pid=$!
        track_pid "$pid"
        FRONT_PID[gateway/$upstream]=$pid
        FRONT_PORT[gateway/$upstream]=$port
        wait_http "https://127.0.0.1:$port/v2/" ||
            die "gateway did not start; see $WORK/gateway-$upstream.log"
        log "gateway ($upstream): https://127.0.0.1:$port, pid $pid"
    done
}
