#!/usr/bin/env bash
# Instructions per callback through the whole server (warp, hyper, verification, parsing, rules,
# the answer), counted by callgrind while the load generator drives imrelay with 10 rules of which
# none matches: steady figures for A/B comparisons on a busy machine, where times are not.
#
#   bash bench/http-instructions.sh [IMRELAY_BINARY...]   (default: target/release/imrelay)
#
# Each binary runs twice under callgrind, once only started and stopped, once driven for
# SECONDS_DRIVEN seconds (default 8); the difference over the callbacks answered is the figure.
# imrelay listens on 127.0.0.1:PORT (default 39980). Under valgrind
# the CPU has no SHA extensions, so SHA-256 (the event id) runs in software: ~31,000 of the
# ~90,000 instructions, against ~2 % of the time on the real CPU. Needs valgrind (installed from
# Debian if missing); uses the benchmark's set-up folder, made by bench/load.sh if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind >/dev/null; }
cargo build --release --quiet --bin imrelay --example loadbench --example ceiling --example sink
setup=target/loadbench/imrelay-10-rules-nothing-matches
if [ ! -d "$setup/rules" ]; then
  bash bench/load.sh --only "nothing matches" --duration 1 >/dev/null
fi
port=${PORT:-39980}
seconds=${SECONDS_DRIVEN:-8}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sed -e "s/^listen = .*/listen = \"127.0.0.1:$port\"/" -e "s#^dir = \".*/data\"#dir = \"$work/data\"#" \
  "$setup/imrelay.toml" > "$work/imrelay.toml"

# run BINARY SECONDS: prints "instructions callbacks"
run() {
  rm -rf "$work/data"
  valgrind --tool=callgrind --callgrind-out-file=/dev/null "$1" serve --config "$work/imrelay.toml" \
    > "$work/log" 2>&1 &
  local pid=$!
  local ready=no
  for _ in $(seq 300); do
    if curl -sf "127.0.0.1:$port/readyz" >/dev/null; then
      ready=yes
      break
    fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  if [ "$ready" != yes ]; then
    kill -TERM "$pid" 2>/dev/null || true
    echo "$1 did not get ready under valgrind (60 s at most); its log: $(tail -5 "$work/log")" >&2
    return 1
  fi
  if [ "$2" != 0 ]; then
    target/release/examples/loadbench --drive "127.0.0.1:$port" --duration "$2" >/dev/null 2>&1 \
      || { kill -TERM "$pid"; echo "the load generator failed" >&2; return 1; }
  fi
  local n
  n=$(curl -s "127.0.0.1:$port/metrics" \
    | awk '/^imrelay_callback_duration_seconds_count/ {s += $2} END {print s + 0}')
  kill -TERM "$pid"
  wait "$pid" || true
  echo "$(sed -n 's/.*Collected : \([0-9]*\).*/\1/p' "$work/log") $n"
}

number() { [[ "$1" =~ ^[0-9]+$ ]]; }
for bin in "${@:-target/release/imrelay}"; do
  # `run` is in a command substitution, where `set -e` does not reach: check what it printed.
  read -r idle _ <<< "$(run "$bin" 0)"
  read -r driven n <<< "$(run "$bin" "$seconds")"
  if ! number "$idle" || ! number "$driven" || ! number "$n" || [ "$n" -eq 0 ]; then
    echo "$bin: no figure (instructions idle '$idle', driven '$driven', callbacks '$n')" >&2
    exit 1
  fi
  printf '%s: %d instructions per callback (%d callbacks)\n' "$bin" $(( (driven - idle) / n )) "$n"
done
