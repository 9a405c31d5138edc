#!/usr/bin/env bash
# bench/load.sh: compare, in one run on this machine, three ways of serving the
# same small JSON API:
#
#   direct      wrk -> upstream
#   nginx       wrk -> nginx doing the API-key check (map lookup + header injection) -> upstream
#   keygate     wrk -> keygate (reverse proxy checking the API key) -> upstream
#
# The upstream is a minimal nginx returning a constant JSON body.  For each
# contender: warmup run, then a measured `wrk --latency` run; the proxy's CPU
# time (utime+stime from /proc/<pid>/stat, nginx master+workers summed) is read
# before and after the measured run and divided by the number of requests.
#
# Run from anywhere (it cd's to the repo root):
#   cargo build --release && bash bench/load.sh
#
# Parameters (environment variables):
#   KEYS=10000                 keys in the snapshot / nginx map
#   DURATION=10s               measured run (wrk's, or the paced client's with RATE)
#   WARMUP=2s                  warmup run (not measured)
#   CONNECTIONS=50             wrk connections (1 thread); with RATE, the paced client's
#                              connections to each server
#   RATE=""                    requests/s: instead of wrk (closed-loop, as fast as the proxy
#                              answers), send that many requests per second, evenly paced,
#                              measuring each from when it was due (examples/http_load.rs:
#                              cargo build --release --example http_load); warmup paced too
#   HTTP_LOAD=target/release/examples/http_load
#   INTERLEAVE=0               1 (with RATE): nginx-gate and keygate run at once, both on
#                              PROXY_CPU, and the paced client sends to them in turn (RATE/2
#                              each), so both meet the same pauses of the machine (§2 of
#                              BENCHMARKS.md: a VM's cores stop for milliseconds about once a
#                              second, and one run after another each proxy's p99 depends on how
#                              many its own run met)
#   INTERLEAVE_FIRST=nginx     which proxy gets request 0, 2, 4, … (the other 1, 3, 5, …):
#                              requests leave in twos and threes, and of two arriving together
#                              on the shared core one is served first (bench/pairs.sh
#                              alternates it from run to run)
#   KEYGATE=target/release/keygate
#   PROXY_CPU=0                core the proxy under test is pinned to
#   LOAD_CPU=1                 core for wrk and the upstream nginx
#   CONTENDERS="direct nginx keygate"   subset/order of contenders to run; also
#                              "keygate-reload": keygate while its snapshot file is replaced
#                              (revision bumped, atomic rename) every RELOAD_EVERY seconds
#   RELOAD_EVERY=1             seconds between snapshot replacements for keygate-reload
#   KEYGATE_EXTRA_TOML=""      appended to keygate.toml (printf %b: "\n" becomes a newline),
#                              e.g. KEYGATE_EXTRA_TOML='[runtime]\nflavor = "current_thread"'
#   INJECT_PAUSES=""           FOR/EVERY in ms, e.g. 5/100: a real-time busy loop takes
#                              PROXY_CPU for FOR ms every EVERY ms while the contenders run
#                              (bench/pauses.py --inject under chrt -f 1; root): pauses far more
#                              frequent than the machine's own then set every contender's tail,
#                              the same for each
#   SEED=42                    key generation seed
#   RESULTS_DIR=bench/results  where the Markdown report goes
#   KEEP_TMP=0                 1 = keep the temp dir (configs, logs, wrk outputs)
#   NGINX=nginx                nginx binary (falls back to /usr/sbin/nginx)
set -euo pipefail

# ---------------------------------------------------------------- parameters
KEYS="${KEYS:-10000}"
DURATION="${DURATION:-10s}"
WARMUP="${WARMUP:-2s}"
CONNECTIONS="${CONNECTIONS:-50}"
RATE="${RATE:-}"
HTTP_LOAD="${HTTP_LOAD:-target/release/examples/http_load}"
INTERLEAVE="${INTERLEAVE:-0}"
INTERLEAVE_FIRST="${INTERLEAVE_FIRST:-nginx}"
KEYGATE="${KEYGATE:-target/release/keygate}"
PROXY_CPU="${PROXY_CPU:-0}"
LOAD_CPU="${LOAD_CPU:-1}"
CONTENDERS="${CONTENDERS:-direct nginx keygate}"
RELOAD_EVERY="${RELOAD_EVERY:-1}"
KEYGATE_EXTRA_TOML="${KEYGATE_EXTRA_TOML:-}"
SEED="${SEED:-42}"
INJECT_PAUSES="${INJECT_PAUSES:-}"
RESULTS_DIR="${RESULTS_DIR:-bench/results}"
KEEP_TMP="${KEEP_TMP:-0}"
NGINX="${NGINX:-$(command -v nginx || echo /usr/sbin/nginx)}"

REQUEST_PATH="/v1/analyses/1"   # the measured endpoint
ECHO_PATH="/v1/analyses/_echo"  # upstream echoes the identity headers it received (sanity check only)
READY_TIMEOUT_S=10              # deadline for a server to answer after start
STOP_TIMEOUT_S=5                # deadline for a server to exit after SIGTERM

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(dirname "$SCRIPT_DIR")"
cd "$REPO_ROOT"

# ---------------------------------------------------------------- helpers
log() { printf '[load] %s\n' "$*" >&2; }
die() { printf '[load] ERROR: %s\n' "$*" >&2; exit 1; }

# Is process $1 alive (exists and is not a zombie)?
alive() {
    local line
    read -r line 2>/dev/null <"/proc/$1/stat" || return 1
    line="${line##*) }"          # drop "pid (comm) "; comm may contain spaces/parens
    [[ "${line:0:1}" != "Z" ]]
}

# Sum of utime and of stime, in clock ticks, over the given pids ("user sys"; threads are
# included in a process's own counters).
cpu_ticks() {
    local user=0 sys=0 pid line
    local -a f
    for pid in "$@"; do
        read -r line 2>/dev/null <"/proc/$pid/stat" || die "process $pid vanished while measuring"
        line="${line##*) }"      # fields from #3 (state) on: utime is #14 -> f[11], stime #15 -> f[12]
        read -r -a f <<<"$line"
        user=$(( user + f[11] )); sys=$(( sys + f[12] ))
    done
    echo "$user $sys"
}

