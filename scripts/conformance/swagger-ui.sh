#!/usr/bin/env bash
# Swagger UI works on first try, in a real browser: starts the release server (as
# `cargo run --release` would, with the local config and its demo key) on a temporary SQLite
# database and runs swagger_ui.py (Playwright driving Debian's headless Chromium) through
# /docs, /worker/docs and /admin/docs. Installs Debian's chromium when it is missing and this
# runs as root; prints "SKIPPED: ..." and exits 0 only when no browser can be had.
#
# Environment: CONFORMANCE_SKIP_BUILD=1 uses target/release/video-batch-api as it is;
# CONFORMANCE_REPORT_DIR (default target/conformance) receives the screenshots.
set -euo pipefail
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
if [ ! -x "$CHROMIUM" ] && [ "$(id -u)" = 0 ]; then
    conf_log "installing Debian's chromium"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 || true
fi
if [ ! -x "$CHROMIUM" ]; then
    echo "SKIPPED: no browser at $CHROMIUM and it could not be installed; Swagger UI was not tried"
    exit 0
fi

conf_venv
conf_build
REPORT_DIR="${CONFORMANCE_REPORT_DIR:-$ROOT/target/conformance}"
mkdir -p "$REPORT_DIR"
conf_start_server
# The demo key of config/local.toml, as the README tells a newcomer to use it.
CHROMIUM="$CHROMIUM" timeout 180 "$VENV/bin/python" "$CONF_DIR/swagger_ui.py" "$BASE_URL" \
    vb_demo_local_only_not_for_production "$REPORT_DIR"
