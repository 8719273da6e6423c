#!/usr/bin/env bash
# The Rust client a customer generates with progenitor (stock generator, default options) from
# the committed customer document api/openapi.json, compiled and driven against a real server.
#
# scripts/conformance/progenitor/ is a small crate outside the workspace: its build script runs
# progenitor::Generator::default() over the document, and its main drives create -> replay ->
# get -> list -> worker renders/fails (plain HTTP) -> get -> results and error exports (streams)
# -> retry-failed -> a typed 404. Fails when the generator refuses the document, when the
# generated code does not compile or compiles with a warning, or when a step does not hold.
#
# Environment (optional): SDK_DOC (default api/openapi.json), CONFORMANCE_SKIP_BUILD=1,
# CONFORMANCE_KEEP=1.
set -euo pipefail
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

API_KEY="vb_conformance_progenitor_key"
started=$(date +%s)
export SDK_DOC="$ROOT/${SDK_DOC:-api/openapi.json}"
CRATE="$CONF_DIR/progenitor"

conf_log "progenitor: generating and compiling a client of $SDK_DOC"
build_log="$(mktemp /tmp/progenitor-build.XXXXXX)"
rc=0
cargo build --locked --manifest-path "$CRATE/Cargo.toml" >"$build_log" 2>&1 || rc=$?
if [ "$rc" -ne 0 ]; then
    tail -n 60 "$build_log"; rm -f "$build_log"
    echo "FAIL: the progenitor client did not build"; exit 1
fi
if grep -qE '^warning' "$build_log"; then
    grep -E '^warning' -A 6 "$build_log" | head -n 60; rm -f "$build_log"
    echo "FAIL: the progenitor client compiles with warnings"; exit 1
fi
rm -f "$build_log"
generated="$(find "$CRATE/target/debug/build" -path '*progenitor-check-*/out/client.rs' -newer "$SDK_DOC" | head -n 1)"
[ -n "$generated" ] && conf_log "generated $(grep -c 'pub async fn' "$generated") operations ($(wc -l <"$generated") lines)"

conf_build
CONF_EXTRA_TOML="
[keys.progenitor]
key_sha256 = \"$(conf_sha256 "$API_KEY")\"
initial_credits = 100000
"
conf_start_server

rc=0
BASE_URL="$BASE_URL" API_KEY="$API_KEY" WORKER_SECRET="$WORKER_SECRET" \
    timeout 120 "$CRATE/target/debug/progenitor-check" || rc=$?
if grep -qiE 'internal error|panicked' "$CONF_WORK/server.log"; then
    echo "server log lines about internal errors:"
    grep -iE 'internal error|panicked' "$CONF_WORK/server.log" | head -n 20
fi
echo "progenitor.sh: $(($(date +%s) - started))s"
exit "$rc"
