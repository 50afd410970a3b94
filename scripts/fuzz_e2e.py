#!/usr/bin/env python3
"""End-to-end fuzz campaign through the real instar binary and its sandbox.

Each case is a fresh directory holding a mutated overlay (qcow2, vmdk or qed, mutated
by `instar-fuzz mutate` with the structure-aware mutator), its old backing under the
name its header gives (sometimes mutated too; that image's own backing too, down to
three images, so qed chains are read whole), and a new backing (raw, qcow2, vmdk or
qed, often mutated: forged headers in a file probed without -F). instar rebases it in one of four
modes (-u or safe, with or without -F; sometimes detaching; sometimes -c). Invariants:

- the exit status is 0 or 1 (never a signal, never Rust's 101);
- exit 1 leaves every file in the directory unchanged (SHA-256 before and after);
- exit 0 leaves an overlay that `qemu-img check` finds no worse than before (no new
  corruptions; leaks are allowed) and, in safe mode, whose content read by
  `qemu-img convert` is what it was before the rebase (when qemu-img could read it).

The last two are findings for overlays `qemu-img check` finds clean (or leaking only)
before the rebase. For overlays it finds corrupt they are counted apart as "lying
metadata" cases: what issue 6's checks against writes onto metadata must refuse
(`--strict` makes them findings too).

    scripts/fuzz_e2e.py --cases N [--images DIR] [--out DIR] [--seed N] [--instar PATH]
                        [--mutator PATH] [--overlay-formats qcow2,vmdk,qed]

Images come from scripts/fuzz-corpus.sh (DIR) plus fuzz/seeds. Findings are copied to
OUT/findings/case-K with a note, and the case's files before the rebase in before/. Exits 1 if there was any finding.
"""

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
QEMU_IMG = os.environ.get("QEMU_IMG", "qemu-img")
MAX_COMPARE = 64 << 20
TIMEOUT = 120
# The backing names the seed images give (scripts/fuzz-corpus.sh) and the seed that
# was made under that name; other names get a seed of the image's format.
CHAIN_SEEDS = {"base.qcow2": "chain-base.qcow2", "qbase.qed": "qed-chain-base",
               "sparse.vmdk": "vmdk-sparse"}
DEFAULT_BACKING = {"qcow2": "chain-base.qcow2", "qed": "chain-base.qcow2",
                   "vmdk": "vmdk-sparse"}
# Images in a case's chain: the overlay and at most two below it.
CHAIN_DEPTH = 3
FORMATS = ("qcow2", "vmdk", "qed")


def run(args, cwd, timeout=TIMEOUT, env=None):
    return subprocess.run(args, cwd=cwd, capture_output=True, timeout=timeout, env=env)


def qemu(args, cwd):
    """qemu-img on a hostile image: a hang (it happens) means it could not read it."""
    try:
        return subprocess.run([QEMU_IMG] + args, cwd=cwd, capture_output=True, timeout=30)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(args, 124, b"", b"timeout")


def digest(d: Path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.iterdir()) if p.is_file()}


def check(path: Path, fmt: str):
    """(corruptions, leaks) from qemu-img check of the image alone (its backing file
    is not opened: it may be missing or broken), or None if it cannot check."""
    spec = json.dumps({"driver": fmt, "backing": None,
                       "file": {"driver": "file", "filename": path.name}})
    r = qemu(["check", "--output=json", "json:" + spec], path.parent)
    try:
        j = json.loads(r.stdout or b"{}")
    except json.JSONDecodeError:
        return None
    if "check-errors" in j and j.get("check-errors", 0) > 0:
        return None
    if "corruptions" not in j and r.returncode not in (0, 3):
        return None
    return (j.get("corruptions", 0), j.get("leaks", 0))


def content(path: Path, fmt: str, out: Path):
    """The overlay's guest content through its chain, via qemu-img convert."""
    r = qemu(["info", "--output=json", "-f", fmt, path.name], path.parent)
    try:
        size = json.loads(r.stdout)["virtual-size"]
    except (json.JSONDecodeError, KeyError):
        return None
    if r.returncode != 0 or size > MAX_COMPARE:
        return None
    try:
        r = qemu(["convert", "-f", fmt, "-O", "raw", path.name, str(out)], path.parent)
        return out.read_bytes() if r.returncode == 0 else None
    finally:
        out.unlink(missing_ok=True)


def backing_name(path: Path, fmt: str):
    r = qemu(["info", "--output=json", "-f", fmt, path.name], path.parent)
    try:
        return json.loads(r.stdout).get("backing-filename")
    except json.JSONDecodeError:
        return None


