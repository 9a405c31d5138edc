#!/usr/bin/env python3
"""bench/pauses.py: how often, and for how long, each core of this machine stops running us.

One busy loop pinned to each core reads the clock as fast as it can for SECONDS; any gap over
0.5 ms between two readings is a moment the core did something else (a kernel thread, an
interrupt, another process, or, on a VM, the host not running this virtual CPU at all). A
proxy's p99 cannot be below what these pauses do to 1% of its requests, so run this before
trusting a p99 from bench/load.sh: if the cores stop for milliseconds about once a second, a
p99 mostly counts the pauses each run met (BENCHMARKS.md §2, "The pauses of the machine").

    python3 bench/pauses.py [SECONDS=10]

Prints, per core: the pauses over 0.5 ms, their total in ms and as a share of the run, and the
longest five. Both cores are busy during it, as in a load run.

    python3 bench/pauses.py --inject CORE EVERY_MS FOR_MS

makes pauses instead: every EVERY_MS it takes core CORE for FOR_MS (a busy loop; run it as a
real-time task, `chrt -f 1`, so that it preempts whatever runs there at once), until killed or
its parent is gone. bench/load.sh does this with INJECT_PAUSES=FOR/EVERY: pauses several times
as frequent as the machine's own then set both proxies' tails, the same for each.
"""
import os
import sys
import time
from multiprocessing import Pool

THRESHOLD_S = 0.0005


def watch(args):
    core, seconds = args
    os.sched_setaffinity(0, {core})
    clock = time.perf_counter
    last = clock()
    end = last + seconds
    pauses = []
    while last < end:
        now = clock()
        if now - last > THRESHOLD_S:
            pauses.append(now - last)
        last = now
    return core, seconds, pauses


def inject(core, every_ms, for_ms):
    os.sched_setaffinity(0, {core})
    parent = os.getppid()
    clock = time.perf_counter
    start = clock()
    # On a fixed schedule (pause n starts at start + n * every), so that neither the pauses nor
    # the wake-ups' lateness add up into a longer period.
    n = 0
    while os.getppid() == parent:  # a real-time busy loop must not outlive its benchmark
        n += 1
        begin = start + n * every_ms / 1000
        wait = begin - clock()
        if wait > 0:
            time.sleep(wait)
        end = begin + for_ms / 1000
        while clock() < end:
            pass


def main():
    if len(sys.argv) == 5 and sys.argv[1] == "--inject":
        inject(int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]))
        return
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 10.0
    cores = sorted(os.sched_getaffinity(0))
    with Pool(len(cores)) as pool:
        results = pool.map(watch, [(core, seconds) for core in cores])
    for core, run, pauses in results:
        total = sum(pauses)
        longest = ", ".join(f"{p * 1000:.1f}" for p in sorted(pauses, reverse=True)[:5])
        print(
            f"core {core}: {len(pauses)} pauses over {THRESHOLD_S * 1000:g} ms in {run:g} s, "
            f"{total * 1000:.1f} ms in all ({100 * total / run:.2f}% of the run); "
            f"longest (ms): {longest or '-'}"
        )


if __name__ == "__main__":
    main()
