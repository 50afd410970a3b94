#!/usr/bin/env bash
# The whole test suite: formatting, lints, and every test (unit, sandbox, differential
# against real qemu-img). Set INSTAR_REQUIRE_KVM=1 / INSTAR_REQUIRE_QEMU=1 to make tests
# that need /dev/kvm or the reference qemu-img versions fail instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all --check
(cd guest && cargo fmt --all --check)

echo "== cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
(cd guest && cargo clippy --quiet -- -D warnings)

echo "== lint policy (scripts/lint_policy.sh)"
scripts/lint_policy.sh

echo "== cargo test"
cargo test --workspace --all-targets --no-fail-fast

echo "== the malicious-guest suites in a release build (docs/sandbox-bounds.md)"
cargo test --release -p instar-vmm --test hostile
cargo test --release -p instar --test hostile_cli

echo "== QEMU iotests with rebase routed to instar (scripts/iotests.sh)"
cargo build --quiet -p instar
INSTAR="${CARGO_TARGET_DIR:-target}/debug/instar" scripts/iotests.sh

echo "== a short seeded random differential run against qemu-img (docs/differential.md)"
cargo build --release --quiet -p instar
if command -v python3 >/dev/null; then
  scripts/diff_random.py --scenarios 24 --seed 1 --out "${TMPDIR:-/tmp}/instar-diff-random-test"
elif [ "${INSTAR_REQUIRE_QEMU:-}" = 1 ]; then
  echo "python3 is needed for scripts/diff_random.py" >&2; exit 1
fi
