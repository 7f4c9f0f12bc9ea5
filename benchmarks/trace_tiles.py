"""Where a tile's time goes inside the split-KV kernels, from their own timestamps.

Needs the diagnostic build (kernel_trace.h), whose kernels print `TRACE cta warpgroup index
event tile clock` lines for a few CTAs:

    pip install --no-build-isolation --no-deps -e . -Ccmake.define.JAX_FLASH_MLA_TRACE=ON
    python3 benchmarks/trace_tiles.py run 128,128,4096 > trace.log   # one row per process
    python3 benchmarks/trace_tiles.py summarize trace.log
    python3 benchmarks/trace_tiles.py timeline trace.log 40 45   # CTA 0's events, tiles 40-45

Microseconds are cycles over --clock-ghz (default 1.98, the H200's maximum); under a heavy
tensor load the H200 runs at ~1.67 GHz (a traced CTA's cycles against the kernel's device
time), so pass the clock measured that way when the us matter.

`run` makes one paged decode call of shape b,h_q,s_k[,page][,fp8] (page 64, bf16 unless fp8
names the FP8 cache, d = 576) twice inside
jax.jit (profile_kernels.py's calls); the device prints each launch's records when the call synchronizes. `summarize` keeps
the last launch and prints, per warpgroup of each traced CTA, the median cycles between each
pair of consecutive events (a tile's steps: keys landed -> scores -> maxima shared -> P shared
-> P V done), and the producer's copy-to-landing latency of every tile. `timeline` prints
every record of CTA 0's last launch whose tile is in [first, last], all roles interleaved in
clock order, in cycles from the first: which step waits on which.
"""

import collections
import statistics
import sys

EVENTS = {
    0: "segment begin", 1: "query landed", 2: "keys landed", 3: "scores done",
    4: "maxima shared", 5: "P shared", 6: "P V done", 7: "segment end",
    8: "partials in", 9: "rows ready",
    10: "stage free", 11: "keys issued", 12: "query free", 13: "query issued",
    14: "handoff in", 15: "group landed",
}
SECOND_PRODUCER_WARP = 3  # kernel_trace.h's slot for the producer's second warp
KEYS_LANDED, SCORES_DONE, KEYS_ISSUED = 2, 3, 11


def role_of(wg, has_producer=True):
    """What trace slot `wg` records: slot 0 is the producer in kernels that have one."""
    if not has_producer:
        return f"math {wg}"
    return {0: "producer", SECOND_PRODUCER_WARP: "producer warp 1"}.get(wg, f"math {wg - 1}")


def last_launch(lines):
    """{(cta, warpgroup): [(event, tile, clock)]} of the last launch printed."""
    launches = collections.defaultdict(list)  # (cta, wg) -> list of launches
    for line in lines:
        parts = line.split()
        if len(parts) != 7 or parts[0] != "TRACE":
            continue
        cta, wg, index, event, tile, clock = (int(x) for x in parts[1:])
        runs = launches[(cta, wg)]
        if index == 0 or not runs:
            runs.append([])
        runs[-1].append((event, tile, clock))
    return {key: runs[-1] for key, runs in launches.items()}


def summarize(path, clock_ghz):
    records = last_launch(open(path, errors="replace"))
    if not records:
        print(f"{path}: no TRACE lines (not a JAX_FLASH_MLA_TRACE build?)")
        return
    us = lambda cycles: cycles / clock_ghz / 1e3
    for cta in sorted({c for c, _ in records}):
        start = min(r[0][2] for (c, _), r in records.items() if c == cta)
        end = max(r[-1][2] for (c, _), r in records.items() if c == cta)
        # Warpgroup 0 is a producer in the kernels that have one; in a kernel without one, the
        # math warpgroups issue the copies and slot 0 records scores.
        has_producer = not any(e == SCORES_DONE for e, _, _ in records.get((cta, 0), []))
        landed = [r for (c, w), r in records.items() if c == cta and w == 1]
        tiles = sum(1 for e, _, _ in (landed[0] if landed else []) if e == KEYS_LANDED)
        if not tiles:  # the seesaw kernel: each tile scored once, by one math warpgroup
            tiles = sum(1 for (c, _), r in records.items() if c == cta
                        for e, _, _ in r if e == SCORES_DONE)
        print(f"{path}: CTA {cta}: {tiles} tiles, {end - start} cycles ({us(end - start):.1f} us"
              f" at {clock_ghz} GHz), {us(end - start) / max(tiles, 1):.2f} us a tile")
        for wg in sorted(w for c, w in records if c == cta):
            steps = collections.defaultdict(list)
            events = records[(cta, wg)]
            for (e0, _, c0), (e1, _, c1) in zip(events, events[1:]):
                steps[(e0, e1)].append(c1 - c0)
            print(f"  warpgroup {wg} ({role_of(wg, has_producer)}): step, count, median cycles"
                  f" (us), total share")
            total = events[-1][2] - events[0][2] or 1
            for (e0, e1), d in sorted(steps.items(), key=lambda kv: -sum(kv[1])):
                print(f"    {EVENTS.get(e0, e0):>13} -> {EVENTS.get(e1, e1):<13} {len(d):5d}"
                      f" {statistics.median(d):8.0f} ({us(statistics.median(d)):5.2f})"
                      f" {100 * sum(d) / total:5.1f}%")
        issued = [c for e, _, c in records.get((cta, 0), []) if e == KEYS_ISSUED]
        if landed and issued:
            arrivals = [c for e, _, c in landed[0] if e == KEYS_LANDED]
            latency = [a - i for i, a in zip(issued, arrivals)]
            if not latency:  # no "keys landed" marks (the seesaw kernel's pieces)
                continue
            print(f"  keys issued -> math 0's wait returned: median {statistics.median(latency):.0f}"
                  f" cycles ({us(statistics.median(latency)):.2f} us), min {min(latency)},"
                  f" max {max(latency)}")


def timeline(path, first, last, cta=0):
    records = last_launch(open(path, errors="replace"))
    rows = sorted((clock, wg, event, tile) for (c, wg), events in records.items() if c == cta
                  for event, tile, clock in events if first <= tile <= last)
    if not rows:
        print(f"{path}: no records of CTA {cta} for tiles {first}-{last}")
        return
    for clock, wg, event, tile in rows:
        print(f"{clock - rows[0][0]:8d}  {role_of(wg):>15}  {EVENTS.get(event, event):<13}"
              f" tile {tile}")


if __name__ == "__main__":
    command, *args = sys.argv[1:] or ["help"]
    if command == "run":
        # This script's folder is on sys.path.
        from profile_kernels import main as profile_rows, parse_row

        profile_rows([parse_row(args[0])], 0)
    elif command == "summarize":
        ghz = float(args[args.index("--clock-ghz") + 1]) if "--clock-ghz" in args else 1.98
        for path in (a for i, a in enumerate(args) if a != "--clock-ghz" and
                     (i == 0 or args[i - 1] != "--clock-ghz")):
            summarize(path, ghz)
    elif command == "timeline":
        timeline(args[0], int(args[1]), int(args[2]))
    else:
        print(__doc__)