class Campaign:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.instar = Path(args.instar)
        self.mutator = Path(args.mutator)
        self.out = Path(args.out).resolve()
        self.images = {}
        for d in [ROOT / "fuzz" / "seeds", Path(args.images) if args.images else None]:
            if d and d.is_dir():
                for p in sorted(d.iterdir()):
                    if p.is_file():
                        self.images[p.name] = p
        wanted = args.overlay_formats.split(",")
        self.overlays = [n for n, p in self.images.items() if fmt_of(p) in wanted
                         and "descriptor" not in n]
        self.backings = [n for n, p in self.images.items()
                         if fmt_of(p) in ("raw",) + FORMATS and "descriptor" not in n]
        self.stats = {k: 0 for k in ["cases", "exit0", "exit1", "unsafe", "safe", "with_F",
                                     "without_F", "detach", "compared", "checked", "findings",
                                     "lying"]
                      + [f"{f}_{k}" for f in FORMATS for k in ("overlays", "exit0")]
                      + ["qed_in_chain"]}
        self.notes = []

    def mutate(self, src: Path, dst: Path):
        seed = str(self.rng.getrandbits(63))
        r = run([str(self.mutator), "mutate", str(src), str(dst), seed], ROOT)
        if r.returncode != 0:
            shutil.copy(src, dst)

    def build_case(self, d: Path):
        ov_name = self.rng.choice(self.overlays)
        ov_fmt = fmt_of(self.images[ov_name])
        ov = d / ("ov." + ov_fmt)
        if self.rng.random() < 0.85:
            self.mutate(self.images[ov_name], ov)
        else:
            shutil.copy(self.images[ov_name], ov)
        qed = self.place_chain(d, ov, ov_fmt)
        new_name = self.rng.choice(self.backings)
        new_fmt = fmt_of(self.images[new_name])
        new = d / ("new." + new_fmt)
        if self.rng.random() < 0.4:
            self.mutate(self.images[new_name], new)
        else:
            shutil.copy(self.images[new_name], new)
        if new_fmt in FORMATS:
            qed |= self.place_chain(d, new, new_fmt)
        self.stats[f"{ov_fmt}_overlays"] += 1
        self.stats["qed_in_chain"] += qed or new_fmt == "qed"
        return ov, ov_fmt, new, new_fmt

    def place_chain(self, d: Path, top: Path, fmt: str):
        """The images below `top`, each under the name the image above gives when it
        is a plain name not taken yet: the seed made under that name, or one of the
        image's format (a qcow2 image sometimes gets any backing). Returns whether a
        qed image was placed."""
        qed = False
        for _ in range(CHAIN_DEPTH - 1):
            old = backing_name(top, fmt)
            if not old or "/" in old or old in (".", "..") or len(old) >= 200 \
                    or (d / old).exists():
                break
            src = self.images.get(CHAIN_SEEDS.get(old) or DEFAULT_BACKING.get(fmt, ""))
            if fmt == "qcow2" and self.rng.random() < 0.3:
                src = self.images[self.rng.choice(self.backings)]
            if not src:
                break
            try:
                if self.rng.random() < 0.3:
                    self.mutate(src, d / old)
                else:
                    shutil.copy(src, d / old)
            except OSError:
                break
            top, fmt = d / old, fmt_of(d / old)
            qed |= fmt == "qed"
            if fmt not in FORMATS:
                break
        return qed

    def one(self, k: int):
        d = self.out / "work"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        ov, ov_fmt, new, new_fmt = self.build_case(d)
        unsafe = self.rng.random() < 0.5
        with_f = self.rng.random() < 0.6
        detach = self.rng.random() < 0.1
        # -c: the guest's zlib/zstd on the copied clusters (safe mode; with -u a no-op).
        compress = self.rng.random() < 0.3
        args = [str(self.instar), "rebase", "-f", ov_fmt]
        if unsafe:
            args.append("-u")
        # Every other -c case with the guest's other zstd release (INSTAR_ZSTD=1.5.4),
        # chosen by case number so the random stream stays what it was.
        env = None
        if compress:
            args.append("-c")
            if k % 2:
                env = dict(os.environ, INSTAR_ZSTD="1.5.4")
        if detach:
            args += ["-b", ""]
        else:
            args += ["-b", new.name]
            if with_f:
                args += ["-F", new_fmt]
        args.append(ov.name)
        check_before = check(ov, ov_fmt)
        content_before = None if unsafe else content(ov, ov_fmt, d / "before.raw")
        before = digest(d)
        # The case as it was, for a saved finding (the rebase may change it).
        pristine = self.out / "before"
        shutil.rmtree(pristine, ignore_errors=True)
        shutil.copytree(d, pristine)
        try:
            r = run(args, d, env=env)
            code = r.returncode
            stderr = r.stderr.decode(errors="replace")
        except subprocess.TimeoutExpired:
            code, stderr = "timeout", ""
        s = self.stats
        s["cases"] += 1
        s["unsafe" if unsafe else "safe"] += 1
        s["detach" if detach else ("with_F" if with_f else "without_F")] += 1
        problems = []
        fatal = False
        if code not in (0, 1):
            problems.append(f"exit status {code}: {stderr.strip()[:300]}")
            fatal = True
        elif code == 1:
            s["exit1"] += 1
            if digest(d) != before:
                problems.append(f"exit 1 but files changed: {stderr.strip()[:300]}")
        else:
            s["exit0"] += 1
            s[f"{ov_fmt}_exit0"] += 1
            problems += self.after_success(d, ov, ov_fmt, unsafe, check_before, content_before)
        lying = check_before is None or check_before[0] > 0
        if problems and lying and not fatal and not self.args.strict:
            s["lying"] += 1
            problems.append(f"(the overlay was corrupt before: qemu-img check {check_before})")
            self.save(d, k, args, problems, "lying", env)
        elif problems:
            s["findings"] += 1
            self.save(d, k, args, problems, "findings", env)

    def save(self, d, k, args, problems, kind, env=None):
        dest = self.out / kind / f"case-{k}"
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(d, dest)
        shutil.copytree(self.out / "before", dest / "before")
        zstd = os.environ.get("INSTAR_ZSTD") if env is None else env.get("INSTAR_ZSTD")
        prefix = f"INSTAR_ZSTD={zstd} " if zstd else ""
        (dest / "NOTE").write_text(prefix + " ".join(args) + "\n" + "\n".join(problems) + "\n")
        if kind == "findings":
            self.notes.append(f"case {k}: {' '.join(args[1:])}: {'; '.join(problems)}")

    def after_success(self, d, ov, ov_fmt, unsafe, check_before, content_before):
        problems = []
        after = check(ov, ov_fmt)
        if after is not None:
            self.stats["checked"] += 1
            base = check_before or (0, 0)
            if after[0] > base[0]:
                problems.append(f"qemu-img check: {after[0]} corruptions after, {base[0]} before")
        elif check_before is not None:
            problems.append("qemu-img check fails after the rebase but not before")
        if not unsafe and content_before is not None:
            now = content(ov, ov_fmt, d / "after.raw")
            self.stats["compared"] += 1
            if now != content_before:
                problems.append("safe rebase changed the content read by qemu-img")
        return problems


