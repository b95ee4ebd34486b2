#!/bin/sh
# Gives every workspace crate placeholder sources so `cargo build` can compile the dependencies alone:
# the Dockerfile runs it on the manifests only, caching that layer until a Cargo.toml or Cargo.lock
# changes. scripts/check-deploy.sh runs it too, on a copy, to prove the stubbed workspace still resolves.
# Usage: stub-crates.sh [WORKSPACE_DIR]   (default: the current directory)
set -eu
cd "${1:-.}"
for manifest in crates/*/Cargo.toml; do
  dir=$(dirname "$manifest")
  mkdir -p "$dir/src" "$dir/benches"
  : > "$dir/src/lib.rs"
  echo 'fn main() {}' > "$dir/src/main.rs"
  # Declared benches and any explicit target path (`path = "..."` under [lib], [[bin]], [[bench]]).
  awk '/^\[\[bench\]\]/ { b = 1; next } /^\[/ { b = 0 }
       b && /^name *=/ { gsub(/.*= *"|".*/, ""); print "benches/" $0 ".rs" }
       /^path *=/ { gsub(/.*= *"|".*/, ""); print }' "$manifest" |
    while read -r target; do
      mkdir -p "$dir/$(dirname "$target")"
      case "$target" in
        */lib.rs) : > "$dir/$target" ;;
        *) echo 'fn main() {}' > "$dir/$target" ;;
      esac
    done
done
