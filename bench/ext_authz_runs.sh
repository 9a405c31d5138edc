#!/usr/bin/env bash
# bench/ext_authz_runs.sh: the ext_authz goals of BENCHMARKS.md §4 over several runs, not one.
#
# Runs `bash bench/ext_authz.sh` RUNS times (peak with h2load, half of it with h2load, half of
# it evenly paced by examples/ext_authz_load) and summarizes: per run, Checks/s and CPU per
# Check at peak, and the paced p99 at half of the peak beside the paced client's own lateness;
# then in how many runs the paced p99 was under 1 ms, and the medians. A run in which the
# client itself sent late (its p99 lateness over 0.2 ms: the machine stalled both) is marked,
# since its p99 is the machine's.
#
#   cargo build --release --bin keygate && cargo build --release --example ext_authz_load && RUNS=5 bash bench/ext_authz_runs.sh
#
# Other variables pass through to bench/ext_authz.sh (PACED, FLOOR, CLIENTS, STREAMS, ...).
#
# PROXY=1 also runs the proxy after each run (`CONTENDERS=keygate bash bench/load.sh`, the same
# KEYGATE) and sets the CPU per Check at peak beside the proxy's CPU per request of the same
# minutes: the goal "a Check costs at most half a proxied request", counted run by run.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${RUNS:-5}"
PACED="${PACED:-0.5}"
export PACED
if [[ -n "${CALLGRIND:-}" ]]; then
    echo "CALLGRIND counts instructions: run bench/ext_authz.sh for that, not this" >&2
    exit 2
fi
outs=()
for i in $(seq 1 "$RUNS"); do
    out=$(bash bench/ext_authz.sh 2>&1) || { echo "$out" >&2; exit 1; }
    echo "$out" | grep -q '^paced client: ' || { echo "run $i: no paced run (build examples/ext_authz_load)" >&2; echo "$out" >&2; exit 1; }
    if [[ -n "${PROXY:-}" ]]; then
        proxy=$(CONTENDERS=keygate bash bench/load.sh 2>&1) || { echo "$proxy" >&2; exit 1; }
        report=$(echo "$proxy" | sed -n 's/.*report written to \(.*\)$/\1/p' | tail -1)
        [[ -f "$report" ]] || { echo "run $i: no proxy report" >&2; echo "$proxy" >&2; exit 1; }
        # | keygate | req/s | p50 | p99 | CPU µs/req (core N% busy) | ...
        cpu=$(sed -n 's/^| keygate | [^|]*| [^|]*| [^|]*| \([0-9.]*\) .*/\1/p' "$report" | head -1)
        [[ -n "$cpu" ]] || { echo "run $i: no keygate row in $report" >&2; exit 1; }
        out="$out
proxy cpu: $cpu"
    fi
    outs+=("$out")
    echo "run $i/$RUNS done" >&2
done

python3 - "$PACED" "${outs[@]}" <<'PY'
import statistics, sys

paced_at = float(sys.argv[1])

rows = []
ratios = []
for out in sys.argv[2:]:
    peak = next(l for l in out.splitlines() if l.startswith("| peak |"))
    cells = [c.strip() for c in peak.strip().strip("|").split("|")]
    rate, cpu = float(cells[1].replace(",", "")), float(cells[4])
    paced = next(l for l in out.splitlines() if l.startswith("paced client: ")).split()
    # paced client: rate <asked> <achieved> ok <n> failed <n> p50 <ms> p90 <ms> p99 <ms> p99.9 <ms> max <ms> late-p99 <ms>
    f = dict(zip(paced[5::2], paced[6::2]))
    half = next(l for l in out.splitlines() if l.startswith("| half-peak |"))
    half_p99 = float([c.strip() for c in half.strip().strip("|").split("|")][3].split()[0])
    rows.append((rate, cpu, float(f["p99"]), float(f["late-p99"]), half_p99))
    proxy = [l for l in out.splitlines() if l.startswith("proxy cpu: ")]
    if proxy:
        ratios.append((cpu, float(proxy[0].split()[-1])))

print(f"| run | peak Checks/s | CPU µs/Check at peak | h2load p99 at half of the peak | paced p99 at {paced_at:g} × peak | client's own lateness p99 |")
print("|---|---:|---:|---:|---:|---:|")
for i, (rate, cpu, p99, late, half_p99) in enumerate(rows, 1):
    mark = " (client late)" if late > 0.2 else ""
    print(f"| {i}{mark} | {rate:,.0f} | {cpu:.2f} | {half_p99:.2f} ms | {p99:.2f} ms | {late:.2f} ms |")
n = len(rows)
under = sum(r[2] < 1.0 for r in rows)
late = sum(r[3] > 0.2 for r in rows)
print()
print(f"h2load's p99 at half of the peak under 1 ms in {sum(r[4] < 1.0 for r in rows)} of {n} runs "
      f"(median {statistics.median(r[4] for r in rows):.2f} ms).")
print(f"paced p99 at {paced_at:g} × peak under 1 ms in {under} of {n} runs (median {statistics.median(r[2] for r in rows):.2f} ms); "
      f"CPU per Check at peak median {statistics.median(r[1] for r in rows):.2f} µs."
      + (f" {late} run(s) with the client itself late: rerun on a quiet machine." if late else ""))
if ratios:
    print()
    print("| run | CPU µs/Check at peak | proxy CPU µs/request | Check / proxied request |")
    print("|---|---:|---:|---:|")
    for i, (check, proxy) in enumerate(ratios, 1):
        print(f"| {i} | {check:.2f} | {proxy:.2f} | {check / proxy:.2f}× |")
    r = [c / p for c, p in ratios]
    print()
    print(f"a Check at most half a proxied request in {sum(x <= 0.5 for x in r)} of {len(r)} runs "
          f"(median {statistics.median(r):.2f}×).")
PY