# "busy total" clock ticks of one core from /proc/stat (busy = everything but idle and iowait).
core_ticks() {
    awk -v c="cpu$1" '$1 == c { busy = $2 + $3 + $4 + $7 + $8 + $9; print busy, busy + $5 + $6 }' /proc/stat
}

# Percentage of a core used between two core_ticks samples ("busy total" each).
core_pct() {
    awk -v a="$1" -v b="$2" 'BEGIN { split(a, x, " "); split(b, y, " "); d = y[2] - x[2]; printf "%.0f", (d > 0 ? 100 * (y[1] - x[1]) / d : 0) }'
}

# The process tree of a proxy: the pid itself plus its direct children
# (nginx master + workers; keygate has no children, its threads are counted in its pid).
proc_tree() {
    echo "$1"
    pgrep -P "$1" || true
}

# HTTP status code of a GET ("000" if nothing answered).
http_code() {
    curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$@" || true
}

# Poll $url until it answers $expected; fail after READY_TIMEOUT_S or if $pid died.
# Extra arguments are passed to curl (e.g. -H "X-API-Key: ...").
wait_ready() {
    local name="$1" pid="$2" url="$3" expected="$4" logfile="$5" code=""
    shift 5
    local deadline=$(( $(date +%s) + READY_TIMEOUT_S ))
    while :; do
        if ! alive "$pid"; then
            tail -n 30 "$logfile" >&2 || true
            die "$name exited during startup (log above: $logfile)"
        fi
        code="$(http_code "$@" "$url")"
        [[ "$code" == "$expected" ]] && return 0
        if (( $(date +%s) >= deadline )); then
            tail -n 30 "$logfile" >&2 || true
            die "$name not ready after ${READY_TIMEOUT_S}s: GET $url ${*:+($*) }answered '$code', expected $expected (log: $logfile)"
        fi
        sleep 0.05
    done
}

# Every background process we start goes in here; the EXIT trap stops them all.
PIDS=()

# Stop one process: SIGTERM, wait up to STOP_TIMEOUT_S, then SIGKILL it and its children.
stop_pid() {
    local pid="$1" children i
    alive "$pid" || { wait "$pid" 2>/dev/null || true; return 0; }
    children="$(pgrep -P "$pid" || true)"
    kill -TERM "$pid" 2>/dev/null || true
    for (( i = 0; i < STOP_TIMEOUT_S * 20; i++ )); do
        alive "$pid" || break
        sleep 0.05
    done
    if alive "$pid"; then
        log "pid $pid did not stop after ${STOP_TIMEOUT_S}s, sending SIGKILL"
        # shellcheck disable=SC2086  # word-splitting the pid list is intended
        kill -KILL "$pid" $children 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
    # nginx workers exit on their own once the master is gone; make sure of it.
    for i in $children; do
        if alive "$i"; then kill -KILL "$i" 2>/dev/null || true; fi
    done
}

TMP=""
cleanup() {
    local rc=$?
    local pid
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
    if [[ -n "$TMP" && -d "$TMP" ]]; then
        if [[ "$KEEP_TMP" == 1 || "$rc" != 0 ]]; then
            log "kept temp dir $TMP (configs, logs, wrk output)"
        else
            rm -rf "$TMP"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# N free TCP ports on 127.0.0.1, all bound at once so they are distinct.
# (There is a small window before our servers bind them; good enough for a bench.)
free_ports() {
    python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# Parse a wrk --latency output into "rps requests p50_us p99_us non2xx socket_errors".
parse_wrk() {
    awk '
        function to_us(v,   n, u) {
            n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
            if (u == "us") return n
            if (u == "ms") return n * 1000
            if (u == "s")  return n * 1000000
            if (u == "m")  return n * 60000000
            return -1
        }
        $1 == "50%"                 { p50 = to_us($2) }
        $1 == "99%"                 { p99 = to_us($2) }
        / requests in /             { req = $1 }
        $1 == "Requests/sec:"       { rps = $2 }
        /Non-2xx or 3xx responses:/ { non2xx = $NF }
        /Socket errors:/ {
            for (i = 1; i <= NF; i++) { x = $i; gsub(/,/, "", x); if (x ~ /^[0-9]+$/) errs += x }
        }
        END {
            if (rps == "" || req == "" || p50 == "" || p99 == "") exit 1
            printf "%s %s %s %s %d %d\n", rps, req, p50, p99, non2xx, errs
        }' "$1"
}

# A DURATION or WARMUP ("10s", "2m", "1h", "30") in seconds.
seconds() {
    local v="$1"
    case "$v" in
        *h) echo $(( ${v%h} * 3600 )) ;;
        *m) echo $(( ${v%m} * 60 )) ;;
        *s) echo "${v%s}" ;;
        *) echo "$v" ;;
    esac
}

# Format microseconds for humans: "212 µs" or "1.53 ms".
fmt_us() {
    awk -v v="$1" 'BEGIN { if (v < 1000) printf "%.0f µs", v; else if (v < 1000000) printf "%.2f ms", v / 1000; else printf "%.2f s", v / 1000000 }'
}

# ---------------------------------------------------------------- preflight
missing=()
for tool in wrk curl taskset python3 pgrep; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
[[ -x "$NGINX" ]] || missing+=("nginx")
if (( ${#missing[@]} )); then
    die "missing tools: ${missing[*]}. Install with:
    apt-get install -y nginx wrk curl util-linux procps python3   # (bench toolbox: + nghttp2-client hyperfine)"
fi

# Normalise and validate the contender list.
contenders=()
for c in $CONTENDERS; do
    case "$c" in
        direct|keygate|keygate-reload) contenders+=("$c") ;;
        nginx|nginx-gate) contenders+=("nginx") ;;
        *) die "unknown contender '$c' (expected: direct nginx keygate)" ;;
    esac
