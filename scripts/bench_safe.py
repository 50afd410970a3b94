#!/usr/bin/env python3
"""Benchmark safe-mode `instar rebase` against `qemu-img rebase` on the same images.

The images: an old backing of 4 GiB virtual size with 1 GiB of data; a new backing that
is the old one with 10% of that data changed; and a 4 GiB overlay over the old backing
with 100 MiB written. Each run rebases a fresh copy of the overlay onto the new backing
(`rebase -b new.qcow2 -F qcow2`); the copy is made outside the timing. Both tools run in
the same invocation, alternating, so that page cache and machine load affect them alike.

Reports median wall times, their ratio instar/qemu-img and instar's peak RSS, checks once
that both tools produce byte-identical overlays, and exits 1 if instar's median is above
--max-ratio times qemu-img's, its peak RSS is --max-rss-mib or more, or the files differ.

Peak RSS: the wait4 rusage of a child started from Python is at least Python's own RSS
at the fork (Linux keeps the pre-exec memory's high-water mark in ru_maxrss), so it is
an upper bound only. One extra run of each tool under GNU time (/usr/bin/time, which
forks from a small process) gives the exact figure; without it the bound is used.
"""
import argparse
import filecmp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20
GiB = 1 << 30


def run(cmd, **kw):
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, **kw)


def timed(cmd):
    """Wall time (s) and peak RSS (KiB) of one run of cmd."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, rusage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"bench: {' '.join(cmd)} failed with {status}")
    return elapsed, rusage.ru_maxrss


def exact_peak_rss(cmd):
    """Peak RSS (KiB) of one run of cmd measured by GNU time, or None without it."""
    if not os.access("/usr/bin/time", os.X_OK):
        return None
    with tempfile.NamedTemporaryFile("r") as out:
        subprocess.run(["/usr/bin/time", "-f", "%M", "-o", out.name] + cmd,
                       check=True, stdout=subprocess.DEVNULL)
        return int(out.read().split()[-1])


def qemu_io_writes(qemu_io, image, pattern, extents):
    """Write `pattern` over every (offset, length) in extents, in batches of commands."""
    cmds = [f"write -q -P {pattern:#x} {off} {length}" for off, length in extents]
    for i in range(0, len(cmds), 64):
        args = [qemu_io, "-f", "qcow2"]
        for c in cmds[i:i + 64]:
            args += ["-c", c]
        run(args + [image])


def make_images(d, qemu_img, qemu_io):
    old = os.path.join(d, "old.qcow2")
    new = os.path.join(d, "new.qcow2")
    ovl = os.path.join(d, "ovl.qcow2")
    # Old backing: 4 GiB virtual, its first 1 GiB written.
    run([qemu_img, "create", "-q", "-f", "qcow2", old, "4G"])
    qemu_io_writes(qemu_io, old, 0x11, [(i * 64 * MiB, 64 * MiB) for i in range(16)])
    # New backing: the old one with 1 MiB of every 10 MiB of that data changed
    # (103 MiB, 10% of the 1 GiB).
    shutil.copy(old, new)
    qemu_io_writes(qemu_io, new, 0x33, [(i * 10 * MiB, MiB) for i in range(103)])
    # Overlay: 100 x 1 MiB, one every 40 MiB over the whole 4 GiB (25 of them over the
    # old backing's data, where they hide both backings' content).
    run([qemu_img, "create", "-q", "-f", "qcow2", "-b", "old.qcow2", "-F", "qcow2",
         ovl, "4G"], cwd=d)
    qemu_io_writes(qemu_io, ovl, 0x22, [(i * 40 * MiB + 3 * MiB, MiB) for i in range(100)])
    return ovl


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instar", default=os.path.join(ROOT, "target/release/instar"))
    ap.add_argument("--qemu-img", default="/usr/bin/qemu-img")
    ap.add_argument("--qemu-io", default="/usr/bin/qemu-io")
    ap.add_argument("--runs", type=int, default=7, help="runs per tool (at least 5)")
    ap.add_argument("--max-ratio", type=float, default=0.7)
    ap.add_argument("--max-rss-mib", type=float, default=300.0)
    ap.add_argument("--dir", help="where to build the images (default: a temporary "
                    "directory; about 2.5 GiB are needed)")
    args = ap.parse_args()
    if args.runs < 5:
        ap.error("--runs must be at least 5")
    if args.instar == os.path.join(ROOT, "target/release/instar"):
        run(["cargo", "build", "--release", "--quiet", "-p", "instar"], cwd=ROOT)

    with tempfile.TemporaryDirectory(prefix="instar-bench-safe-", dir=args.dir) as d:
        ovl = make_images(d, args.qemu_img, args.qemu_io)
        tools = {
            "instar": [args.instar, "rebase", "-b", "new.qcow2", "-F", "qcow2"],
            "qemu-img": [args.qemu_img, "rebase", "-b", "new.qcow2", "-F", "qcow2"],
        }
        times = {k: [] for k in tools}
        rss = {k: 0 for k in tools}
        first = {}
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
                if i == 0:
                    first[name] = os.path.join(d, f"result-{name}.qcow2")
                    os.replace(copy, first[name])
        identical = filecmp.cmp(first["instar"], first["qemu-img"], shallow=False)
        exact = {}
        for name, cmd in tools.items():
            copy = os.path.join(d, f"run-{name}.qcow2")
            shutil.copy(ovl, copy)
            exact[name] = exact_peak_rss(cmd + [copy])

        print("safe rebase: 4 GiB overlay (100 MiB written) over a backing with 1 GiB of "
              "data, onto a backing differing in 10% of it")
        print(f"{args.runs} runs each (alternating), qemu-img: {args.qemu_img}")
        med = {}
        for name in tools:
            med[name] = statistics.median(times[name])
            peak = (f"{exact[name] / 1024:7.1f} MiB" if exact[name] is not None
                    else "(no /usr/bin/time)")
            print(f"  {name:9} median {med[name] * 1000:9.1f} ms   "
                  f"min {min(times[name]) * 1000:9.1f} ms   "
                  f"max {max(times[name]) * 1000:9.1f} ms   peak RSS {peak} "
                  f"(wait4 bound {rss[name] / 1024:.1f} MiB)")
        ratio = med["instar"] / med["qemu-img"]
        rss_mib = (exact["instar"] if exact["instar"] is not None else rss["instar"]) / 1024
        print(f"  ratio instar/qemu-img = {ratio:.3f} (bar: <= {args.max_ratio})")
        print(f"  instar peak RSS = {rss_mib:.1f} MiB (bar: < {args.max_rss_mib:g} MiB)")
        print(f"  results byte-identical (cmp): {'yes' if identical else 'NO'}")
        ok = ratio <= args.max_ratio and rss_mib < args.max_rss_mib and identical
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
