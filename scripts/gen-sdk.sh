#!/usr/bin/env bash
# Generates the customer SDKs from the committed customer document api/openapi.json:
#   sdk/python/      Python client (openapi-python-client, pinned in scripts/conformance/requirements.txt)
#                    package `video_batch_client`, one module per operation id; the same
#                    generator is also run stock (default options, no config) and must not warn
#   sdk/typescript/  TypeScript types (openapi-typescript, pinned below), type-checked with tsc
# sdk/ is git-ignored. Fails when a generator prints a warning or an error about the document
# (a warning there means part of the document is dropped from the SDK), when the generated
# Python package does not import or lacks an operation, or when the types do not compile.
#
# Environment (optional): SDK_DOC (default api/openapi.json), CONFORMANCE_VENV.
set -euo pipefail
# shellcheck source=conformance/lib.sh source-path=SCRIPTDIR
source "$(dirname "$0")/conformance/lib.sh"
cd "$ROOT"

OPENAPI_TYPESCRIPT="openapi-typescript@7.13.0"
TYPESCRIPT="typescript@5.9.3"
DOC="${SDK_DOC:-api/openapi.json}"
OUT="$ROOT/sdk"
# The operation ids the customer SDK must hold (the design's, plus paging, the exports, retry-failed and webhook operations).
OPERATIONS="create_batch get_batch list_batch_items get_batch_results get_batch_errors retry_failed_items list_batches cancel_batch get_credits get_usage list_webhook_deliveries get_webhook_delivery resend_webhook_delivery recover_webhooks list_webhook_endpoints enable_webhook_endpoint"
started=$(date +%s)
status=0
log="$(mktemp -d /tmp/gen-sdk.XXXXXX)"
trap 'rm -rf "$log"' EXIT

conf_venv
mkdir -p "$OUT"

# --- Python -------------------------------------------------------------------------------
conf_log "openapi-python-client $("$VENV/bin/openapi-python-client" --version | awk '{print $NF}') < $DOC"
rc=0
"$VENV/bin/openapi-python-client" generate --path "$DOC" --output-path "$OUT/python" \
    --config "$CONF_DIR/openapi-python-client.yaml" --meta setup --overwrite \
    >"$log/python.txt" 2>&1 || rc=$?
cat "$log/python.txt"
if [ "$rc" -ne 0 ]; then
    echo "FAIL: openapi-python-client exited $rc"; status=1
elif grep -qiE 'warning|unable to process|cannot parse' "$log/python.txt"; then
    # The details are printed above; this is a digest of what was dropped.
    echo "FAIL: openapi-python-client warned about $DOC:"
    grep -E '^WARNING|^Unable to process|^Cannot|^/components' "$log/python.txt" | sort | uniq -c | sort -rn
    status=1
fi
# Whatever was generated must import, and hold every promised operation.
if [ -d "$OUT/python/video_batch_client" ]; then
    PYTHONPATH="$OUT/python" OPERATIONS="$OPERATIONS" "$VENV/bin/python" - <<'PY' || status=1
import importlib, os, pkgutil, sys
import video_batch_client.api as api
found = {m.name.rsplit(".", 1)[-1] for m in pkgutil.walk_packages(api.__path__, api.__name__ + ".")}
for m in pkgutil.walk_packages(api.__path__, api.__name__ + "."):
    importlib.import_module(m.name)
missing = [op for op in os.environ["OPERATIONS"].split() if op not in found]
import video_batch_client.models as models
print("python SDK: operations", sorted(found & set(os.environ["OPERATIONS"].split())),
      "models", len(models.__all__))
if missing:
    print("FAIL: python SDK lacks operations", missing); sys.exit(1)
# The typed bodies a customer needs: without them `Response.parsed` is None.
lacking = [m for m in ("BatchCreated", "Batch", "BatchList", "BatchItemView", "ErrorBody")
           if m not in models.__all__]
if lacking:
    print("FAIL: python SDK lacks models", lacking); sys.exit(1)
PY
else
    echo "FAIL: no python package generated"; status=1
fi

# --- Python, stock ------------------------------------------------------------------------
# What a customer runs: the generator with its default options and no configuration file (its
# default post-hook formats with ruff, pinned in the requirements). Any warning fails, and
# every promised operation must be in the package it made.
conf_log "openapi-python-client generate --path $DOC (stock: default options, no config)"
mkdir -p "$log/stock"
rc=0
doc_abs="$(cd "$(dirname "$DOC")" && pwd)/$(basename "$DOC")"
(cd "$log/stock" && PATH="$VENV/bin:$PATH" "$VENV/bin/openapi-python-client" generate \
    --path "$doc_abs") >"$log/stock.txt" 2>&1 || rc=$?
cat "$log/stock.txt"
if [ "$rc" -ne 0 ]; then
    echo "FAIL: stock openapi-python-client exited $rc"; status=1
elif grep -qiE 'warning|unable to process|cannot parse|error' "$log/stock.txt"; then
    echo "FAIL: stock openapi-python-client warned about $DOC"; status=1
fi
for op in $OPERATIONS; do
    if ! find "$log/stock" -path "*/api/*/$op.py" | grep -q .; then
        echo "FAIL: stock python client lacks $op"; status=1
    fi
done

# --- TypeScript ---------------------------------------------------------------------------
conf_log "$OPENAPI_TYPESCRIPT < $DOC"
mkdir -p "$OUT/typescript"
rc=0
npx --yes "$OPENAPI_TYPESCRIPT" "$DOC" -o "$OUT/typescript/schema.d.ts" >"$log/ts.txt" 2>&1 || rc=$?
# npm's own notices (e.g. about the machine's npmrc) are not about our document.
grep -vE '^npm (warn|notice)' "$log/ts.txt" >"$log/ts-own.txt" || true
cat "$log/ts-own.txt"
if [ "$rc" -ne 0 ]; then
    echo "FAIL: openapi-typescript exited $rc"; status=1
elif grep -qiE 'warn|⚠|error' "$log/ts-own.txt"; then
    echo "FAIL: openapi-typescript warned about $DOC"; status=1
fi
if [ -s "$OUT/typescript/schema.d.ts" ]; then
    conf_log "tsc --noEmit --strict ($TYPESCRIPT)"
    rc=0
    npx --yes -p "$TYPESCRIPT" tsc --noEmit --strict "$OUT/typescript/schema.d.ts" \
        >"$log/tsc.txt" 2>&1 || rc=$?
    grep -vE '^npm (warn|notice)' "$log/tsc.txt" || true
    [ "$rc" -eq 0 ] || { echo "FAIL: the TypeScript types do not compile"; status=1; }
fi

echo
echo "gen-sdk: $OUT/python, $OUT/typescript/schema.d.ts; $(($(date +%s) - started))s"
if [ "$status" -ne 0 ]; then
    echo "gen-sdk FAILED"
    exit 1
fi
echo "gen-sdk passed"
