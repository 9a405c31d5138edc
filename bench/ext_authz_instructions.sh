#!/usr/bin/env bash
# Deterministic user-space cost per ext_authz Check: instructions counted by
# valgrind --tool=callgrind while h2load sends gRPC-framed CheckRequests (the same request as
# bench/ext_authz.sh: a valid key, 4 headers; 10 connections x 10 streams). Unlike CPU time
# under h2load, the count does not move with whatever else the machine is doing, so it is the
# figure to compare two builds with. It excludes the kernel.
#
# Method (as bench/instructions.sh): the server runs under callgrind twice, answering N1 and
# then N2 Checks; instructions per Check = (total(N2) - total(N1)) / (N2 - N1), which cancels
# start-up (snapshot parsing) and shutdown. Under valgrind sha2 cannot use SHA-NI: keygate's
# count includes ~3.6k instructions of software SHA-256 that real hardware does in ~0.1 µs.
#
# Usage: cargo build --release && bash bench/ext_authz_instructions.sh
#        KEYGATE=path/to/another/keygate bash bench/ext_authz_instructions.sh   (another build)
#        cargo build --release --example ext_authz_floor && FLOOR=1 bash bench/ext_authz_instructions.sh
#        KEEP=DIR keeps the callgrind outputs (callgrind_annotate DIR/*.out: where they go)
# Needs: valgrind, h2load (nghttp2-client), python3 with grpcio + xds-protos.
set -euo pipefail
cd "$(dirname "$0")/.."
KEYGATE=${KEYGATE:-${CARGO_TARGET_DIR:-target}/release/keygate}
FLOOR_BIN=${FLOOR_BIN:-${CARGO_TARGET_DIR:-target}/release/examples/ext_authz_floor}
KEYS=${KEYS:-10000}
N1=${N1:-100}
N2=${N2:-5100}
for tool in valgrind callgrind_annotate h2load python3; do
  command -v "$tool" >/dev/null || { echo "missing: $tool (apt-get install -y valgrind nghttp2-client)"; exit 1; }
done
TMP=$(mktemp -d /tmp/keygate-extauthz-instr.XXXXXX)
PID=""
cleanup() {
  [ -n "$PID" ] && kill "$PID" 2>/dev/null || true
  if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP" && cp "$TMP"/*.out "$KEEP"/ 2>/dev/null || true; fi
  rm -rf "$TMP"
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

# measure N -> prints the total instructions of a run answering N Checks
measure() {
  local n=$1
  if [ -n "${FLOOR:-}" ]; then
    valgrind --tool=callgrind --callgrind-out-file="$TMP/floor-$n.out" "$FLOOR_BIN" "127.0.0.1:$PORT" 2>"$TMP/vg-$n.log" &
  else
    valgrind --tool=callgrind --callgrind-out-file="$TMP/keygate-$n.out" "$KEYGATE" serve --config "$TMP/keygate.toml" 2>"$TMP/vg-$n.log" &
  fi
  PID=$!
  ready || { echo "no allow answered; valgrind's log:" >&2; tail -20 "$TMP/vg-$n.log" >&2; exit 1; }
  local out ok
  out=$(h2load -n "$n" -c 10 -m 10 -d "$TMP/body.bin" -H 'content-type: application/grpc' -H 'te: trailers' \
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
