#!/usr/bin/env bash
# Lints the three committed OpenAPI documents with Redocly CLI's built-in `recommended` ruleset.
# Errors fail the script; warnings are printed and allowed.
#
# Redocly CLI is pinned: releases after 2.x drop Node.js 20, which is what this machine has.
# Environment (optional): LINT_DOCS (default: api/openapi.json api/openapi-worker.json
# api/openapi-admin.json).
set -euo pipefail
cd "$(dirname "$0")/../.."

REDOCLY="@redocly/cli@2.77.0"
DOCS="${LINT_DOCS:-api/openapi.json api/openapi-worker.json api/openapi-admin.json}"
started=$(date +%s)
out="$(mktemp)"
trap 'rm -f "$out"' EXIT

echo "==> $REDOCLY lint $DOCS"
rc=0
# shellcheck disable=SC2086 # DOCS is a list of paths
npx --yes "$REDOCLY" lint $DOCS --format stylish >"$out" 2>&1 || rc=$?
# npm's own notices (e.g. about the machine's npmrc) are not about our documents.
grep -vE '^npm (warn|notice)' "$out" || true

errors=$(grep -cE '^\s+[0-9]+:[0-9]+\s+error\s' "$out" || true)
warnings=$(grep -cE '^\s+[0-9]+:[0-9]+\s+warning\s' "$out" || true)
echo
echo "lint: $errors error(s), $warnings warning(s); $(($(date +%s) - started))s"
if [ "$rc" -ne 0 ] || [ "$errors" -ne 0 ] || [ "$warnings" -ne 0 ]; then
    echo "lint FAILED (redocly exit code $rc)"
    exit 1
fi
echo "lint passed"
