#!/usr/bin/env bash
# A customer's flow through the GENERATED Python SDK against a real server.
#
# Generates the Python client from the committed customer document (api/openapi.json) with
# openapi-python-client into a temporary folder (generator warnings are summarised here; making
# them fatal is scripts/gen-sdk.sh's job), builds and starts the release server on a free port
# with a temporary SQLite database and three throw-away keys, then runs sdk_flow.py: create, read,
# list, replay, typed 402, typed 429, typed 404, worker claim/complete over plain HTTP, completed
# batch, cancel, credits, usage, a webhook during a secret rotation verified with both secrets by
# the standardwebhooks library, and a resend. Exits 1 when any step fails.
#
# Environment (optional): SDK_DOC (document to generate from; default api/openapi.json),
# CONFORMANCE_SKIP_BUILD=1, CONFORMANCE_KEEP=1 (keep the work dir with the server log and the SDK).
set -euo pipefail
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

DOC="${SDK_DOC:-api/openapi.json}"
API_KEY="vb_conformance_sdk_key"
POOR_API_KEY="vb_conformance_poor_key"
BURST_API_KEY="vb_conformance_burst_key"
HOOK_API_KEY="vb_conformance_hook_key"
# A receiver of sdk_flow.py listens here; the key signs with both secrets (a rotation).
HOOK_PORT="$(conf_free_port)"
HOOK_SECRET="whsec_$(printf 'conformance-new-secret-32-bytes!' | base64)"
HOOK_OLD_SECRET="whsec_$(printf 'conformance-old-secret-32-bytes!' | base64)"
started=$(date +%s)

conf_venv
conf_build

CONF_EXTRA_TOML="
[keys.sdk]
key_sha256 = \"$(conf_sha256 "$API_KEY")\"
initial_credits = 100000

[keys.poor]
key_sha256 = \"$(conf_sha256 "$POOR_API_KEY")\"
initial_credits = 5

[keys.burst]
key_sha256 = \"$(conf_sha256 "$BURST_API_KEY")\"
initial_credits = 100000
rate_limit_per_min = 2

[keys.hooks]
key_sha256 = \"$(conf_sha256 "$HOOK_API_KEY")\"
initial_credits = 100000
webhook_url = \"http://127.0.0.1:$HOOK_PORT/hook\"
webhook_secret = \"$HOOK_SECRET\"
previous_webhook_secret = \"$HOOK_OLD_SECRET\"
previous_webhook_secret_expires_at = \"2999-01-01T00:00:00Z\"
"
conf_start_server

conf_log "generating the Python SDK from $DOC"
rc=0
"$VENV/bin/openapi-python-client" generate --path "$DOC" --output-path "$CONF_WORK/sdk" \
    --config "$CONF_DIR/openapi-python-client.yaml" --meta none --overwrite \
    >"$CONF_WORK/generate.txt" 2>&1 || rc=$?
[ "$rc" -eq 0 ] || { cat "$CONF_WORK/generate.txt"; echo "SDK generation failed"; exit 1; }
if grep -qE '^WARNING|^Unable to process' "$CONF_WORK/generate.txt"; then
    echo "note: the generator warned (run scripts/gen-sdk.sh for details); what it dropped:"
    awk '/^Unable to process schema/ { s = $0; getline; getline; print "    " s " " $0 }' \
        "$CONF_WORK/generate.txt"
fi

# With --meta none the package is the output folder itself: put its parent on sys.path under
# the package's name.
mkdir -p "$CONF_WORK/sdkpath"
ln -s "$CONF_WORK/sdk" "$CONF_WORK/sdkpath/video_batch_client"

conf_log "running sdk_flow.py"
rc=0
BASE_URL="$BASE_URL" SDK_PATH="$CONF_WORK/sdkpath" API_KEY="$API_KEY" POOR_API_KEY="$POOR_API_KEY" \
    BURST_API_KEY="$BURST_API_KEY" WORKER_SECRET="$WORKER_SECRET" \
    HOOK_API_KEY="$HOOK_API_KEY" HOOK_PORT="$HOOK_PORT" HOOK_SECRET="$HOOK_SECRET" \
    HOOK_OLD_SECRET="$HOOK_OLD_SECRET" \
    timeout 120 "$VENV/bin/python" "$CONF_DIR/sdk_flow.py" || rc=$?

if grep -qiE 'internal error|panicked' "$CONF_WORK/server.log"; then
    echo "server log lines about internal errors:"
    grep -iE 'internal error|panicked' "$CONF_WORK/server.log" | head -n 20
fi
echo "sdk.sh: $(($(date +%s) - started))s"
exit "$rc"
