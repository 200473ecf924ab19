#!/usr/bin/env bash
# Instructions per callback for each case of benches/pipeline.rs, counted by callgrind: steady
# figures on a busy machine, where times are not. Usage: bash bench/instructions.sh [BENCH_BINARY]
# (default: builds the benchmark). Needs valgrind (installed from Debian if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind >/dev/null; }
bin=${1:-}
if [ -z "$bin" ]; then
  bin=$(cargo bench --bench pipeline --no-run --message-format=json 2>/dev/null \
    | grep -o '"executable":"[^"]*pipeline-[^"]*"' | tail -1 | cut -d'"' -f4)
fi
names=("normalize + 10 rules, none matches" "normalize + 10 rules, one matches"
  "before-event: normalize + 20 rules" "normalize + 100 rules, none matches")
ir() { # ir CASE N: instructions of a run with N callbacks
  PIPELINE_CASE=$1 PIPELINE_COUNT=$2 valgrind --tool=callgrind --callgrind-out-file=/dev/null "$bin" 2>&1 \
    | sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}
n=${N:-1000}
for i in 0 1 2 3; do
  a=$(ir $i 0); b=$(ir $i $n)
  printf '%-40s %8d instructions per callback\n' "${names[$i]}" $(( (b - a) / n ))
done
