#!/usr/bin/env bash
# Deterministic user-space cost per proxied request: instructions counted by
# valgrind --tool=callgrind, for keygate and for nginx doing the same key check.
# Unlike CPU time under wrk, the count does not move with whatever else the machine is doing,
# so it is the figure to compare two builds with. It excludes the kernel (network stack),
# which is about the same for both proxies (same syscalls per request; see BENCHMARKS.md).
#
# Method: each proxy runs under callgrind twice, serving N1 and then N2 requests (h2load,
# HTTP/1.1, 10 connections, one valid X-API-Key); instructions per request =
# (total(N2) - total(N1)) / (N2 - N1), which cancels start-up (snapshot parsing) and shutdown.
# Note: under valgrind sha2 cannot use the SHA-NI instructions, so keygate's count includes
# ~3.5k instructions of software SHA-256 that real hardware does in ~0.1 µs.
#
# Usage: cargo build --release && bash bench/instructions.sh
# Needs: valgrind, h2load (nghttp2-client), nginx, python3, curl.
set -euo pipefail
cd "$(dirname "$0")/.."
KEYGATE=${KEYGATE:-target/release/keygate}
KEYS=${KEYS:-10000}
N1=${N1:-100}
N2=${N2:-5100}
for tool in valgrind callgrind_annotate h2load nginx python3 curl; do
  command -v "$tool" >/dev/null || { echo "missing: $tool (apt-get install -y valgrind nghttp2-client nginx)"; exit 1; }
done
[ -x "$KEYGATE" ] || { echo "no $KEYGATE: cargo build --release first"; exit 1; }

TMP=$(mktemp -d /tmp/keygate-instr.XXXXXX)
PIDS=()
# KEEP=DIR keeps the callgrind outputs there, for callgrind_annotate (where the instructions go).
# CALLGRIND_FLAGS="--cache-sim=yes --branch-sim=yes" also simulates caches and branch prediction
# (see the kept outputs for the miss counts; the table still compares instructions).
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP" && cp "$TMP"/*.out "$KEEP"/ 2>/dev/null || true; fi
  rm -rf "$TMP"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

python3 bench/gen_keys.py "$KEYS" "$TMP" >/dev/null
KEY=$(head -1 "$TMP/keys.txt")
UP=$(free_port); KG=$(free_port); NG=$(free_port)

mkdir -p "$TMP/up" "$TMP/gate"
cat > "$TMP/up/nginx.conf" <<CONF
worker_processes 1; daemon off; error_log $TMP/up/error.log; pid $TMP/up/nginx.pid;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$UP; location / { default_type application/json; return 200 '{"ok":true}'; } } }
CONF
nginx -p "$TMP/up" -c "$TMP/up/nginx.conf" & PIDS+=($!)

cat > "$TMP/keygate.toml" <<CONF
environment = "live"
[[key_prefixes]]
prefix = "sk_live_"
environment = "live"
checksum = true
[snapshot]
path = "$TMP/keys.json"
[proxy]
listen = "127.0.0.1:$KG"
upstream = "http://127.0.0.1:$UP"
[log]
level = "warn"
[runtime]
flavor = "current_thread"
CONF
# KEYGATE_EXTRA_TOML (printf %b: "\n" is a newline) is appended, e.g. to measure rate limits:
#   KEYGATE_EXTRA_TOML='[rate_limit]\ndefault_per_minute = 1000000000' bash bench/instructions.sh
if [ -n "${KEYGATE_EXTRA_TOML:-}" ]; then printf '%b\n' "$KEYGATE_EXTRA_TOML" >>"$TMP/keygate.toml"; fi

cat > "$TMP/gate/nginx.conf" <<CONF
worker_processes 1; master_process off; daemon off;
error_log $TMP/gate/error.log; pid $TMP/gate/nginx.pid;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 1000000;
  map \$http_x_api_key \$partner { default ""; include $TMP/nginx-keys.map; }
  map \$http_x_api_key \$key_id { default ""; include $TMP/nginx-key-ids.map; }
  upstream up { server 127.0.0.1:$UP; keepalive 64; }
  server { listen 127.0.0.1:$NG;
    location / {
      if (\$partner = "") { return 401 '{"error":"invalid_api_key"}'; }
      proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_set_header X-API-Key ""; proxy_set_header x-partner-id \$partner;
      proxy_set_header x-key-id \$key_id; proxy_set_header x-scopes "analyses:read analyses:write";
      proxy_pass http://up; } } }
CONF

wait_up() { # url
  for _ in $(seq 1 200); do curl -s -o /dev/null "$1" && return 0; sleep 0.1; done
  echo "not answering: $1"; exit 1
}

# measure NAME PORT SIGNAL N CMD... -> prints total instructions
measure() {
  local name=$1 port=$2 sig=$3 n=$4; shift 4
  # shellcheck disable=SC2086 # CALLGRIND_FLAGS is a list of flags
  valgrind --tool=callgrind ${CALLGRIND_FLAGS:-} --callgrind-out-file="$TMP/$name-$n.out" "$@" 2>"$TMP/$name-$n.vg" &
  local pid=$!
  wait_up "http://127.0.0.1:$port/"
  local ok
  ok=$(h2load --h1 -n "$n" -c 10 -H "x-api-key: $KEY" "http://127.0.0.1:$port/v1/analyses/1" | sed -n 's/^status codes: \([0-9]*\) 2xx.*/\1/p')
  [ "$ok" = "$n" ] || { echo "$name: only $ok of $n requests answered 2xx"; exit 1; }
  kill "-$sig" "$pid"; wait "$pid" || true
  callgrind_annotate "$TMP/$name-$n.out" 2>/dev/null | sed -n 's/^ *\([0-9,]*\) .*PROGRAM TOTALS.*/\1/p' | tr -d ,
}

wait_up "http://127.0.0.1:$UP/"
declare -A per
for who in keygate nginx; do
  if [ "$who" = keygate ]; then
    a=$(measure keygate "$KG" INT "$N1" "$KEYGATE" serve --config "$TMP/keygate.toml")
    b=$(measure keygate "$KG" INT "$N2" "$KEYGATE" serve --config "$TMP/keygate.toml")
  else
    a=$(measure nginx "$NG" QUIT "$N1" nginx -p "$TMP/gate" -c "$TMP/gate/nginx.conf")
    b=$(measure nginx "$NG" QUIT "$N2" nginx -p "$TMP/gate" -c "$TMP/gate/nginx.conf")
  fi
  per[$who]=$(( (b - a) / (N2 - N1) ))
done
echo "| proxy | user-space instructions per request | vs nginx |"
echo "|---|---:|---:|"
echo "| nginx-gate | ${per[nginx]} | 1.00× |"
python3 -c "print('| keygate | ${per[keygate]} | %.2f× |' % (${per[keygate]}/${per[nginx]}))"
