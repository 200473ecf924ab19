#!/usr/bin/env bash
# The load benchmark of docs/performance.md, in one command: builds imrelay and the benchmark
# programs in release mode, then runs examples/loadbench.rs, which starts the ceiling, the real
# imrelay binary in each set-up and the sink, one after another, and prints the table.
# Extra arguments go to loadbench (e.g. --duration 20, --rate 10000, --only forwarded).
# Only 127.0.0.1 is used. Needs nothing but cargo.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin imrelay --example loadbench --example ceiling --example sink
exec target/release/examples/loadbench "$@"
