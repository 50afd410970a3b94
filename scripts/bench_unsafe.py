#!/usr/bin/env python3
"""Benchmark `instar rebase -u` against `qemu-img rebase -u` on the same 64 MiB overlay.

Both tools run in the same invocation on fresh copies of the same overlay, alternating,
so that page cache and machine load affect them alike. Reports median wall times and
the ratio instar/qemu-img, and exits 1 if the ratio is above --max-ratio.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd):
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def timed(cmd):
    """Wall time and peak RSS (KiB) of one run of cmd."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, rusage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"bench: {' '.join(cmd)} failed with {status}")
    return elapsed, rusage.ru_maxrss


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--instar", default=os.path.join(ROOT, "target/release/instar"))
    ap.add_argument("--qemu-img", default="qemu-img")
    ap.add_argument("--runs", type=int, default=21)
    ap.add_argument("--max-ratio", type=float, default=1.0)
    args = ap.parse_args()
    if args.instar == os.path.join(ROOT, "target/release/instar"):
        run(["cargo", "build", "--release", "--quiet", "-p", "instar"])

    with tempfile.TemporaryDirectory(prefix="instar-bench-") as d:
        base = os.path.join(d, "base.qcow2")
        ovl = os.path.join(d, "ovl.qcow2")
        run([args.qemu_img, "create", "-q", "-f", "qcow2", base, "64M"])
        run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 32M", base])
        run([args.qemu_img, "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", ovl])
        run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x22 0 16M", ovl])
        shutil.copy(base, os.path.join(d, "new.qcow2"))

        tools = {
            "instar": [args.instar, "rebase", "-u", "-b", "new.qcow2", "-F", "qcow2"],
            "qemu-img": [args.qemu_img, "rebase", "-u", "-b", "new.qcow2", "-F", "qcow2"],
        }
        times = {k: [] for k in tools}
        rss = {k: 0 for k in tools}
        for i in range(args.runs):
            for name, cmd in tools.items():
                copy = os.path.join(d, f"run-{name}.qcow2")
                shutil.copy(ovl, copy)
                # The copy is set-up: write it back now, so that neither tool's final
                # fdatasync pays for the copy's dirty pages.
                os.sync()
                t, r = timed(cmd + [copy])
                times[name].append(t)
                rss[name] = max(rss[name], r)
        print(f"64 MiB overlay, rebase -u, {args.runs} runs each (alternating)")
        med = {}
        for name in tools:
            med[name] = statistics.median(times[name])
            print(f"  {name:9} median {med[name] * 1000:8.2f} ms   "
                  f"min {min(times[name]) * 1000:8.2f} ms   peak RSS {rss[name] / 1024:6.1f} MiB")
        ratio = med["instar"] / med["qemu-img"]
        print(f"  ratio instar/qemu-img = {ratio:.3f} (bar: <= {args.max_ratio})")
        return 0 if ratio <= args.max_ratio else 1


if __name__ == "__main__":
    sys.exit(main())
