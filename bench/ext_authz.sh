#!/usr/bin/env bash
# ext_authz Check throughput, latency and CPU per Check, with h2load (HTTP/2) sending a
# gRPC-framed CheckRequest (a 0 byte, a 4-byte big-endian length, the serialized message) built
# with Envoy's published protos (xds-protos). keygate pinned to PROXY_CPU, h2load to LOAD_CPU.
#
# Two runs: peak (as fast as h2load can send: CLIENTS connections x STREAMS streams), then at
# half of the measured peak (--rps) for the latency goal. Latency percentiles come from
# h2load's per-request log.
#
# CALLGRIND=1 counts user-space instructions per Check instead, with valgrind --tool=callgrind:
# the server answers N1 and then N2 Checks (CLIENTS connections x STREAMS streams) and instructions per
# Check = (total(N2) - total(N1)) / (N2 - N1), which cancels start-up and shutdown (as
# bench/instructions.sh). Unlike CPU time it does not move with whatever else the machine does:
# the figure to compare two builds with. Under valgrind sha2 cannot use SHA-NI: keygate's count
# includes ~3.6k instructions of software SHA-256. KEEP=DIR keeps the callgrind outputs.
# CALLGRIND_FLAGS="--cache-sim=yes" also counts simulated instruction-cache misses per Check
# (with CLIENTS=1 STREAMS=1 every Check arrives alone: the cost of a wake-up's code).
#
# Usage: cargo build --release && bash bench/ext_authz.sh
#        cargo build --release --example ext_authz_floor && FLOOR=1 bash bench/ext_authz.sh
#        (the same load against an empty tonic Authorization server: the gRPC stack's floor)
#        CALLGRIND=1 bash bench/ext_authz.sh     (also with FLOOR=1, or KEYGATE=another/build)
#        With examples/ext_authz_load built (cargo build --release --example ext_authz_load), a
#        third run sends half the peak rate (PACED=0.4: 40%) evenly paced, not in h2load's bursts.
# Needs: h2load (nghttp2-client), python3 with grpcio + xds-protos, taskset; valgrind for
# CALLGRIND.
set -euo pipefail
cd "$(dirname "$0")/.."
KEYGATE=${KEYGATE:-${CARGO_TARGET_DIR:-target}/release/keygate}
FLOOR_BIN=${FLOOR_BIN:-${CARGO_TARGET_DIR:-target}/release/examples/ext_authz_floor}
LOAD_BIN=${LOAD_BIN:-${CARGO_TARGET_DIR:-target}/release/examples/ext_authz_load}
N1=${N1:-100}
N2=${N2:-5100}
N=${N:-200000}
CLIENTS=${CLIENTS:-10}
STREAMS=${STREAMS:-10}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
KEYS=${KEYS:-10000}
TMP=$(mktemp -d /tmp/keygate-extauthz.XXXXXX)
# h2load's request logs go elsewhere than the snapshot's directory, which keygate watches.
LOGS=$(mktemp -d /tmp/keygate-extauthz-logs.XXXXXX)
PID=""
cleanup() {
  [ -n "$PID" ] && kill "$PID" 2>/dev/null
  if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP" && cp "$TMP"/*.out "$KEEP"/ 2>/dev/null; fi
  rm -rf "$TMP" "$LOGS"
}
trap cleanup EXIT

python3 bench/gen_keys.py "$KEYS" "$TMP" >/dev/null 2>&1
KEY=$(head -1 "$TMP/keys.txt")
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$TMP/keygate.toml" <<CONF
environment = "live"
[[key_prefixes]]
prefix = "sk_live_"
environment = "live"
checksum = true
[snapshot]
path = "$TMP/keys.json"
[ext_authz]
listen = "127.0.0.1:$PORT"
[log]
level = "warn"
[runtime]
flavor = "current_thread"
[shutdown]
delay = "0s"
CONF

