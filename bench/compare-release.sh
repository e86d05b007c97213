#!/usr/bin/env bash
# Batched and unary ingest of this tree against an earlier release, pairs alternated (new, old,
# new, old, ...) so that both see the same machine noise. Prints one line per run and the ratios.
#
#   bench/compare-release.sh OLD_BINARY [PAIRS] [SECS]
#
# OLD_BINARY is `engage` built from the earlier commit, for example:
#   git worktree add ../prev <commit> && (cd ../prev && cargo build --release --bin engage)
#   bench/compare-release.sh ../prev/target/release/engage 3 10
#
# NEW_ENV adds environment settings to the new runs only, so one binary can be compared with
# itself under another configuration, for example metrics on against off:
#   NEW_ENV="ENGAGE_METRICS_LISTEN=127.0.0.1:0" bench/compare-release.sh target/release/engage 3 10
set -euo pipefail
cd "$(dirname "$0")/.."
old=${1:?usage: bench/compare-release.sh OLD_BINARY [PAIRS] [SECS]}
pairs=${2:-3}
secs=${3:-10}
cargo build --release --bin engage --example loadgen
new=target/release/engage
out=$(mktemp)
for i in $(seq 1 "$pairs"); do
  for which in new old; do
    bin=$new
    settings=${NEW_ENV:-}
    if [ "$which" = old ]; then bin=$old; settings=""; fi
    env $settings target/release/examples/loadgen run --secs "$secs" --only "engage " --engage-bin "$bin" |
      awk -v w="$which" -v i="$i" '/^engage (batch|unary) +[0-9]/ { print w, i, $2, $3 }' | tee -a "$out"
  done
done
# Per scenario: new/old of each pair, and each binary's own spread (its fastest run over its
# slowest) for comparison.
for scenario in batch unary; do
  awk -v s="$scenario" '
    $3 == s { v[$1, $2] = $4; if ($2 > n) n = $2 }
    END {
      line = s ": new/old per pair";
      for (p = 1; p <= n; p++) line = line sprintf(" %.3f", v["new", p] / v["old", p]);
      split("new old", ws, " ");
      for (k = 1; k <= 2; k++) {
        mn = 1e18; mx = 0;
        for (p = 1; p <= n; p++) { x = v[ws[k], p]; if (x < mn) mn = x; if (x > mx) mx = x }
        line = line sprintf("; %s spread %.3f", ws[k], mx / mn)
      }
      print line
    }' "$out"
done
rm -f "$out"