done
(( ${#contenders[@]} )) || die "CONTENDERS is empty"

[[ "$KEYS" =~ ^[1-9][0-9]*$ ]] || die "KEYS must be a positive integer (got '$KEYS')"
[[ "$CONNECTIONS" =~ ^[1-9][0-9]*$ ]] || die "CONNECTIONS must be a positive integer (got '$CONNECTIONS')"
if [[ -n "$RATE" ]]; then
    [[ "$RATE" =~ ^[1-9][0-9]*$ ]] || die "RATE must be a positive integer of requests per second (got '$RATE')"
    [[ -x "$HTTP_LOAD" ]] || die "the paced client '$HTTP_LOAD' is not built.
    Build it with: cargo build --release --example http_load   (or set HTTP_LOAD=/path/to/http_load)"
    HTTP_LOAD="$(cd "$(dirname "$HTTP_LOAD")" && pwd)/$(basename "$HTTP_LOAD")"
fi
if [[ -n "$INJECT_PAUSES" ]]; then
    [[ "$INJECT_PAUSES" =~ ^([1-9][0-9]*)/([1-9][0-9]*)$ ]] \
        || die "INJECT_PAUSES must be FOR/EVERY in milliseconds, e.g. 5/100 (got '$INJECT_PAUSES')"
    PAUSE_FOR="${BASH_REMATCH[1]}"; PAUSE_EVERY="${BASH_REMATCH[2]}"
    chrt -f 1 true 2>/dev/null || die "INJECT_PAUSES: cannot start a real-time task (chrt -f 1; root needed)"
fi
case "$INTERLEAVE" in
    0) ;;
    1) [[ -n "$RATE" ]] || die "INTERLEAVE=1 needs RATE (the paced client sends to both proxies in turn)"
       [[ " ${contenders[*]} " == " nginx keygate " ]] || die "INTERLEAVE=1 compares nginx and keygate: set CONTENDERS=\"nginx keygate\" (got '${contenders[*]}')" ;;
    *) die "INTERLEAVE must be 0 or 1 (got '$INTERLEAVE')" ;;
esac
[[ "$INTERLEAVE_FIRST" == nginx || "$INTERLEAVE_FIRST" == keygate ]] \
    || die "INTERLEAVE_FIRST must be nginx or keygate (got '$INTERLEAVE_FIRST')"
[[ "$DURATION" =~ ^[0-9]+[smh]?$ ]] || die "DURATION must look like 10s (got '$DURATION')"
[[ "$WARMUP" =~ ^[0-9]+[smh]?$ ]] || die "WARMUP must look like 2s (got '$WARMUP')"
for cpu in "$PROXY_CPU" "$LOAD_CPU"; do
    taskset -c "$cpu" true 2>/dev/null || die "cannot pin to CPU '$cpu' (this machine has $(nproc) cores)"
done
[[ "$PROXY_CPU" != "$LOAD_CPU" ]] || log "warning: PROXY_CPU == LOAD_CPU ($PROXY_CPU): proxy, wrk and upstream share one core"

if [[ " ${contenders[*]} " == *" keygate "* ]]; then
    [[ -x "$KEYGATE" ]] || die "keygate binary '$KEYGATE' not found or not executable.
    Build it with: cargo build --release   (or set KEYGATE=/path/to/keygate, or CONTENDERS=\"direct nginx\")"
    KEYGATE="$(cd "$(dirname "$KEYGATE")" && pwd)/$(basename "$KEYGATE")"
fi

CLK_TCK="$(getconf CLK_TCK)"
LOADAVG_START="$(cut -d' ' -f1-3 /proc/loadavg)"

# ---------------------------------------------------------------- setup
TMP="$(mktemp -d "${TMPDIR:-/tmp}/keygate-load.XXXXXX")"
chmod 755 "$TMP"   # nginx workers may run as another user (nobody) when started as root
log "temp dir: $TMP"

log "generating $KEYS keys (seed $SEED)"
python3 "$SCRIPT_DIR/gen_keys.py" "$KEYS" "$TMP" --seed "$SEED"

# The client key: one from the middle of the set (not trivially the first entry).
CLIENT_KEY="$(sed -n "$(( (KEYS + 1) / 2 ))p" "$TMP/keys.txt")"
CLIENT_PARTNER="$(awk -v k="\"$CLIENT_KEY\"" '$1 == k { sub(/;$/, "", $2); print $2 }' "$TMP/nginx-keys.map")"
CLIENT_KEY_ID="$(awk -v k="\"$CLIENT_KEY\"" '$1 == k { sub(/;$/, "", $2); print $2 }' "$TMP/nginx-key-ids.map")"
# Negative tests: a well-formed key (valid checksum) that is not in the snapshot,
# and the client key with a broken checksum (last char changed to a digit, so
# it differs even for nginx's case-insensitive map).
UNKNOWN_KEY="$(head -n 1 "$TMP/keys-unknown.txt")"
if [[ "${CLIENT_KEY: -1}" == "0" ]]; then BAD_SUM_KEY="${CLIENT_KEY%?}1"; else BAD_SUM_KEY="${CLIENT_KEY%?}0"; fi

read -r UPSTREAM_PORT NGINX_GATE_PORT KEYGATE_PORT KEYGATE_ADMIN_PORT <<<"$(free_ports 4)"

# Common nginx boilerplate: everything inside the temp dir, foreground, no logs.
nginx_common() {   # $1 = dir
    cat <<EOF
worker_processes 1;
daemon off;
master_process on;
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections 4096; }
EOF
}
nginx_http_common() {   # $1 = dir
    cat <<EOF
    access_log off;
    client_body_temp_path $1/client_body;
    proxy_temp_path $1/proxy;
    fastcgi_temp_path $1/fastcgi;
    uwsgi_temp_path $1/uwsgi;
    scgi_temp_path $1/scgi;
    # Never close client connections because of a request count (default is 1000),
    # so every contender keeps its $CONNECTIONS connections for the whole run.
    keepalive_requests 1000000;
    keepalive_timeout 75s;
EOF
}

