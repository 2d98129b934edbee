#!/usr/bin/env bash
# Debian packages that the integration tests drive for real (called by `make test`):
#   chromium  - renders report.html headless (tests/integration/test_report_browser.py)
# Installed with apt-get (update once, then install -y) when missing. Without root the script
# only warns; the tests that need a missing tool are then skipped, except under CI=true, where
# they fail.
set -euo pipefail
packages=()
command -v chromium >/dev/null 2>&1 || packages+=(chromium)
if [ ${#packages[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install_system_deps: not root, cannot apt-get install ${packages[*]}; tests needing them will be skipped" >&2
    exit 0
fi
echo "install_system_deps: apt-get install ${packages[*]}" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
