#!/usr/bin/env python3
"""Counts what a safety sweep ran (scripts/sweep.sh): reads the per-seed progress lines of
every chunk-*.err in the given directories (a seed run twice counts once; if its two runs
disagree on the outcome or, where both printed one, on the trace hash, that is reported).

    scripts/sweep_tally.py DIR [DIR...] [--target 1000]

Exit status 1 if any seed was unsafe, not live or inconsistent."""
import glob
import re
import sys
from collections import Counter

LINE = re.compile(
    r"seed (\d+) (\S+) passed=(\w+) live=(\w+) violations=(\d+).*?(?:trace=([0-9a-f]{64}) )?([\d.]+) s$"
)


def main(argv):
    target = 1000
    dirs = []
    it = iter(argv)
    for a in it:
        if a == "--target":
            target = int(next(it))
        else:
            dirs.append(a)
    if not dirs:
        print(__doc__)
        return 2
    seeds, clashes = {}, []
    for d in dirs:
        for f in sorted(glob.glob(d + "/chunk-*.err")):
            for line in open(f):
                m = LINE.match(line.strip())
                if not m:
                    continue
                seed = int(m[1])
                run = (m[2], m[3] == "true", m[4] == "true", int(m[5]), m[6], float(m[7]))
                old = seeds.get(seed)
                if old:
                    same = old[:4] == run[:4] and (not old[4] or not run[4] or old[4] == run[4])
                    if not same:
                        clashes.append(seed)
                    run = run if run[4] else old
                seeds[seed] = run
    if not seeds:
        print("no seeds found")
        return 1
    unsafe = sorted(k for k, v in seeds.items() if v[3] > 0)
    not_live = sorted(k for k, v in seeds.items() if not v[2])
    missing = [k for k in range(1, target + 1) if k not in seeds]
    per = Counter(v[0] for v in seeds.values())
    secs = [v[5] for v in seeds.values()]
    print(f"seeds: {len(seeds)} (of 1..{target}: {target - len(missing)})")
    print(f"unsafe: {unsafe or 'none'}; not live: {not_live or 'none'}; inconsistent reruns: {clashes or 'none'}")
    print("per strategy: " + ", ".join(f"{k} {v}" for k, v in sorted(per.items())))
    print(f"wall per seed: mean {sum(secs) / len(secs):.1f} s, max {max(secs):.1f} s")
    if missing:
        ranges, start = [], missing[0]
        for a, b in zip(missing, missing[1:] + [None]):
            if b != a + 1:
                ranges.append(f"{start}-{a}" if a > start else f"{start}")
                start = b
        print(f"missing: {len(missing)}: {', '.join(ranges[:12])}{' ...' if len(ranges) > 12 else ''}")
    return 1 if unsafe or not_live or clashes else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
