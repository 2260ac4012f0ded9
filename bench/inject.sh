#!/usr/bin/env bash
# Benchmark of `indiepm inject` against `cp -r` and the sed one-liner on a
# generated 10,000-page site (see bench/inject.py). Needs python3 and GNU
# time (/usr/bin/time; Debian package `time`).
#   bash bench/inject.sh [--pages N] [--runs N] [--dir FOLDER]
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x /usr/bin/time ] || { echo "bench: /usr/bin/time is missing: apt-get install time" >&2; exit 2; }
cargo build --release --quiet --bin indiepm
# In memory (tmpfs) by default: that measures the tools, not the disk's
# journal and writeback (pass --dir /tmp, say, to measure on disk).
dir=()
if [ -d /dev/shm ] && [[ " $* " != *" --dir "* ]]; then dir=(--dir /dev/shm); fi
exec python3 bench/inject.py --bin target/release/indiepm "${dir[@]}" "$@"