# --- upstream: constant JSON on the measured path, header echo for the sanity check.
UP_DIR="$TMP/upstream"; mkdir -p "$UP_DIR"
{
    nginx_common "$UP_DIR"
    echo "http {"
    nginx_http_common "$UP_DIR"
    cat <<EOF
    server {
        listen 127.0.0.1:$UPSTREAM_PORT;
        default_type application/json;
        location = $REQUEST_PATH {
            return 200 '{"ok":true,"id":1,"status":"done"}';
        }
        location = $ECHO_PATH {
            return 200 '{"x_partner_id":"\$http_x_partner_id","x_key_id":"\$http_x_key_id","x_api_key":"\$http_x_api_key"}';
        }
        location / {
            return 404 '{"error":"not_found"}';
        }
    }
}
EOF
} >"$UP_DIR/nginx.conf"

# --- nginx-gate: the same check keygate does, done with nginx maps.
NG_DIR="$TMP/nginx-gate"; mkdir -p "$NG_DIR"
# Sized so nginx builds an "optimal" hash (no warning) for 1k..100k keys of 46 chars.
MAP_HASH_MAX=$(( KEYS * 4 > 4096 ? KEYS * 4 : 4096 ))
{
    nginx_common "$NG_DIR"
    echo "http {"
    nginx_http_common "$NG_DIR"
    cat <<EOF
    # One hash lookup per map: plaintext key -> partner id, plaintext key -> key id.
    map_hash_max_size $MAP_HASH_MAX;
    map_hash_bucket_size 256;
    map \$http_x_api_key \$kg_partner {
        default "";
        include $TMP/nginx-keys.map;
    }
    map \$http_x_api_key \$kg_key_id {
        default "";
        include $TMP/nginx-key-ids.map;
    }
    upstream kg_upstream {
        server 127.0.0.1:$UPSTREAM_PORT;
        keepalive 64;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$NGINX_GATE_PORT;
        default_type application/json;
        location / {
            if (\$kg_partner = "") {
                return 401 '{"error":"unauthorized"}';
            }
            proxy_pass http://kg_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
            proxy_set_header X-API-Key "";              # strip the credential
            proxy_set_header x-partner-id \$kg_partner;
            proxy_set_header x-key-id \$kg_key_id;
            proxy_set_header x-scopes "analyses:read analyses:write";
        }
    }
}
EOF
} >"$NG_DIR/nginx.conf"

# --- keygate config.
KG_DIR="$TMP/keygate"; mkdir -p "$KG_DIR"
{
    cat <<EOF
environment = "live"

[[key_prefixes]]
prefix = "sk_live_"
environment = "live"
checksum = true

[snapshot]
source = "file"
path = "$TMP/keys.json"

[proxy]
listen = "127.0.0.1:$KEYGATE_PORT"
upstream = "http://127.0.0.1:$UPSTREAM_PORT"

[admin]
listen = "127.0.0.1:$KEYGATE_ADMIN_PORT"

[log]
level = "warn"
EOF
    if [[ -n "$KEYGATE_EXTRA_TOML" ]]; then
        printf '\n# KEYGATE_EXTRA_TOML\n%b\n' "$KEYGATE_EXTRA_TOML"
    fi
} >"$KG_DIR/keygate.toml"

for d in "$UP_DIR" "$NG_DIR"; do
    "$NGINX" -t -q -p "$d" -c "$d/nginx.conf" 2>"$d/configtest.log" \
        || { cat "$d/configtest.log" >&2; die "nginx config test failed for $d"; }
    if [[ -s "$d/configtest.log" ]]; then cat "$d/configtest.log" >&2; fi
done

# ---------------------------------------------------------------- start the upstream
log "starting upstream nginx on 127.0.0.1:$UPSTREAM_PORT (CPU $LOAD_CPU)"
taskset -c "$LOAD_CPU" "$NGINX" -p "$UP_DIR" -c "$UP_DIR/nginx.conf" >"$UP_DIR/stdout.log" 2>&1 &
UPSTREAM_PID=$!
PIDS+=("$UPSTREAM_PID")
wait_ready upstream "$UPSTREAM_PID" "http://127.0.0.1:$UPSTREAM_PORT$REQUEST_PATH" 200 "$UP_DIR/error.log"

if [[ -n "$INJECT_PAUSES" ]]; then
    log "injecting a ${PAUSE_FOR} ms pause every ${PAUSE_EVERY} ms on CPU $PROXY_CPU"
    chrt -f 1 python3 "$SCRIPT_DIR/pauses.py" --inject "$PROXY_CPU" "$PAUSE_EVERY" "$PAUSE_FOR" &
    INJECT_PID=$!
    PIDS+=("$INJECT_PID")
fi

# The injector's CPU ticks ("user sys"; "0 0" without one), which must be alive: its share of the
# proxy core is not a stranger's, and a run it stopped in would not be what the report says.
injector_ticks() {
    if [[ -z "${INJECT_PID:-}" ]]; then echo "0 0"; return; fi
    alive "$INJECT_PID" || die "the pause injector (pid $INJECT_PID) is gone"
    cpu_ticks "$INJECT_PID"
}

