#!/usr/bin/env bash
# Debian's chromium for tests/test_browser.py: Playwright drives this system browser and never downloads one.
# Idempotent: does nothing when chromium is already installed. Needs root and apt (CI runs as root on Debian);
# elsewhere it only says what to do, and the browser test skips with the same advice.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    echo "chromium already installed: $(command -v chromium)"
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "chromium is missing: install it as root with 'apt-get install chromium' (Debian/Ubuntu); the browser test skips until then" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# fonts-liberation: readable text in screenshots (chromium only recommends it)
apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null
echo "installed $(chromium --version 2>/dev/null || echo chromium)"
