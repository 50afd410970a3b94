#!/usr/bin/env bash
# The lint policy clippy cannot check by itself: every crate under crates/ opts into the
# workspace lints (`[lints] workspace = true`, which denies undocumented `unsafe`), and
# every crate without `unsafe` code forbids it in each of its roots (lib, bins, build
# script). The guest (its own workspace) sets its lints in guest/Cargo.toml.
set -euo pipefail
cd "$(dirname "$0")/.."

status=0
unsafe_use='(^|[^_[:alnum:]])unsafe[[:space:]]*(\{|fn|impl|extern|trait)'
for manifest in crates/*/Cargo.toml; do
    crate=$(dirname "$manifest")
    if ! grep -Pzq '\n\[lints\]\nworkspace = true\n' "$manifest"; then
        echo "$manifest: missing '[lints] workspace = true'"
        status=1
    fi
    if grep -rqE "$unsafe_use" "$crate/src" --include='*.rs'; then
        continue
    fi
    for root in "$crate/src/lib.rs" "$crate/src/main.rs" "$crate"/src/bin/*.rs "$crate/build.rs"; do
        if [ -f "$root" ] && ! grep -q '^#!\[forbid(unsafe_code)\]' "$root"; then
            echo "$root: a crate without unsafe code must '#![forbid(unsafe_code)]'"
            status=1
        fi
    done
done
exit $status
