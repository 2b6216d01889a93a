#!/usr/bin/env bash
# Debian's Chromium for the browser tests (tests/test_browser.py drives it with Playwright
# through executable_path; Playwright's own browser download does not work offline).
# Idempotent: does nothing when /usr/bin/chromium is already there. Needs root (CI is root).
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
    echo "setup-browser: $(/usr/bin/chromium --version 2>/dev/null || echo chromium) already installed"
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
echo "setup-browser: installed $(/usr/bin/chromium --version 2>/dev/null)"
