#!/usr/bin/env bash
# Long fuzz campaigns (docs/fuzzing.md). One campaign at a time, niced: the machine is
# shared.
#
#   scripts/fuzz.sh [--engine afl|seeded] [--execs N] [--secs N] [--targets "T ..."]
#                   [--e2e N] [--out DIR]
#
# --engine afl (default): AFL++ through cargo-afl (`cargo install cargo-afl`), each
#   target until N executions (default 1,000,000) or S seconds (default 1800).
# --engine seeded: the deterministic mutator of the test suite, debug build.
# --e2e N: afterwards, N cases of the end-to-end campaign through the instar binary
#   (scripts/fuzz_e2e.py; 0 skips it; default 2000).
# Prints one line per target; exits 1 if anything was found (inputs under DIR).
set -euo pipefail
cd "$(dirname "$0")/.."

engine=afl execs=1000000 secs=1800 targets="" e2e=2000 out=target/fuzz
while [ $# -gt 0 ]; do
    case $1 in
        --engine) engine=$2; shift 2 ;;
        --execs) execs=$2; shift 2 ;;
        --secs) secs=$2; shift 2 ;;
        --targets) targets=$2; shift 2 ;;
        --e2e) e2e=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        *) echo "fuzz.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
mkdir -p "$out"
out=$(cd "$out" && pwd)
NICE="nice -n 15"

echo "== seed images (qemu-img) in $out/images"
scripts/fuzz-corpus.sh "$out/images"
cargo build --quiet -p instar-fuzz
tool=${CARGO_TARGET_DIR:-target}/debug/instar-fuzz
[ -n "$targets" ] || targets=$("$tool" list | tr '\n' ' ')
found=0
: >"$out/summary.txt"

afl_target() {
    local t=$1 dir=$out/afl/$t
    rm -rf "$dir" && mkdir -p "$dir"
    "$tool" seeds "$t" "$dir/in" --seeds "$out/images"
    AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_UI=1 \
        AFL_NO_AFFINITY=1 INSTAR_FUZZ_TARGET=$t \
        $NICE cargo afl fuzz -i "$dir/in" -o "$dir/out" -E "$execs" -V "$secs" -t 5000 \
        fuzz/afl/target/release/instar-fuzz-afl >"$dir/afl.log" 2>&1 || true
    local stats=$dir/out/default/fuzzer_stats
    [ -f "$stats" ] || { echo "$t: AFL++ did not start (see $dir/afl.log)" | tee -a "$out/summary.txt"; found=1; return; }
    local get
    get() { awk -F' *: *' -v k="$1" '$1 == k { print $2 }' "$stats"; }
    local crashes hangs
    crashes=$(get saved_crashes) hangs=$(get saved_hangs)
    echo "$t: $(get execs_done) execs in $(( $(get last_update) - $(get start_time) )) s," \
        "$(get corpus_count) corpus, coverage $(get bitmap_cvg), $crashes crashes, $hangs hangs" \
        | tee -a "$out/summary.txt"
    [ "$crashes" = 0 ] && [ "$hangs" = 0 ] || found=1
}

case $engine in
    afl)
        command -v cargo-afl >/dev/null || { echo "fuzz.sh: cargo install cargo-afl first" >&2; exit 2; }
        echo "== building the AFL++ harness (fuzz/afl)"
        (cd fuzz/afl && $NICE cargo afl build --release --quiet)
        for t in $targets; do afl_target "$t"; done
        ;;
    seeded)
        for t in $targets; do
            $NICE "$tool" campaign "$t" --execs "$execs" --secs "$secs" --seed "$RANDOM" \
                --seeds "$out/images" --findings "$out/findings" | tee -a "$out/summary.txt" || found=1
        done
        ;;
    *) echo "fuzz.sh: unknown engine $engine" >&2; exit 2 ;;
esac

if [ "$e2e" -gt 0 ]; then
    echo "== end-to-end campaign through the instar binary ($e2e cases)"
    cargo build --quiet -p instar
    $NICE python3 scripts/fuzz_e2e.py --cases "$e2e" --images "$out/images" --out "$out/e2e" \
        | tee -a "$out/summary.txt" || found=1
fi
exit $found
