#!/usr/bin/env bash
# Installs what tests/clients.rs drives against a real engage server, pinned, and idempotent:
#   - Debian's chromium and chromium-driver (the snippet's browser tests, over WebDriver);
#   - the official Segment and RudderStack Python SDKs, in a venv (requirements.txt);
#   - Segment's official Node.js SDK (package.json, package-lock.json; npm ci).
# Into $1 (default target/clients). Prints nothing on success but what the installers print.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/../../target/clients}
mkdir -p "$out"
out=$(cd "$out" && pwd)

if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq chromium chromium-driver >/dev/null
fi

# A stamp per input: a changed pin reinstalls, an unchanged one costs nothing.
stamp() { sha256sum "$@" | sha256sum | cut -c1-16; }

py=$(stamp "$here/requirements.txt")
if [ "$(cat "$out/venv/.stamp" 2>/dev/null)" != "$py" ]; then
  rm -rf "$out/venv"
  python3 -m venv "$out/venv"
  "$out/venv/bin/pip" install -q --disable-pip-version-check --no-deps -r "$here/requirements.txt"
  echo "$py" >"$out/venv/.stamp"
fi

js=$(stamp "$here/package.json" "$here/package-lock.json")
if [ "$(cat "$out/node/.stamp" 2>/dev/null)" != "$js" ]; then
  rm -rf "$out/node"
  mkdir -p "$out/node"
  cp "$here/package.json" "$here/package-lock.json" "$out/node/"
  (cd "$out/node" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  echo "$js" >"$out/node/.stamp"
fi