def fmt_of(p: Path):
    head = p.read_bytes()[:64]
    if head.startswith(b"QFI\xfb"):
        return "qcow2"
    if head.startswith(b"KDMV") or head.startswith(b"# Disk DescriptorFile"):
        return "vmdk"
    if head.startswith(b"QED\0"):
        return "qed"
    return "raw"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=2000)
    ap.add_argument("--images")
    ap.add_argument("--out", default=str(TARGET / "fuzz-e2e"))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--instar", default=str(TARGET / "debug" / "instar"))
    ap.add_argument("--strict", action="store_true",
                    help="also count broken invariants on overlays that were corrupt before")
    ap.add_argument("--mutator", default=str(TARGET / "debug" / "instar-fuzz"))
    ap.add_argument("--overlay-formats", default=",".join(FORMATS),
                    help="the overlay formats to draw (comma-separated)")
    args = ap.parse_args()
    c = Campaign(args)
    start = time.time()
    for k in range(args.cases):
        c.one(k)
    s = c.stats
    for n in c.notes:
        print(n)
    print(f"e2e: {s['cases']} cases in {time.time() - start:.0f} s ({s['unsafe']} -u, "
          f"{s['safe']} safe; {s['with_F']} with -F, {s['without_F']} without, "
          f"{s['detach']} detach; overlays " + ", ".join(
              f"{s[f + '_overlays']} {f} ({s[f + '_exit0']} exit 0)" for f in FORMATS)
          + f"; {s['qed_in_chain']} with a qed backing): exit 0 {s['exit0']}, "
          f"exit 1 {s['exit1']}; "
          f"{s['checked']} checked, {s['compared']} content-compared; {s['findings']} findings; "
          f"{s['lying']} lying-metadata cases (in {c.out / 'lying'})")
    return 1 if s["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
