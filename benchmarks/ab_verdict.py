"""Reads the three call_timeline.py logs of `run_on_device.sh ab` (ab_base, ab_change,
ab_base_again under DIR) and says whether the change is faster than both runs of the tree.

    python3 benchmarks/ab_verdict.py DIR [--min-gain 0.02]

Prints each row's split-KV kernel median (us) for base / change / base again and the change's
gain against the faster of the two base runs, so that drift between runs counts against the
change. Exit status 0 when every row gains at least --min-gain (a fraction), 1 otherwise: a
script can keep or drop the change on it.
"""

import argparse
import pathlib
import re
import sys

LABELS = ("base", "change", "base_again")
ROW = re.compile(r"^(b=\d+ h_q=\d+ s_k=\d+):")
KERNEL = re.compile(r"^\s+split_kv\S*.*median\s+([0-9.]+) us")


def kernel_medians(log):
    """{row: median us of the split-KV kernel} from one call_timeline.py log."""
    medians, row = {}, None
    for line in pathlib.Path(log).read_text().splitlines():
        if m := ROW.match(line):
            row = m.group(1)
        elif row is not None and (m := KERNEL.match(line)):
            medians[row] = float(m.group(1))
    return medians


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("dir", type=pathlib.Path)
    parser.add_argument("--min-gain", type=float, default=0.02)
    args = parser.parse_args()
    runs = {label: kernel_medians(args.dir / f"ab_{label}" / "call_timeline.log")
            for label in LABELS}
    rows = [row for row in runs["base"] if all(row in runs[label] for label in LABELS)]
    if not rows:
        print("no row in all three logs")
        return 1
    every_row_gains = True
    for row in rows:
        base, change, again = (runs[label][row] for label in LABELS)
        gain = 1.0 - change / min(base, again)
        every_row_gains &= gain >= args.min_gain
        print(f"{row}: base {base:.1f} / change {change:.1f} / base again {again:.1f} us, "
              f"gain {100 * gain:+.1f}%")
    print("verdict:", "keep" if every_row_gains else "drop")
    return 0 if every_row_gains else 1


if __name__ == "__main__":
    sys.exit(main())
