#!/usr/bin/env bash
# Install the Debian packages the tests need, only those that are missing (idempotent).
#
#   scripts/system-deps.sh            the default set (what `make test` needs)
#   scripts/system-deps.sh PKG...     these packages instead
#
# Default set: docker-compose (1.29.2 on bookworm) - it parses and validates docker-compose.yml
# (`docker-compose config`) without a Docker engine, which tests/test_compose.py relies on.
# Runs `apt-get update` at most once per call, and only when something must be installed.
# Works as root, or through sudo when not root; without apt-get (not Debian) it says what is
# missing and exits 0, so the tests that need a tool skip with that reason.
set -euo pipefail

pkgs=("$@")
if [ ${#pkgs[@]} -eq 0 ]; then
  pkgs=(docker-compose)
fi

missing=()
for p in "${pkgs[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: apt-get not found; install by hand: ${missing[*]}" >&2
  exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1; then
  as_root=(sudo -n)
else
  echo "system-deps: not root and no sudo; install by hand: ${missing[*]}" >&2
  exit 1
fi

echo "system-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "system-deps: done"
