"""Reads the call_timeline.py logs of `run_on_device.sh ab` under DIR (ab_base, one ab_change or
several ab_change_NAME, ab_base_again) and says, for each change, whether it is faster than both
runs of the tree.

    python3 benchmarks/ab_verdict.py DIR [--min-gain 0.02] [--metric kernel|span]

Prints each row's figure for base / change / base again and the change's gain against the
faster of the two base runs, so that drift between runs counts against the change. The figure
is the split-KV kernel's median (us), or with --metric span the GPU span per call (first
kernel's start to last kernel's end): the figure for a change that overlaps kernels, such as a
programmatic dependent launch, which can lengthen the kernel it lets start early. A change
whose log has a failed reference check is dropped whatever its times. Exit status 0 when every
change gains at least --min-gain (a fraction) on every row, 1 otherwise.
"""

import argparse
import pathlib
import re
import sys

ROW = re.compile(r"^(b=\d+ h_q=\d+ s_k=\d+(?: page=\d+)?(?: fp8)?):")
SPAN = re.compile(r"GPU span ([0-9.]+)")
KERNEL = re.compile(r"^\s+split_kv\S*.*median\s+([0-9.]+) us")
CHECK_FAILED = re.compile(r"^\s+check:.*FAILED")


def read_log(log, metric):
    """({row: figure in us}, whether a reference check failed) from one call_timeline.py log."""
    figures, row, failed = {}, None, False
    for line in pathlib.Path(log).read_text().splitlines():
        failed |= bool(CHECK_FAILED.match(line))
        if m := ROW.match(line):
            row = m.group(1)
            if metric == "span" and (s := SPAN.search(line)):
                figures[row] = float(s.group(1))
        elif metric == "kernel" and row is not None and (m := KERNEL.match(line)):
            figures[row] = float(m.group(1))
    return figures, failed


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("dir", type=pathlib.Path)
    parser.add_argument("--min-gain", type=float, default=0.02)
    parser.add_argument("--metric", choices=("kernel", "span"), default="kernel")
    args = parser.parse_args()

    def run(label):
        return read_log(args.dir / f"ab_{label}" / "call_timeline.log", args.metric)

    (base, _), (again, _) = run("base"), run("base_again")
    changes = sorted(d.name[len("ab_"):] for d in args.dir.glob("ab_change*") if d.is_dir())
    if not changes:
        print("no ab_change* directory")
        return 1
    every_change_keeps = True
    for label in changes:
        change, failed = run(label)
        rows = [row for row in base if row in change and row in again]
        keep = bool(rows) and not failed
        print(f"{label}:" + (" reference check FAILED" if failed else ""))
        for row in rows:
            gain = 1.0 - change[row] / min(base[row], again[row])
            keep &= gain >= args.min_gain
            print(f"  {row}: base {base[row]:.1f} / change {change[row]:.1f} / base again "
                  f"{again[row]:.1f} us, gain {100 * gain:+.1f}%")
        if not rows:
            print("  no row in all three logs")
        print("  verdict:", "keep" if keep else "drop")
        every_change_keeps &= keep
    return 0 if every_change_keeps else 1


if __name__ == "__main__":
    sys.exit(main())