# ---------------------------------------------------------------- contenders
# Start contender $1 (pinned to PROXY_CPU); sets PROXY_PID, URL, LOGFILE.
start_contender() {
    PROXY_PID=""
    case "$1" in
        direct)
            URL="http://127.0.0.1:$UPSTREAM_PORT"
            LOGFILE="$UP_DIR/error.log"
            ;;
        nginx)
            URL="http://127.0.0.1:$NGINX_GATE_PORT"
            LOGFILE="$NG_DIR/error.log"
            taskset -c "$PROXY_CPU" "$NGINX" -p "$NG_DIR" -c "$NG_DIR/nginx.conf" >"$NG_DIR/stdout.log" 2>&1 &
            PROXY_PID=$!
            ;;
        keygate|keygate-reload)
            URL="http://127.0.0.1:$KEYGATE_PORT"
            LOGFILE="$KG_DIR/keygate.log"
            taskset -c "$PROXY_CPU" "$KEYGATE" serve --config "$KG_DIR/keygate.toml" >"$LOGFILE" 2>&1 &
            PROXY_PID=$!
            ;;
    esac
    if [[ -n "$PROXY_PID" ]]; then
        PIDS+=("$PROXY_PID")
        # Ready = answers 401 to a request without a key.
        wait_ready "$1" "$PROXY_PID" "$URL$REQUEST_PATH" 401 "$LOGFILE"
    fi
}

# Sanity check before measuring: valid key -> 200, bad keys -> 401 (abort otherwise);
# identity headers injected and credential stripped (warning otherwise).
sanity_check() {
    local name="$1" url="$2" code body
    if [[ "$name" == direct ]]; then
        code="$(http_code -H "X-API-Key: $CLIENT_KEY" "$url$REQUEST_PATH")"
        [[ "$code" == 200 ]] || die "$name: valid key got HTTP $code, expected 200"
        return 0
    fi
    # Valid key -> 200. Polled rather than asserted once, in case a gate answers
    # before its snapshot is loaded; same deadline as startup.
    wait_ready "$name (valid key)" "$PROXY_PID" "$url$REQUEST_PATH" 200 "$LOGFILE" -H "X-API-Key: $CLIENT_KEY"

    code="$(http_code "$url$REQUEST_PATH")"
    [[ "$code" == 401 ]] || die "$name: request without key got HTTP $code, expected 401"
    code="$(http_code -H "X-API-Key: $UNKNOWN_KEY" "$url$REQUEST_PATH")"
    [[ "$code" == 401 ]] || die "$name: unknown (well-formed) key got HTTP $code, expected 401"
    code="$(http_code -H "X-API-Key: $BAD_SUM_KEY" "$url$REQUEST_PATH")"
    [[ "$code" == 401 ]] || die "$name: key with bad checksum got HTTP $code, expected 401"

    body="$(curl -s --max-time 2 -H "X-API-Key: $CLIENT_KEY" "$url$ECHO_PATH" || true)"
    if [[ "$body" != *"\"x_partner_id\":\"$CLIENT_PARTNER\""* ]]; then
        WARNINGS+=("$name: upstream did not receive x-partner-id: $CLIENT_PARTNER (echo: $body)")
    fi
    if [[ "$body" != *"\"x_key_id\":\"$CLIENT_KEY_ID\""* ]]; then
        WARNINGS+=("$name: upstream did not receive x-key-id: $CLIENT_KEY_ID (echo: $body)")
    fi
    if [[ "$body" == *"$CLIENT_KEY"* ]]; then
        WARNINGS+=("$name: the API key reached the upstream (X-API-Key not stripped)")
    fi
}

run_wrk() {   # $1 = url, $2 = duration, $3 = output file
    taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNECTIONS" -d"$2" --latency -s "$TMP/percentiles.lua" \
        -H "X-API-Key: $CLIENT_KEY" "$1$REQUEST_PATH" >"$3" 2>&1 \
        || { cat "$3" >&2; die "wrk failed against $1"; }
}

