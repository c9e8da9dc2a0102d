#!/usr/bin/env bash
# Builds a profile-guided (PGO) release binary of skiff:
#
#   1. a release build with counters on every branch (-Cprofile-generate);
#   2. the training workload (skiff-pgo-train, pgo/src/lib.rs) runs that build as three sites on
#      loopback and carries connections, round trips and bulk transfers through them;
#   3. llvm-profdata (rustup's llvm-tools component, added when missing) merges the counts;
#   4. the release build again, optimised with them (-Cprofile-use).
#
# Usage: pgo/build.sh [--target TRIPLE] [--out FILE] [--phase DURATION]
#
# --target builds for another target (the Dockerfile's musl one) whose binaries run here;
# --out is where the binary goes (default target/pgo/skiff); --phase is how long each phase of
# the workload runs (default 4s; about 35 s in all). The work is under target/pgo/: the two
# builds keep target directories of their own there, so neither disturbs target/release. Both
# are full release builds (whole-program LTO): about 15 minutes in all on two cores, cold.
# docs/performance.md says what the profile buys.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
work="$root/target/pgo"
out="$work/skiff"
phase="4s"
target=""
while [ $# -gt 0 ]; do
  case "$1" in
    --target) target="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --phase) phase="$2"; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "pgo/build.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

host="$(rustc -vV | sed -n 's/^host: //p')"
profdata="$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"
if [ ! -x "$profdata" ]; then
  if ! command -v rustup >/dev/null; then
    echo "pgo/build.sh: needs llvm-profdata from the toolchain's llvm-tools component, and" \
      "there is no rustup to add it (rustup component add llvm-tools)" >&2
    exit 1
  fi
  rustup component add llvm-tools
fi

cargo_args=(build --release --locked --bin skiff)
bin_dir="release"
if [ -n "$target" ]; then
  cargo_args+=(--target "$target")
  bin_dir="$target/release"
fi
# Flags the caller set still apply to both builds.
base="${RUSTFLAGS:-}"
profiles="$work/profiles"

echo "== 1/4: instrumented build"
RUSTFLAGS="${base:+$base }-Cprofile-generate=$profiles" \
  cargo "${cargo_args[@]}" --target-dir "$work/instrumented"

echo "== 2/4: training"
# The trainer itself is an ordinary (debug) build: its own code is not what is being trained.
cargo build --locked -p skiff-pgo --bin skiff-pgo-train --target-dir "$work/trainer"
# Build scripts of the instrumented build wrote counts here too: start from none.
rm -rf "$profiles"
mkdir -p "$profiles"
"$work/trainer/debug/skiff-pgo-train" --skiff "$work/instrumented/$bin_dir/skiff" --phase "$phase"

echo "== 3/4: merging the counts"
shopt -s nullglob
raw=("$profiles"/*.profraw)
if [ ${#raw[@]} -eq 0 ]; then
  echo "pgo/build.sh: the training wrote no counts to $profiles" >&2
  exit 1
fi
"$profdata" merge -o "$work/skiff.profdata" "${raw[@]}"

echo "== 4/4: optimised build"
RUSTFLAGS="${base:+$base }-Cprofile-use=$work/skiff.profdata" \
  cargo "${cargo_args[@]}" --target-dir "$work/optimized"
mkdir -p "$(dirname "$out")"
install -m 0755 "$work/optimized/$bin_dir/skiff" "$out"
echo "profile-guided skiff: $out"
