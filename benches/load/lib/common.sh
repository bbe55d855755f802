# Helpers shared by the load benchmark: logging, ports, process tracking and
# the /proc readings behind the CPU and memory columns.
# shellcheck shell=bash

log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Install the tools the benchmark drives, only those that are missing.
ensure_tools() {
    local missing=() tool pkg
    for pair in docker-registry:docker-registry nginx:nginx h2load:nghttp2-client \
                ab:apache2-utils wrk:wrk curl:curl python3:python3 openssl:openssl; do
        tool=${pair%%:*}
        pkg=${pair#*:}
        command -v "$tool" >/dev/null 2>&1 || missing+=("$pkg")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    log "installing missing packages: ${missing[*]}"
    [[ $(id -u) -eq 0 ]] || die "missing ${missing[*]}; run as root or install them first"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    # The Debian packages start their own services. The benchmark runs private
    # instances, so the system ones are stopped to keep the CPU quiet.
    command -v systemctl >/dev/null 2>&1 && systemctl stop nginx docker-registry 2>/dev/null || true
}

# Print a TCP port on 127.0.0.1 that was free a moment ago.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Every server this script starts, by pid, so cleanup ends exactly those.
STARTED_PIDS=()

track_pid() { STARTED_PIDS+=("$1"); }

stop_started() {
    local pid
    for pid in "${STARTED_PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${STARTED_PIDS[@]}"; do
        # Give each server 5 s to exit before forcing it.
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    STARTED_PIDS=()
}

# Wait until URL returns any HTTP status, up to $2 seconds.
wait_http() {
    local url=$1 limit=${2:-20} i
    for ((i = 0; i < limit * 10; i++)); do
        if curl -sk -o /dev/null --max-time 1 "$url"; then return 0; fi
        sleep 0.1
    done
    return 1
}

# Print a pid and its direct children (nginx workers are children of the master).
pid_family() {
    local pid=$1
    echo "$pid"
    pgrep -P "$pid" 2>/dev/null || true
}

# Sum utime+stime (clock ticks) over the given pids. Field 2 (comm) may hold
# spaces, so the fields are counted after its closing parenthesis.
cpu_ticks() {
    local total=0 pid stat fields
    for pid in "$@"; do
        stat=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
        # After comm, utime and stime are the 12th and 13th fields.
        read -r -a fields <<< "${stat##*) }"
        total=$((total + fields[11] + fields[12]))
    done
    echo "$total"
}

# Reset the peak RSS (VmHWM) of each pid. Linux >= 4.0 accepts "5" here.
reset_peak_rss() {
    local pid
    for pid in "$@"; do echo 5 > "/proc/$pid/clear_refs" 2>/dev/null || true; done
}

# Sum VmHWM in KiB over the given pids.
peak_rss_kib() {
    local total=0 pid value
    for pid in "$@"; do
        value=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status" 2>/dev/null)
        total=$((total + ${value:-0}))
    done
    echo "$total"
}

# Busy clock ticks of the whole machine since boot, from the "cpu" line of
# /proc/stat: user, nice, system, irq, softirq and steal.
machine_busy_ticks() {
    local label user nice system idle iowait irq softirq steal
    read -r label user nice system idle iowait irq softirq steal _ < /proc/stat
    echo $((user + nice + system + irq + softirq + steal))
}

# Set CLIENT_TICKS to the CPU of this shell's finished children (the
# benchmark clients) in clock ticks, from the second line of the "times"
# builtin ("0m1.250s 0m0.310s"). It must run in this shell, not in a
# subshell, whose children are counted from zero.
client_ticks() {
    local user sys
    times >"$WORK/times.txt"
    read -r user sys < <(tail -1 "$WORK/times.txt")
    CLIENT_TICKS=$(awk -v u="$user" -v s="$sys" -v t="$(getconf CLK_TCK)" '
        function secs(x,  m) {
            m = substr(x, 1, index(x, "m") - 1)
            x = substr(x, index(x, "m") + 1)
            sub("s", "", x)
            return m * 60 + x
        }
        BEGIN { printf "%d\n", (secs(u) + secs(s)) * t }')
}
