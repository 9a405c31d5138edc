#!/usr/bin/env bash
# bench/pairs.sh: the proxy goals of BENCHMARKS.md §2 over several runs, not one.
#
# One bench/load.sh run compares nginx-gate and keygate in the same minutes, but on a VM whose
# speed moves by 20% from one minute to the next a single run can land either way. This runs
# `CONTENDERS="nginx keygate" bash bench/load.sh` PAIRS times in a row (each run measures nginx
# first, then keygate; with INTERLEAVE=1 both at once) and summarizes the reports: per run, keygate's CPU per request against
# nginx's and both p99s; then how many runs met each goal (CPU ≤ 1.0×, keygate's p99 ≤ nginx's)
# and the medians.
#
#   cargo build --release && PAIRS=10 bash bench/pairs.sh
#
# p99 at a fixed rate, both proxies meeting the same moments of the machine (§2, "The pauses"):
#
#   cargo build --release --example http_load
#   PAIRS=10 RATE=30000 INTERLEAVE=1 bash bench/pairs.sh
#
# Every other variable is passed to bench/load.sh (KEYS, DURATION, KEYGATE, ...). Run it with
# nothing else on the machine: a build or another benchmark moves both proxies' figures.
set -euo pipefail
cd "$(dirname "$0")/.."
PAIRS="${PAIRS:-10}"
RESULTS_DIR="${RESULTS_DIR:-bench/results}"
export RESULTS_DIR
reports=()
for i in $(seq 1 "$PAIRS"); do
    # Interleaved, each proxy is sent the first request of every pair in half of the runs.
    first=nginx
    if [[ "${INTERLEAVE:-0}" == 1 ]] && (( i % 2 == 0 )); then first=keygate; fi
    out=$(CONTENDERS="nginx keygate" INTERLEAVE_FIRST="$first" bash bench/load.sh 2>&1) || { echo "$out" >&2; exit 1; }
    report=$(echo "$out" | sed -n 's/.*report written to \(.*\)$/\1/p' | tail -1)
    [[ -f "$report" ]] || { echo "run $i: no report found in its output" >&2; echo "$out" >&2; exit 1; }
    reports+=("$report")
    echo "run $i/$PAIRS: $report" >&2
done

python3 - "${reports[@]}" <<'PY'
import re, statistics, sys

def ms(text):
    v, unit = re.match(r"([\d.]+)\s*(ms|µs|us|s)", text.strip()).groups()
    return float(v) * {"ms": 1.0, "µs": 1e-3, "us": 1e-3, "s": 1e3}[unit]

rows = []
for path in sys.argv[1:]:
    found, busy = {}, {}
    text = open(path, encoding="utf-8").read()
    # INTERLEAVE=1: both proxies shared core 0 at once, each the other's "other work".
    together = "INTERLEAVE=1" in text
    order = (" (keygate first)" if "keygate first)" in text else " (nginx first)") if together else ""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 5 or cells[0] not in ("nginx-gate", "keygate"):
            continue
        if cells[0] not in found:  # the results table, the report's first
            try:
                found[cells[0]] = (ms(cells[3]), float(cells[4].split()[0]))
            except (AttributeError, ValueError):
                sys.exit(f"{path}: {cells[0]} was not measured ({line.strip()})")
        elif cells[0] not in busy:  # the CPU table: the proxy's share of core 0, core 0 busy
            busy[cells[0]] = (float(cells[1].rstrip("%")), float(cells[2].rstrip("%")))
    if len(found) != 2:
        sys.exit(f"{path}: no nginx-gate and keygate rows")
    (np99, ncpu), (kp99, kcpu) = found["nginx-gate"], found["keygate"]
    # Core 0 is the proxy's alone in a clean run: more than 10 points of it spent by other
    # tasks (a build, another benchmark) make the run say little.
    # INJECT_PAUSES=FOR/EVERY: the injector's share of core 0 is not a stranger's either.
    injected = re.search(r"INJECT_PAUSES=(\d+)/(\d+)", text)
    injected = 100 * int(injected[1]) / (int(injected[1]) + int(injected[2])) if injected else 0.0
    if together and len(busy) == 2:
        others = [busy["keygate"][1] - busy["keygate"][0] - busy["nginx-gate"][0]]
    else:
        others = [core - own for own, core in busy.values()]
    shared = max(others, default=0.0) - injected > 10
    rows.append((path, ncpu, kcpu, kcpu / ncpu, np99, kp99, shared, order))

print("| run | nginx CPU µs/req | keygate CPU µs/req | keygate vs nginx | p99 nginx / keygate (ms) |")
print("|---|---:|---:|---:|---:|")
for i, (path, ncpu, kcpu, ratio, np99, kp99, shared, order) in enumerate(rows, 1):
    note = order + (" (core 0 shared with other work)" if shared else "")
    print(f"| {i}{note} | {ncpu:.2f} | {kcpu:.2f} | {ratio:.2f}× | {np99:.2f} / {kp99:.2f} |")
n = len(rows)
shared = sum(r[6] for r in rows)
cpu_met = sum(r[3] <= 1.0 for r in rows)
p99_met = sum(r[5] <= r[4] for r in rows)
print()
print(f"CPU per request ≤ nginx's in {cpu_met} of {n} runs, median {statistics.median(r[3] for r in rows):.3f}×; "
      f"p99 ≤ nginx's in {p99_met} of {n} runs, median p99 {statistics.median(r[5] for r in rows):.2f} ms "
      f"(nginx {statistics.median(r[4] for r in rows):.2f} ms)."
      + (f" {shared} run(s) had core 0 shared with other work: rerun on a quiet machine." if shared else ""))
PY