python3 - "$TMP/body.bin" "$KEY" <<'PY'
import struct, sys
from envoy.config.core.v3 import address_pb2
from envoy.service.auth.v3 import attribute_context_pb2 as ac, external_auth_pb2 as ea
req = ea.CheckRequest(attributes=ac.AttributeContext(
    source=ac.AttributeContext.Peer(address=address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address="10.0.0.7", port_value=40000))),
    request=ac.AttributeContext.Request(http=ac.AttributeContext.HttpRequest(
        method="GET", path="/v1/analyses/1?x=1", host="api.example.com",
        headers={"x-api-key": sys.argv[2], "user-agent": "bench", "accept": "*/*",
                 "x-request-id": "0f1e2d3c4b5a69788796a5b4c3d2e1f0"}))))
msg = req.SerializeToString()
open(sys.argv[1], "wb").write(b"\x00" + struct.pack(">I", len(msg)) + msg)
PY

# Waits until the server answers a Check, and checks it is an allow (the floor answers OK).
ready() {
  python3 - "$PORT" "$KEY" <<'PY'
import sys, time, grpc
from envoy.service.auth.v3 import attribute_context_pb2 as ac, external_auth_pb2 as ea, external_auth_pb2_grpc as eag
stub = eag.AuthorizationStub(grpc.insecure_channel(f"127.0.0.1:{sys.argv[1]}"))
for _ in range(600):
    try:
        r = stub.Check(ea.CheckRequest(attributes=ac.AttributeContext(request=ac.AttributeContext.Request(
            http=ac.AttributeContext.HttpRequest(method="GET", path="/v1/analyses/1", headers={"x-api-key": sys.argv[2]})))), timeout=2)
        break
    except grpc.RpcError:
        time.sleep(0.2)
assert r.status.code == 0 and r.HasField("ok_response"), r
PY
}

if [ -n "${CALLGRIND:-}" ]; then

# measure N -> prints the total instructions of a run answering N Checks
measure() {
  local n=$1
  if [ -n "${FLOOR:-}" ]; then
    # shellcheck disable=SC2086 # CALLGRIND_FLAGS is a list of flags
    valgrind --tool=callgrind ${CALLGRIND_FLAGS:-} --callgrind-out-file="$TMP/floor-$n.out" "$FLOOR_BIN" "127.0.0.1:$PORT" 2>"$TMP/vg-$n.log" &
  else
    # shellcheck disable=SC2086
    valgrind --tool=callgrind ${CALLGRIND_FLAGS:-} --callgrind-out-file="$TMP/keygate-$n.out" "$KEYGATE" serve --config "$TMP/keygate.toml" 2>"$TMP/vg-$n.log" &
  fi
  PID=$!
  ready || { echo "no allow answered; valgrind's log:" >&2; tail -20 "$TMP/vg-$n.log" >&2; exit 1; }
  local out ok
  out=$(h2load -n "$n" -c "$CLIENTS" -m "$STREAMS" -d "$TMP/body.bin" -H 'content-type: application/grpc' -H 'te: trailers' \
        "http://127.0.0.1:$PORT/envoy.service.auth.v3.Authorization/Check")
  ok=$(echo "$out" | sed -n 's/^status codes: \([0-9]*\) 2xx.*/\1/p')
  [ "$ok" = "$n" ] || { echo "only $ok of $n Checks answered 200" >&2; echo "$out" >&2; exit 1; }
  # keygate drains on SIGINT; the floor has no handler, and a background job ignores SIGINT.
  if [ -n "${FLOOR:-}" ]; then kill -TERM "$PID"; else kill -INT "$PID"; fi
  wait "$PID" || true; PID=""
  callgrind_annotate "$TMP"/*-"$n".out 2>/dev/null | sed -n 's/^ *\([0-9,]*\) .*PROGRAM TOTALS.*/\1/p' | tr -d ,
}

a=$(measure "$N1")
b=$(measure "$N2")
who=keygate; [ -n "${FLOOR:-}" ] && who="empty tonic handler"
echo "| server | Checks measured | user-space instructions per Check |"
echo "|---|---:|---:|"
echo "| $who | $((N2 - N1)) | $(( (b - a) / (N2 - N1) )) |"
exit 0
fi

if [ -n "${FLOOR:-}" ]; then
  # The floor: an empty tonic Authorization server (examples/ext_authz_floor.rs), same load.
  taskset -c "$PROXY_CPU" "$FLOOR_BIN" "127.0.0.1:$PORT" &
