#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 20 s each): `fuzz/run.sh [SECONDS]`.
# cargo-fuzz needs nightly compiler flags (sanitizers, coverage instrumentation); this machine
# has a stable toolchain only, so RUSTC_BOOTSTRAP=1 lets it accept them.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-20}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O
for target in $(cargo fuzz list); do
  echo "fuzzing $target for ${seconds}s"
  cargo fuzz run -O "$target" -- -max_total_time="$seconds" -print_final_stats=1 2>&1 \
    | grep -E "Done [0-9]+ runs|ERROR|SUMMARY|panicked" || true
  # cargo fuzz exits non-zero on a crash; the pipeline above hides that, so check artifacts.
  if compgen -G "artifacts/$target/*" >/dev/null; then
    echo "fuzz target $target found a crash: see fuzz/artifacts/$target/" >&2
    exit 1
  fi
done
