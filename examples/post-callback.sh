#!/usr/bin/env bash
# Posts a sample callback to a running imrelay the way Tencent's Chat backend does.
#   examples/post-callback.sh [BODY.json] [CallbackCommand] [http://host:port/callback]
# With TOKEN set, it also signs the request (Sign = sha256(TOKEN + RequestTime)).
set -euo pipefail
body=${1:-examples/callbacks/group-message.json}
command=${2:-$(sed -n 's/.*"CallbackCommand" *: *"\([^"]*\)".*/\1/p' "$body" | head -n 1)}
url=${3:-http://127.0.0.1:8080/callback}
query="SdkAppid=${SDKAPPID:-888888}&CallbackCommand=${command}&contenttype=json&ClientIP=127.0.0.1&OptPlatform=RESTAPI"
if [ -n "${TOKEN:-}" ]; then
  now=$(date +%s)
  sign=$(printf '%s%s' "$TOKEN" "$now" | sha256sum | cut -d' ' -f1)
  query="${query}&Sign=${sign}&RequestTime=${now}"
fi
curl -sS -X POST "${url}?${query}" --data-binary @"$body"
echo
