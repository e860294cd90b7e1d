#!/usr/bin/env bash
# The time of `.ci/run` on a clean clone of this checkout's HEAD, as docs/benchmarks.md ("The test
# suite") reports it: the tests' JAX compilation cache and shared steering run are moved out of the
# temp folder for the run (a fresh CI machine has neither) and put back afterwards.
# Usage: benchmarks/ci_time.sh   (about 10 minutes on 2 cores; prints wall, user and sys seconds)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
tmp="${TMPDIR:-/tmp}"
clone="$(mktemp -d)"
aside="$(mktemp -d)"
restore() {
  find "$tmp" -maxdepth 1 -name "nps-tests-*-$(id -u)*" -newer "$aside" -exec rm -rf {} + 2>/dev/null || true
  find "$aside" -mindepth 1 -maxdepth 1 -exec mv {} "$tmp"/ \;
  rm -rf "$clone" "$aside"
}
trap restore EXIT
find "$tmp" -maxdepth 1 -name "nps-tests-*-$(id -u)*" -exec mv {} "$aside"/ \;
git clone -q "$repo" "$clone/nps"
cd "$clone/nps"
TIMEFORMAT='wall %R s, user %U s, sys %S s'
time ./.ci/run > "$clone/ci.log" 2>&1 || { tail -30 "$clone/ci.log"; exit 1; }
tail -1 "$clone/ci.log"