else
  taskset -c "$PROXY_CPU" "$KEYGATE" serve --config "$TMP/keygate.toml" &
fi
PID=$!
for _ in $(seq 1 100); do
  python3 -c "import socket; socket.create_connection(('127.0.0.1', $PORT), 0.2)" 2>/dev/null && break
  sleep 0.1
done

cpu_ticks() { awk '{print $14 + $15}' "/proc/$PID/stat"; }
HZ=$(getconf CLK_TCK)

run() { # label, extra h2load args...
  local label=$1; shift
  local before after out
  before=$(cpu_ticks)
  out=$(taskset -c "$LOAD_CPU" h2load -n "$N" -c "$CLIENTS" -m "$STREAMS" -d "$TMP/body.bin" \
        -H 'content-type: application/grpc' -H 'te: trailers' --log-file="$LOGS/$label.log" "$@" \
        "http://127.0.0.1:$PORT/envoy.service.auth.v3.Authorization/Check")
  after=$(cpu_ticks)
  local rps ok
  rps=$(echo "$out" | sed -n 's/^finished in .*, \([0-9.]*\) req\/s.*/\1/p')
  ok=$(echo "$out" | sed -n 's/^status codes: \([0-9]*\) 2xx.*/\1/p')
  [ "$ok" = "$N" ] || { echo "$label: only $ok of $N answered 200"; echo "$out"; exit 1; }
  python3 - "$LOGS/$label.log" "$label" "$rps" "$((after - before))" "$HZ" "$N" <<'PY'
import sys
path, label, rps, ticks, hz, n = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
lat = sorted(int(line.split()[2]) for line in open(path) if line.strip())
p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] / 1000.0
cpu_us = ticks / hz * 1e6 / n
print(f"| {label} | {rps:,.0f} | {p(0.5):.2f} ms | {p(0.99):.2f} ms | {cpu_us:.2f} |")
PY
  echo "$rps" > "$TMP/$label.rps"
}

# The gRPC response must really be an allow: check one Check through Python first.
ready

echo "| run | Checks/s | p50 | p99 | keygate CPU µs/Check |"
echo "|---|---:|---:|---:|---:|"
run peak
PEAK=$(cat "$TMP/peak.rps")
HALF=$(python3 -c "print(max(1, int(float('$PEAK') / 2 / $CLIENTS)))")
run "half-peak" --rps="$HALF"

# The same load paced evenly (examples/ext_authz_load.rs): h2load's --rps sends each
# connection's Checks on a libev timer that ticks in whole milliseconds, so they leave in bursts;
# this client sends Check i at start + i/rate and measures it from that due time. PACED sets
# the rate as a fraction of the peak (default 0.5).
if [ -x "$LOAD_BIN" ]; then
  before=$(cpu_ticks)
  out=$(taskset -c "$LOAD_CPU" "$LOAD_BIN" --addr "127.0.0.1:$PORT" --body "$TMP/body.bin" \
        --rate "$(python3 -c "print(float('$PEAK') * ${PACED:-0.5})")" --requests "$N" \
        --warmup "$((N / 10))" --connections "$CLIENTS" --streams "$STREAMS") \
    || { echo "paced run failed: $out"; exit 1; }
  after=$(cpu_ticks)
  python3 - "$out" "$((after - before))" "$HZ" "$((N + N / 10))" "${PACED:-0.5}" <<'PY'
import sys
f = sys.argv[1].split()  # rate <asked> <achieved> ok <n> failed <n> p50 <ms> p90 <ms> p99 <ms> ...
achieved, p50, p99 = float(f[2]), float(f[8]), float(f[12])
cpu_us = int(sys.argv[2]) / int(sys.argv[3]) * 1e6 / int(sys.argv[4])
print(f"| {sys.argv[5]} × peak, paced | {achieved:,.0f} | {p50:.2f} ms | {p99:.2f} ms | {cpu_us:.2f} |")
PY
  echo
  echo "paced client: $out"
else
  echo
  echo "(no $LOAD_BIN: cargo build --release --example ext_authz_load for the paced run)"
fi