# The paced client instead of wrk: $1 seconds of requests at RATE, to each "url output-file"
# pair that follows in turn. Each server's line becomes a wrk-like summary that parse_wrk reads,
# the client's own line kept below it.
run_paced() {   # $1 = duration, then url output [url output]
    local duration="$1" requests line i=0 raw
    shift
    local -a addrs=() outs=() lines=()
    while (( $# )); do addrs+=(--addr "${1#http://}"); outs+=("$2"); shift 2; done
    requests=$(( RATE * $(seconds "$duration") ))
    raw="${outs[0]}.raw"
    taskset -c "$LOAD_CPU" "$HTTP_LOAD" "${addrs[@]}" --path "$REQUEST_PATH" \
        --header "X-API-Key: $CLIENT_KEY" --rate "$RATE" --requests "$requests" --warmup 0 \
        --connections "$CONNECTIONS" >"$raw" 2>"${outs[0]}.err" \
        || { cat "$raw" "${outs[0]}.err" >&2; die "the paced client failed (${addrs[*]})"; }
    mapfile -t lines <"$raw"
    (( ${#lines[@]} == ${#outs[@]} )) \
        || { cat "$raw" "${outs[0]}.err" >&2; die "the paced client printed ${#lines[@]} lines for ${#outs[@]} servers"; }
    for line in "${lines[@]}"; do
        # rate <asked> <achieved> ok <n> failed <n> p50 <ms> p90 <ms> p99 <ms> p99.9 <ms> max <ms> wait-p99 <ms> pace-p99 <ms>
        awk '{ printf "  Latency Distribution\n     50%%  %.0fus\n     99%%  %.0fus\n  %s requests in %ss\nRequests/sec: %s\n", $9 * 1000, $13 * 1000, $5, "-", $3 }' <<<"$line" >"${outs[i]}"
        echo "paced: $line" >>"${outs[i]}"
        i=$(( i + 1 ))
    done
}

# Percent of the measured run's wall time (w0..w1) that the CPU ticks between two cpu_ticks
# samples ("user sys" each) amount to.
share() {
    awk -v a="$1" -v b="$2" -v hz="$CLK_TCK" -v ns="$(( w1 - w0 ))" 'BEGIN { split(a, x, " "); split(b, y, " "); printf "%.0f", 100 * ((y[1] + y[2] - x[1] - x[2]) / hz) / (ns / 1e9) }'
}

# The figures of contender $1 from its output ($WRK_DIR/$1.txt) and the samples taken around
# its measured run (t0/t1: its CPU ticks, if $2 > 0; pc0/pc1, lc0/lc1: the cores'; w0/w1: wall
# clock). $3: percent of the proxy core that another contender measured at the same time took.
account() {
    local c="$1" measured_pids="$2" beside="$3" parsed rps req p50 p99 non2xx errs u0 s0 u1 s1 ticks other
    R_PCORE[$c]="$(core_pct "$pc0" "$pc1")"
    R_LCORE[$c]="$(core_pct "$lc0" "$lc1")"

    parsed="$(parse_wrk "$WRK_DIR/$c.txt")" || { cat "$WRK_DIR/$c.txt" >&2; die "could not parse wrk output for $c"; }
    read -r rps req p50 p99 non2xx errs <<<"$parsed"
    R_RPS[$c]="$rps"; R_REQ[$c]="$req"; R_P50[$c]="$p50"; R_P99[$c]="$p99"
    R_NON2XX[$c]="$non2xx"; R_ERRS[$c]="$errs"
    (( R_REQ[$c] > 0 )) || die "$c: wrk completed 0 requests"

    if (( measured_pids )); then
        read -r u0 s0 <<<"$t0"; read -r u1 s1 <<<"$t1"
        ticks=$(( u1 + s1 - u0 - s0 ))
        # User space alone: what the proxy's own code costs, apart from the kernel's network
        # stack (which both proxies share).
        R_USER_US[$c]="$(awk -v t="$(( u1 - u0 ))" -v hz="$CLK_TCK" -v n="${R_REQ[$c]}" 'BEGIN { printf "%.2f", t * 1e6 / hz / n }')"
        R_CPU_US[$c]="$(awk -v t="$ticks" -v hz="$CLK_TCK" -v n="${R_REQ[$c]}" 'BEGIN { printf "%.2f", t * 1e6 / hz / n }')"
        R_BUSY[$c]="$(awk -v t="$ticks" -v hz="$CLK_TCK" -v ns="$(( w1 - w0 ))" 'BEGIN { printf "%.0f", 100 * (t / hz) / (ns / 1e9) }')"
        if (( ticks < 100 )); then
            WARNINGS+=("$c: only $ticks CPU ticks measured (1 tick = $(( 1000 / CLK_TCK )) ms): use a longer DURATION for a precise CPU/req")
        fi
    fi
    # Anything else running on the proxy core (this machine may be shared) skews the numbers.
    other=$(( R_PCORE[$c] - ${R_BUSY[$c]:-0} - beside ))
    if (( other > 10 )); then
        WARNINGS+=("$c: core $PROXY_CPU was ${other}% busy with something other than the proxy during the measured run (shared machine?): rerun on a quiet machine")
    fi
    if (( R_NON2XX[$c] > 0 || R_ERRS[$c] > 0 )); then
        WARNINGS+=("$c: ${R_NON2XX[$c]} non-2xx responses and ${R_ERRS[$c]} socket errors during the measured run")
    fi
    log "$c: ${R_RPS[$c]} req/s, p50 $(fmt_us "${R_P50[$c]}"), p99 $(fmt_us "${R_P99[$c]}"), proxy CPU ${R_CPU_US[$c]:-n/a} µs/req (user ${R_USER_US[$c]:-n/a})"
}

declare -A R_RPS R_REQ R_P50 R_P99 R_NON2XX R_ERRS R_CPU_US R_USER_US R_BUSY R_PCORE R_LCORE
WARNINGS=()
WRK_DIR="$TMP/wrk"; mkdir -p "$WRK_DIR"
# wrk prints 50/75/90/99% only; the shape of the distribution (the raw outputs in the report)
# needs more: a line "percentiles 10:… 25:… … max:…" in microseconds.
cat > "$TMP/percentiles.lua" <<'LUA'
done = function(summary, latency, requests)
  local out = "percentiles"
  for _, p in ipairs({10, 25, 50, 75, 90, 95, 99, 99.9}) do
    out = out .. string.format(" %g:%d", p, latency:percentile(p))
  end
  io.write(out .. string.format(" mean:%d stdev:%d max:%d\n", latency.mean, latency.stdev, latency.max))
end
LUA

# INTERLEAVE=1: both proxies at once, the paced client sending to each in turn.
sequential=("${contenders[@]}")
if [[ "$INTERLEAVE" == 1 ]]; then
    sequential=()
    log "=== nginx and keygate, interleaved"
    start_contender nginx; sanity_check nginx "$URL"; NG_PID="$PROXY_PID"; NG_URL="$URL"
    start_contender keygate; sanity_check keygate "$URL"; KG_PID="$PROXY_PID"; KG_URL="$URL"
    # The servers in the order they are sent to: "url output-stem" each.
    order=("$NG_URL" nginx "$KG_URL" keygate)
    if [[ "$INTERLEAVE_FIRST" == keygate ]]; then order=("$KG_URL" keygate "$NG_URL" nginx); fi
    log "warmup $WARMUP"
    run_paced "$WARMUP" "${order[0]}" "$WRK_DIR/${order[1]}-warmup.txt" "${order[2]}" "$WRK_DIR/${order[3]}-warmup.txt"
    log "measuring $DURATION ($CONNECTIONS connections to each, $RATE requests/s paced in all)"
    mapfile -t ng_pids < <(proc_tree "$NG_PID")
    ng0="$(cpu_ticks "${ng_pids[@]}")"; kg0="$(cpu_ticks "$KG_PID")"; inj0="$(injector_ticks)"
    pc0="$(core_ticks "$PROXY_CPU")"; lc0="$(core_ticks "$LOAD_CPU")"
    w0="$(date +%s%N)"
    run_paced "$DURATION" "${order[0]}" "$WRK_DIR/${order[1]}.txt" "${order[2]}" "$WRK_DIR/${order[3]}.txt"
    w1="$(date +%s%N)"
    pc1="$(core_ticks "$PROXY_CPU")"; lc1="$(core_ticks "$LOAD_CPU")"
    ng1="$(cpu_ticks "${ng_pids[@]}")"; kg1="$(cpu_ticks "$KG_PID")"; inj1="$(injector_ticks)"
    # Each proxy's share of the core, so that the other's is not taken for a stranger's.
    injected="$(share "$inj0" "$inj1")"
    t0="$ng0"; t1="$ng1"; account nginx 1 "$(( $(share "$kg0" "$kg1") + injected ))"
    t0="$kg0"; t1="$kg1"; account keygate 1 "$(( $(share "$ng0" "$ng1") + injected ))"
    for pid in "$NG_PID" "$KG_PID"; do
        stop_pid "$pid"
        if alive "$pid"; then die "pid $pid did not stop"; fi
    done
fi

for c in "${sequential[@]}"; do
    log "=== $c"
    start_contender "$c"
    sanity_check "$c" "$URL"

    RELOADER_PID=""
    if [[ "$c" == keygate-reload ]]; then
        # Replace the snapshot as an operator would (new revision, written beside it, renamed
        # over it) for as long as wrk runs: every reload re-parses all $KEYS keys. The next
        # revisions are written beforehand, so that writing them (a sed over the whole file)
        # does not take CPU from the proxy or wrk during the measurement: only the rename is.
        reloads=$(( ( $(seconds "$WARMUP") + $(seconds "$DURATION") ) / RELOAD_EVERY + 3 ))
        for rev in $(seq 2 $(( reloads + 1 ))); do
            sed -E "0,/\"revision\": [0-9]+/s//\"revision\": $rev/" "$TMP/keys.json" >"$TMP/keys.json.$rev"
        done
        # On disk before the measurement: the kernel's writeback of these files ran on the
        # proxy's core, in ~1 ms stretches, during the first seconds of it.
        sync
        (
            rev=1
            while [ -e "$TMP/keys.json.$(( rev + 1 ))" ]; do
                sleep "$RELOAD_EVERY"
                rev=$(( rev + 1 ))
                # The replaced revision stays linked until the run ends: unlinking it in the
                # rename freed its ~40 MB of page cache there and then, ~10 ms of kernel time on
                # the load's core (wrk's and the upstream's) at every reload.
                ln "$TMP/keys.json" "$TMP/replaced.$rev"
                mv "$TMP/keys.json.$rev" "$TMP/keys.json"
                echo "$rev" >"$TMP/reloads"
            done
        ) &
        RELOADER_PID=$!
        PIDS+=("$RELOADER_PID")
        # Off the proxy's core, with everything it starts: each `mv` (a fork, an exec, and the
        # replaced file's pages freed) took ~2.5 ms of the proxy's core once a second.
        taskset -p -c "$LOAD_CPU" "$RELOADER_PID" >/dev/null
    fi

    log "$c: warmup $WARMUP"
    if [[ -n "$RATE" ]]; then run_paced "$WARMUP" "$URL" "$WRK_DIR/$c-warmup.txt"; else run_wrk "$URL" "$WARMUP" "$WRK_DIR/$c-warmup.txt"; fi

    log "$c: measuring $DURATION ($CONNECTIONS connections${RATE:+, $RATE requests/s paced})"
    pids=()
    if [[ -n "$PROXY_PID" ]]; then mapfile -t pids < <(proc_tree "$PROXY_PID"); fi
    if (( ${#pids[@]} )); then t0="$(cpu_ticks "${pids[@]}")"; fi
    inj0="$(injector_ticks)"
    pc0="$(core_ticks "$PROXY_CPU")"; lc0="$(core_ticks "$LOAD_CPU")"
    w0="$(date +%s%N)"
    if [[ -n "$RATE" ]]; then run_paced "$DURATION" "$URL" "$WRK_DIR/$c.txt"; else run_wrk "$URL" "$DURATION" "$WRK_DIR/$c.txt"; fi
    w1="$(date +%s%N)"
    pc1="$(core_ticks "$PROXY_CPU")"; lc1="$(core_ticks "$LOAD_CPU")"
    if (( ${#pids[@]} )); then t1="$(cpu_ticks "${pids[@]}")"; fi
    inj1="$(injector_ticks)"
    account "$c" "${#pids[@]}" "$(share "$inj0" "$inj1")"

    if [[ -n "$RELOADER_PID" ]]; then
        kill "$RELOADER_PID" 2>/dev/null || true
        wait "$RELOADER_PID" 2>/dev/null || true
        applied="$(curl -s --max-time 2 "http://127.0.0.1:$KEYGATE_ADMIN_PORT/readyz" | sed -nE 's/.*"revision":([0-9]+).*/\1/p')"
        log "$c: snapshot replaced up to revision $(cat "$TMP/reloads" 2>/dev/null || echo 1); revision in force: ${applied:-?}"
        WARNINGS+=("$c: the snapshot file was replaced every ${RELOAD_EVERY}s during warmup and measurement (up to revision $(cat "$TMP/reloads" 2>/dev/null || echo 1), in force at the end: ${applied:-?})")
        # Back to revision 1 for any later contender.
        sed -E "0,/\"revision\": [0-9]+/s//\"revision\": 1/" "$TMP/keys.json" >"$TMP/keys.json.next"
        mv "$TMP/keys.json.next" "$TMP/keys.json"
    fi
    if [[ -n "$PROXY_PID" ]]; then
        stop_pid "$PROXY_PID"
        if alive "$PROXY_PID"; then die "$c (pid $PROXY_PID) did not stop"; fi
    fi
done

# ---------------------------------------------------------------- report
table() {
    echo "| contender | req/s | p50 | p99 | proxy CPU µs/req | of which user space | CPU vs nginx |"
    echo "|---|---:|---:|---:|---:|---:|---:|"
    local c cpu user ratio
    for c in "${contenders[@]}"; do
        cpu="—"; user="${R_USER_US[$c]:-—}"; ratio="—"
        if [[ -n "${R_CPU_US[$c]:-}" ]]; then
            cpu="${R_CPU_US[$c]} (core ${R_BUSY[$c]}% busy)"
            if [[ -n "${R_CPU_US[nginx]:-}" ]]; then
                ratio="$(awk -v a="${R_CPU_US[$c]}" -v b="${R_CPU_US[nginx]}" 'BEGIN { if (b > 0) printf "%.2f×", a / b; else print "—" }')"
            fi
        fi
        printf '| %s | %.0f | %s | %s | %s | %s | %s |\n' \
            "$([[ $c == nginx ]] && echo nginx-gate || echo "$c")" \
            "${R_RPS[$c]}" "$(fmt_us "${R_P50[$c]}")" "$(fmt_us "${R_P99[$c]}")" "$cpu" "$user" "$ratio"
    done
}

# Where the CPU went during each measured run (to judge whether a number is trustworthy).
util_table() {
    echo "| contender | proxy process (% of core $PROXY_CPU) | core $PROXY_CPU busy (all tasks) | core $LOAD_CPU busy (wrk + upstream) | requests | non-2xx / socket errors |"
    echo "|---|---:|---:|---:|---:|---:|"
    local c
    for c in "${contenders[@]}"; do
        printf '| %s | %s | %s%% | %s%% | %s | %s / %s |\n' \
            "$([[ $c == nginx ]] && echo nginx-gate || echo "$c")" \
            "$([[ -n "${R_BUSY[$c]:-}" ]] && echo "${R_BUSY[$c]}%" || echo "—")" \
            "${R_PCORE[$c]}" "${R_LCORE[$c]}" "${R_REQ[$c]}" "${R_NON2XX[$c]}" "${R_ERRS[$c]}"
    done
}

TABLE="$(table)"
UTIL_TABLE="$(util_table)"
echo
echo "$TABLE"
echo
echo "$UTIL_TABLE"
if (( ${#WARNINGS[@]} )); then
    echo
    for w in "${WARNINGS[@]}"; do echo "WARNING: $w"; done
fi

mkdir -p "$RESULTS_DIR"
REPORT="$RESULTS_DIR/load-$(date +%Y-%m-%d-%H%M%S).md"
{
    echo "# keygate load comparison — $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo
    echo "$TABLE"
    echo
    echo "proxy CPU µs/req = (utime+stime of the proxy process(es) after − before the measured run) / requests;"
    echo "\"core N% busy\" = that CPU time / wall time of the run (100% = the proxy saturated its core)."
    echo
    echo "## CPU utilisation during the measured runs"
    echo
    echo "$UTIL_TABLE"
    echo
    echo "Core figures come from /proc/stat. If core $PROXY_CPU is much busier than the proxy process,"
    echo "something else was running there; if core $LOAD_CPU is ~100%, req/s is bounded by wrk + upstream."
    if (( ${#WARNINGS[@]} )); then
        echo
        echo "## Warnings"
        echo
        for w in "${WARNINGS[@]}"; do echo "- $w"; done
    fi
    echo
    echo "## Machine"
    echo
    echo "- nproc: $(nproc)"
    echo "- CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo "- kernel: $(uname -r)"
    echo "- load average at start: $LOADAVG_START, at end: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "- nginx: $("$NGINX" -v 2>&1 | sed 's/^nginx version: //')"
    echo "- wrk: $(wrk -v 2>&1 | head -n 1 | awk '{print $2}')"
    if [[ " ${contenders[*]} " == *" keygate "* ]]; then
        echo "- keygate: \`$KEYGATE\` ($(timeout 5 "$KEYGATE" --version 2>/dev/null | head -n 1 || echo "version unknown"))"
    fi
    if rev="$(git rev-parse --short HEAD 2>/dev/null)"; then
        echo "- git: $rev$(git diff --quiet HEAD 2>/dev/null || echo " (uncommitted changes)")"
    else
        echo "- git: no commit yet"
    fi
    echo
    echo "## Parameters"
    echo
    echo "- CONTENDERS=\"${contenders[*]}\""
    echo "- KEYS=$KEYS SEED=$SEED"
    if [[ -n "$INJECT_PAUSES" ]]; then
        echo "- INJECT_PAUSES=$INJECT_PAUSES (a real-time busy loop took CPU $PROXY_CPU for $PAUSE_FOR ms every $PAUSE_EVERY ms throughout)"
    fi
    if [[ "$INTERLEAVE" == 1 ]]; then
        echo "- DURATION=$DURATION WARMUP=$WARMUP CONNECTIONS=$CONNECTIONS RATE=$RATE INTERLEAVE=1 (examples/http_load: evenly paced, latency from each request's due time; both proxies at once on PROXY_CPU, requests to each in turn, RATE/2 each, $INTERLEAVE_FIRST first)"
    elif [[ -n "$RATE" ]]; then
        echo "- DURATION=$DURATION WARMUP=$WARMUP CONNECTIONS=$CONNECTIONS RATE=$RATE (examples/http_load: evenly paced, latency from each request's due time)"
    else
        echo "- DURATION=$DURATION WARMUP=$WARMUP CONNECTIONS=$CONNECTIONS (wrk -t1 -c$CONNECTIONS --latency)"
    fi
    echo "- PROXY_CPU=$PROXY_CPU (proxy under test), LOAD_CPU=$LOAD_CPU (wrk + upstream nginx)"
    echo "- request: GET $REQUEST_PATH with X-API-Key (key ${CLIENT_KEY_ID}, ${CLIENT_PARTNER})"
    if [[ -n "$KEYGATE_EXTRA_TOML" ]]; then
        echo "- KEYGATE_EXTRA_TOML: see the end of keygate.toml below"
    else
        echo "- KEYGATE_EXTRA_TOML: (empty)"
    fi
    echo
    if [[ " ${contenders[*]} " == *" keygate "* ]]; then
        echo "## keygate.toml"
        echo
        echo '```toml'
        cat "$KG_DIR/keygate.toml"
        echo '```'
        echo
    fi
    echo "## Raw wrk output (measured runs)"
    for c in "${contenders[@]}"; do
        echo
        echo "### $c"
        echo
        echo '```'
        cat "$WRK_DIR/$c.txt"
        echo '```'
    done
} >"$REPORT"
echo
log "report written to $REPORT"
