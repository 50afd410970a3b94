#!/usr/bin/env python3
"""Seeded random differential campaign: instar against real qemu-img on generated images.

Each scenario is drawn from one seed: a chain of 1-3 images (raw, qcow2 or qed below;
qcow2 or qed on top) built with real qemu-img/qemu-io, with random qcow2 options (v2/v3,
cluster sizes 512 B..2 MiB, extended L2, lazy refcounts, refcount widths, zlib/zstd),
persistent bitmaps (several, granularities, disabled, empty, written), LUKS on the
overlay and/or the old backing (legacy AES now and then), a dirty overlay (qemu-io
`abort` after writes with lazy refcounts), random data (patterns, zero writes, discards,
compressed writes, partial clusters, sizes that are not cluster multiples), a new
backing (an image of the chain, a fresh one larger or smaller, or none) and a mode
(-u, safe, detach with -b "", each sometimes with -c).

qemu-img rebase and instar run on the same fixture in the same directory (one after the
other, the fixture restored in between, so absolute names are the same). Compared: exit
status, stderr without the `qemu-img:`/`instar:` prefix, and every file byte for byte.
For -c rebases whose requests span several clusters qemu-img itself is not
deterministic (docs/compression.md): when the bytes differ there, the map without
host offsets, the `check` counters, `info` (minus sizes) and the content (`compare`)
are compared instead. Refusals by instar alone must be one of the deliberate
differences of the README (recognised by their message); on any error instar must leave
every file unchanged.

    scripts/diff_random.py [--scenarios N] [--seed S] [--out DIR] [--ref 11.1.3|10.2.2|both]
                           [--instar PATH] [--keep-going]

Findings go to OUT/finding-SEED/ (the fixture, the commands, both outputs, a note).
Exits 1 if there was any finding. `--only SEED` reruns one scenario.
"""

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
TIMEOUT = 180
PASS = ["pw-Base-1e2d", "pw-Mid-77c0", "pw-Top-5a9b"]
WRONG = "pw-wrong-0000"

# Messages of instar-only refusals the README lists as deliberate differences.
DELIBERATE = [
    "run 'qemu-img check -r all' on the image first",  # dirty repair beyond refcounts/COPIED, dirty with bitmaps
    "dirty image with persistent bitmaps",
    "Preventing invalid write on metadata",
    "partly allocated",                              # extended L2 with -c
    "PBKDF2 iterations",
    "is not supported by instar",
]


def refs():
    """The reference builds: QEMU_IMG_11_1 / QEMU_IMG_10_2, else what the shared
    qemu-ref.sh lists (INSTAR_QEMU_REF names another script), as crates/testkit finds them."""
    m = {}
    script = os.environ.get("INSTAR_QEMU_REF", str(ROOT.parent / "shared/scripts/qemu-ref.sh"))
    if Path(script).is_file():
        out = subprocess.run(["bash", script, "--list"], capture_output=True, text=True)
        for line in out.stdout.splitlines():
            if "\t" in line:
                v, p = line.split("\t", 1)
                m[v] = Path(p)
    for v in ("11.1.3", "10.2.2"):
        env = os.environ.get("QEMU_IMG_" + "_".join(v.split(".")[:2]))
        if env:
            m[v] = Path(env)
    return m


def no_core():
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run(argv, cwd, env=None):
    try:
        r = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True,
                           timeout=TIMEOUT, env=env, preexec_fn=no_core)
        return r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
    except subprocess.TimeoutExpired:
        return 124, "", "timeout"


class Skip(Exception):
    """The fixture could not be built (an option combination qemu-img refuses)."""


class Scenario:
    def __init__(self, seed, ref, ref_path):
        self.seed = seed
        self.rng = random.Random(seed)
        self.ref = ref
        self.img = ref_path
        self.io = ref_path.parent / "qemu-io"
        self.crypto = ref != "10.2.2"
        self.log = []
        self.draw()

    # ---- drawing the scenario ----
    def qcow2_opts(self, top):
        r = self.rng
        v3 = r.random() < 0.8
        o = {"compat": "1.1" if v3 else "0.10"}
        cs = r.choice([512, 1024, 4096, 16384, 65536, 65536, 65536, 131072, 2 << 20])
        o["cluster_size"] = cs
        if v3:
            if cs >= 16384 and r.random() < 0.2:
                o["extended_l2"] = "on"
            if r.random() < 0.3:
                o["lazy_refcounts"] = "on"
            if r.random() < 0.25:
                o["refcount_bits"] = r.choice([1, 2, 4, 8, 32, 64])
            if r.random() < 0.35:
                o["compression_type"] = "zstd"
        return o

    def draw(self):
        r = self.rng
        depth = r.choice([1, 2, 2, 3])
        self.images = []
        size = 512 * r.randint(2048, 16384)  # 1..8 MiB, a multiple of 512
        for lvl in range(depth):
            top = lvl == depth - 1
            fmt = ("qed" if r.random() < 0.2 else "qcow2") if top else \
                r.choice(["raw", "qcow2", "qcow2", "qed"] if lvl == 0 else ["qcow2", "qed"])
            im = {"name": f"{['base', 'mid', 'top'][lvl] if not top else 'top'}.{fmt}",
                  "fmt": fmt, "lvl": lvl, "luks": None}
            if top and lvl == 1:
                im["name"] = f"top.{fmt}"
            if fmt == "qcow2":
                im["opts"] = self.qcow2_opts(top)
                if self.crypto and r.random() < 0.2:
                    im["luks"] = "aes" if r.random() < 0.15 else "luks"
                    im["opts"]["compat"] = "1.1" if im["luks"] == "luks" else im["opts"]["compat"]
            elif fmt == "qed":
                im["opts"] = {"cluster_size": r.choice([4096, 16384, 65536])}
            else:
                im["opts"] = {}
            im["size"] = size if r.random() < 0.6 else 512 * r.randint(1024, 20000)
            im["key"] = PASS[lvl if not top else 2]
            self.images.append(im)
        self.top = self.images[-1]
        t = self.top
        self.bitmaps = []
        if t["fmt"] == "qcow2" and t["opts"]["compat"] == "1.1" and r.random() < 0.35:
            for k in range(r.randint(1, 3)):
                self.bitmaps.append({"name": f"bm{k}",
                                     "gran": r.choice([None, 512, 4096, 65536, 1 << 20]),
                                     "disabled": r.random() < 0.3,
                                     "late": r.random() < 0.3})
        self.dirty = (t["fmt"] == "qcow2" and t["opts"].get("lazy_refcounts") == "on"
                      and r.random() < 0.6) or (t["fmt"] == "qed" and r.random() < 0.4)
        # The new backing: none, an image of the old chain, or a fresh one.
        below = self.images[:-1]
        c = r.random()
        if c < 0.25 or not below and c < 0.4:
            self.new = None
        elif below and c < 0.55:
            self.new = r.choice(below)
        else:
            fmt = r.choice(["raw", "qcow2", "qcow2", "qed"])
            nb = {"name": f"new.{fmt}", "fmt": fmt, "lvl": 9, "luks": None,
                  "opts": self.qcow2_opts(False) if fmt == "qcow2" else
                  ({"cluster_size": 65536} if fmt == "qed" else {}),
                  "size": 512 * r.randint(1024, 20000), "key": "pw-New-0b0b"}
            if self.crypto and fmt == "qcow2" and r.random() < 0.05:
                nb["luks"] = "luks"
                nb["opts"]["compat"] = "1.1"
            nb["below"] = below[0] if below and fmt != "raw" and r.random() < 0.4 else None
            self.new = nb
        self.mode = r.choice(["u", "safe", "safe", "safe"]) if self.new else "detach"
        self.compress = t["fmt"] == "qcow2" and r.random() < 0.3
        if self.compress and self.mode == "u" and r.random() < 0.7:
            self.mode = "safe"
        self.wrong_key = t["luks"] is not None and r.random() < 0.1
        self.backing_keys = r.random() < 0.85

    def describe(self):
        d = {"seed": self.seed, "ref": self.ref, "mode": self.mode, "compress": self.compress,
             "dirty": self.dirty, "bitmaps": self.bitmaps, "wrong_key": self.wrong_key,
             "images": [{k: v for k, v in im.items() if k != "below"} for im in self.images],
             "new": None if self.new is None else
             ({k: v for k, v in self.new.items() if k != "below"} | (
                 {"below": self.new["below"]["name"]} if self.new.get("below") else {}))}
        return d

    # ---- building the fixture ----
    def q(self, argv, d, ok_codes=(0,)):
        code, out, err = run([self.img] + argv, d)
        self.log.append(("qemu-img", argv, code))
        if code not in ok_codes:
            raise Skip(f"qemu-img {argv}: {err.strip()}")
        return out

    def secrets(self, chain):
        objs = []
        for im in chain:
            if im["luks"]:
                objs += ["--object", f"secret,id=s{im['lvl']},data={im['key']}"]
        return objs

    def spec(self, chain, path=None):
        """An --image-opts string for chain[0] (with chain[1:] below it)."""
        top = chain[0]
        s = f"driver={top['fmt']},file.filename={path or top['name']}"
        pre = ""
        for im in chain:
            if im["luks"]:
                s += f",{pre}encrypt.key-secret=s{im['lvl']}"
            pre += "backing."
        return s

    def chain_of(self, im):
        """im and the images below it, top first."""
        if im is None:
            return []
        if im.get("lvl") == 9:
            return [im] + (self.chain_of(im["below"]) if im.get("below") else [])
        return [x for x in reversed(self.images) if x["lvl"] <= im["lvl"]]

    def qio(self, chain, cmds, d, abort=False):
        # A compressed write to an allocated cluster fails (EIO) in QEMU: each one runs
        # alone, first, and may fail.
        for c in [c for c in cmds if c.startswith("write -c")]:
            self.qio_run(chain, [c], d, tolerate=True)
        self.qio_run(chain, [c for c in cmds if not c.startswith("write -c")], d, abort)

    def qio_run(self, chain, cmds, d, abort=False, tolerate=False):
        if not cmds and not abort:
            return
        argv = [self.io] + self.secrets(chain) + ["--image-opts"]
        for c in cmds:
            argv += ["-c", c]
        if abort:
            argv += ["-c", "abort"]
        argv.append(self.spec(chain))
        code, out, err = run(argv, d)
        self.log.append(("qemu-io", argv[1:], code))
        if not abort and not tolerate and (code != 0 or "failed" in out or "rror" in err):
            raise Skip(f"qemu-io {cmds}: {(out + err).strip()[-300:]}")

    def create(self, im, backing, d):
        o = dict(im["opts"])
        argv = ["create", "-q", "-f", im["fmt"]]
        if im["luks"]:
            o.update({"encrypt.format": im["luks"], "encrypt.key-secret": f"s{im['lvl']}"})
            if im["luks"] == "luks":
                o["encrypt.iter-time"] = 10
            argv += self.secrets([im])
        if o:
            argv += ["-o", ",".join(f"{k}={v}" for k, v in o.items())]
        if backing:
            argv += ["-b", backing["name"], "-F", backing["fmt"]]
        argv += [im["name"], str(im["size"])]
        self.q(argv, d)

    def data_cmds(self, im, n):
        r = self.rng
        size = im["size"]
        cs = im["opts"].get("cluster_size", 65536)
        cmds = []
        for _ in range(n):
            k = r.random()
            if r.random() < 0.6:
                off = r.randrange(0, size // 512) * 512
                ln = 512 * r.randint(1, 512)
            else:
                off = r.randrange(0, size // cs + 1) * cs
                ln = cs * r.randint(1, 4)
            if r.random() < 0.1:
                off += r.randrange(1, 512)
                ln = r.randint(1, 70000)
            off = min(off, size - 1)
            ln = max(1, min(ln, size - off))
            if k < 0.6:
                cmds.append(f"write -P {r.randrange(1, 256)} {off} {ln}")
            elif k < 0.75:
                cmds.append(f"write -z {off} {ln}")
            elif k < 0.85 and im["fmt"] != "raw":
                cmds.append(f"discard {off} {ln}")
            elif im["fmt"] == "qcow2" and not im["luks"] and cs < (2 << 20):
                o = (r.randrange(0, size // cs) * cs) if size >= cs else 0
                if o + cs <= size:
                    cmds.append(f"write -c -P {r.randrange(1, 256)} {o} {cs}")
        return cmds

    def build(self, d):
        r = self.rng
        prev = None
        for im in self.images:
            self.create(im, prev, d)
            chain = self.chain_of(im)
            is_top = im is self.top
            if is_top and self.bitmaps:
                for bm in self.bitmaps:
                    if not bm["late"]:
                        self.bitmap(bm, d)
            cmds = self.data_cmds(im, r.randint(0, 12))
            if is_top and self.dirty:
                self.qio(chain, cmds[: len(cmds) // 2] or ["write -P 1 0 512"], d)
                self.qio(chain, cmds[len(cmds) // 2:] + ["write -P 7 512 1024"], d, abort=True)
            elif cmds:
                self.qio(chain, cmds, d)
            if is_top and self.bitmaps:
                for bm in self.bitmaps:
                    if bm["late"]:
                        self.bitmap(bm, d)
            prev = im
        nb = self.new
        if nb is not None and nb.get("lvl") == 9:
            self.create(nb, nb.get("below"), d)
            cmds = self.data_cmds(nb, r.randint(0, 8))
            if cmds:
                self.qio(self.chain_of(nb), cmds, d)

    def bitmap(self, bm, d):
        t = self.top
        argv = ["bitmap", "--add"]
        if bm["gran"]:
            argv += ["-g", str(bm["gran"])]
        if bm["disabled"]:
            argv.append("--disable")
        if t["luks"]:
            argv += self.secrets([t]) + ["--image-opts", self.spec([t])]
        else:
            argv += ["-f", "qcow2", t["name"]]
        argv.append(bm["name"])
        if self.dirty and not bm["late"]:
            pass
        self.q(argv, d)

    # ---- the rebase command ----
    def rebase_argv(self, d):
        t = self.top
        chain = self.chain_of(t)
        argv = ["rebase"]
        if self.mode == "u":
            argv.append("-u")
        if self.compress:
            argv.append("-c")
        objs = self.secrets(chain if self.backing_keys and self.mode != "u" else [t])
        if self.wrong_key:
            objs = [o.replace(t["key"], WRONG) for o in objs]
        if t["luks"] or self.backing_keys and self.mode != "u" and \
                any(im["luks"] for im in chain):
            keyed = chain if self.backing_keys and self.mode != "u" else [t]
            argv += objs + ["--image-opts"]
            file_arg = self.spec(keyed)
        else:
            argv += ["-f", t["fmt"]]
            file_arg = t["name"]
        if self.new is None:
            argv += ["-b", ""]
        else:
            # With --image-opts QEMU cannot resolve a relative -b (docs/luks.md).
            name = str(d / self.new["name"]) if "--image-opts" in argv else self.new["name"]
            argv += ["-b", name, "-F", self.new["fmt"]]
        argv.append(file_arg)
        return argv

    def post_chain(self, ok):
        """The overlay's chain after the rebase (or before, when it failed)."""
        if not ok:
            return self.chain_of(self.top)
        return [self.top] + self.chain_of(self.new)


def snapshot(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def strip_prefix(s):
    out = []
    for line in s.splitlines():
        for p in ("qemu-img: ", "instar: "):
            if line.startswith(p):
                line = line[len(p):]
        out.append(line.rstrip())
    return "\n".join(out).strip()


def restore(src, dst):
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)


class Campaign:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.instar = Path(args.instar or TARGET / "release" / "instar")
        self.refs = refs()
        self.stats = {"run": 0, "skipped": 0, "identical": 0, "both_refuse": 0,
                      "relaxed": 0, "deliberate": 0, "qemu_crash": 0, "findings": 0}
        self.findings = []

    def scenario(self, seed, ref):
        sc = Scenario(seed, ref, self.refs[ref])
        base = self.out / "work"
        fix = base / "fixture"
        w = base / "w"
        for p in (fix, w):
            if p.exists():
                shutil.rmtree(p)
        fix.mkdir(parents=True)
        try:
            sc.build(fix)
        except Skip as e:
            self.stats["skipped"] += 1
            return "skip", str(e)
        self.stats["run"] += 1
        restore(fix, w)
        argv = sc.rebase_argv(w)
        qcode, _, qerr = run([sc.img] + argv, w)
        qfiles = snapshot(w)
        qdir = base / "q"
        restore(w, qdir)
        restore(fix, w)
        env = dict(os.environ)
        if ref == "10.2.2":
            env["INSTAR_ZSTD"] = "1.5.4"
        icode, _, ierr = run([self.instar] + argv, w, env=env)
        ifiles = snapshot(w)
        verdict, note = self.judge(sc, w, qdir, fix, qcode, qerr, icode, ierr, qfiles, ifiles)
        if verdict in ("finding", "qemu_crash"):
            self.save(sc, argv, fix, qdir, w, qcode, qerr, icode, ierr, note)
        return verdict, note

    def judge(self, sc, w, qdir, fix, qcode, qerr, icode, ierr, qfiles, ifiles):
        qe, ie = strip_prefix(qerr), strip_prefix(ierr)
        before = snapshot(fix)
        if icode not in (0, 1):
            return "finding", f"instar exit {icode}: {ie}"
        if icode != 0 and ifiles != before:
            return "finding", "instar failed but changed files"
        if qcode < 0 or qcode in (134, 139):
            self.stats["qemu_crash"] += 1
            return "qemu_crash", f"qemu-img died ({qcode}): {qe[-300:]}; instar {icode}: {ie}"
        if qcode != 0 and icode != 0:
            if sc.dirty:
                # docs/dirty-images.md: qemu-img repairs (and prints the repair lines)
                # before it fails; instar writes and prints nothing on an error.
                qe = strip_prefix("\n".join(
                    x for x in qerr.splitlines() if x.startswith("qemu-img: ")))
            if qe != ie:
                return "finding", f"both refuse, messages differ:\n  qemu-img: {qe}\n  instar:   {ie}"
            self.stats["both_refuse"] += 1
            return "both_refuse", qe
        if qcode == 0 and icode != 0:
            if any(m in ie for m in DELIBERATE):
                self.stats["deliberate"] += 1
                return "deliberate", ie
            return "finding", f"only instar refuses: {ie}"
        if qcode != 0:
            return "finding", f"only qemu-img refuses: {qe}"
        if qe != ie:
            return "finding", f"stderr differs:\n  qemu-img: {qe}\n  instar:   {ie}"
        if qfiles == ifiles:
            self.stats["identical"] += 1
            return "identical", ""
        diff = [f for f in qfiles if qfiles.get(f) != ifiles.get(f)]
        if sc.compress:
            why = self.relaxed(sc, w, qdir)
            if why is None:
                self.stats["relaxed"] += 1
                return "relaxed", f"-c packing differs in {diff}"
            if not self.v2_zero_writes(sc, fix, qdir, w):
                return "finding", f"-c result differs ({diff}): {why}"
        if self.v2_zero_writes(sc, fix, qdir, w):
            self.stats["deliberate"] += 1
            return "deliberate", "v2 overlay without backing: qemu-img loses content"
        return "finding", f"files differ: {diff}"

    def same_content(self, sc, d1, chain1, d2, chain2):
        objs = sc.secrets(chain1 + [c for c in chain2 if c not in chain1])
        s1 = sc.spec(chain1, str(d1 / sc.top["name"]))
        s2 = sc.spec(chain2, str(d2 / sc.top["name"]))
        code, _, _ = self.qimg(sc, ["compare"] + objs + ["--image-opts", s1, s2], d1)
        return code == 0

    def v2_zero_writes(self, sc, fix, qdir, w):
        """README: a v2 overlay without a backing file, safe-rebased, keeps its content
        with instar; qemu-img's write-zeroes there is a no-op."""
        t = sc.top
        if sc.mode == "u" or len(sc.images) != 1 or t["fmt"] != "qcow2" \
                or t["opts"]["compat"] != "0.10":
            return False
        before, after = sc.chain_of(t), sc.post_chain(True)
        return self.same_content(sc, fix, before, w, after) and \
            not self.same_content(sc, fix, before, qdir, after)

    def qimg(self, sc, argv, d):
        return run([self.refs["11.1.3"] if sc.crypto else sc.img] + argv, d)

    def relaxed(self, sc, w, qdir):
        """None when the two -c results agree on all that qemu-img determines."""
        chain = sc.post_chain(True)
        objs = sc.secrets(chain)
        res = {}
        for side, d in (("q", qdir), ("i", w)):
            spec = sc.spec(chain, str(d / sc.top["name"]))
            # Names of the backing files are relative to the overlay; the new backing
            # path is absolute in the encrypted case and points into w: use each side's.
            _, m, e1 = self.qimg(sc, ["map", "--output=json"] + objs + ["--image-opts", spec], d)
            _, c, _ = self.qimg(sc, ["check", "--output=json"] + objs + ["--image-opts", spec], d)
            try:
                mm = [{k: v for k, v in x.items() if k not in ("offset",)}
                      for x in json.loads(m)]
                cc = json.loads(c)
                cc = {k: cc.get(k) for k in ("check-errors", "corruptions", "leaks",
                                              "allocated-clusters", "total-clusters",
                                              "compressed-clusters")}
            except (ValueError, AttributeError):
                return f"map/check unreadable: {e1[:200]}"
            res[side] = (mm, cc)
        if res["q"][0] != res["i"][0]:
            return "map differs"
        if res["q"][1] != res["i"][1]:
            return f"check differs: {res['q'][1]} vs {res['i'][1]}"
        if res["i"][1].get("corruptions") or res["i"][1].get("leaks"):
            return f"instar's image not clean: {res['i'][1]}"
        sq = sc.spec(chain, str(qdir / sc.top["name"]))
        si = sc.spec(chain, str(w / sc.top["name"]))
        code, out, err = self.qimg(sc, ["compare"] + objs + ["--image-opts", sq, si], w)
        if code != 0:
            return f"content differs: {out.strip()} {err.strip()}"
        return None

    def save(self, sc, argv, fix, qdir, w, qcode, qerr, icode, ierr, note):
        crash = note.startswith("qemu-img died")
        d = self.out / f"{'qemu-crash' if crash else 'finding'}-{sc.ref}-{sc.seed}"
        if d.exists():
            shutil.rmtree(d)
        shutil.copytree(fix, d / "fixture")
        shutil.copytree(qdir, d / "after-qemu-img")
        shutil.copytree(w, d / "after-instar")
        with open(d / "note.txt", "w") as f:
            f.write(f"{note}\n\nrebase argv (run in the fixture's directory, "
                    f"which was {w}):\n{json.dumps(argv)}\n\n")
            f.write(f"qemu-img {sc.ref} exit {qcode}:\n{qerr}\ninstar exit {icode}:\n{ierr}\n\n")
            f.write("scenario:\n" + json.dumps(sc.describe(), indent=1) + "\n\nbuild log:\n")
            for tool, a, code in sc.log:
                f.write(f"{tool} {json.dumps([str(x) for x in a])} -> {code}\n")
        if not crash:
            self.stats["findings"] += 1
            self.findings.append((sc.ref, sc.seed, note.splitlines()[0]))

    def main(self):
        a = self.args
        ref_list = ["11.1.3", "10.2.2"] if a.ref == "both" else [a.ref]
        missing = [r for r in ref_list if r not in self.refs or
                   not (self.refs[r].parent / "qemu-io").is_file()]
        why = f"qemu-img {missing} not found" if missing else \
            None if os.access("/dev/kvm", os.R_OK | os.W_OK) else "no /dev/kvm"
        if why is None and not self.instar.is_file():
            why = f"no {self.instar}"
        if why:
            required = os.environ.get("INSTAR_REQUIRE_QEMU") == "1" or \
                os.environ.get("INSTAR_REQUIRE_KVM") == "1"
            print(f"diff_random: {'FAIL' if required else 'skipped'}: {why}")
            return 1 if required else 0
        seeds = [a.only] if a.only is not None else range(a.seed, a.seed + a.scenarios)
        t0 = time.time()
        for s in seeds:
            ref = ref_list[s % len(ref_list)]
            verdict, note = self.scenario(s, ref)
            if verdict == "finding" or a.verbose:
                print(f"[{s} {ref}] {verdict}: {note}", flush=True)
            if a.budget and time.time() - t0 > a.budget:
                break
        print(json.dumps(self.stats), f"{time.time() - t0:.0f}s", flush=True)
        for ref, seed, first in self.findings:
            print(f"finding {ref} seed {seed}: {first}")
        return 1 if self.findings else 0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scenarios", type=int, default=20)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--only", type=int)
    p.add_argument("--out", default="/tmp/instar-diff-random")
    p.add_argument("--ref", default="both", choices=["11.1.3", "10.2.2", "both"])
    p.add_argument("--instar")
    p.add_argument("--budget", type=float, help="stop after this many seconds")
    p.add_argument("-v", "--verbose", action="store_true")
    sys.exit(Campaign(p.parse_args()).main())


if __name__ == "__main__":
    main()
