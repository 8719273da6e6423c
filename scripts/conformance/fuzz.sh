#!/usr/bin/env bash
# Property-based conformance of the running server against its own three OpenAPI documents,
# with schemathesis (version pinned in requirements.txt).
#
# Builds the release binary, starts it on a free port with a temporary SQLite database and a
# temporary config (one throw-away key "fuzz" with plenty of credits and quota), then runs
# schemathesis against the customer, worker and admin documents as served by the server, with
# the checks
#     not_a_server_error, status_code_conformance, response_schema_conformance,
#     content_type_conformance
# in all phases (examples, coverage, fuzzing, stateful). Prints each run's failures (with a curl
# line that reproduces each one), then a summary; exits 1 if any run failed.
#
# Environment (all optional):
#   FUZZ_MAX_EXAMPLES       test cases per operation and phase (default 30)
#   FUZZ_SEED               seed, to replay a run (schemathesis prints the seed it used)
#   FUZZ_DOCS               which documents, default "customer worker admin"
#   CONFORMANCE_SKIP_BUILD  1: use target/release/video-batch-api as it is
#   CONFORMANCE_REPORT_DIR  where the JUnit and full text reports go (default target/conformance)
#   CONFORMANCE_KEEP        1: keep the temporary work dir (config, database, server log)
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

MAX_EXAMPLES="${FUZZ_MAX_EXAMPLES:-30}"
DOCS="${FUZZ_DOCS:-customer worker admin}"
REPORT_DIR="${CONFORMANCE_REPORT_DIR:-$ROOT/target/conformance}"
CHECKS="not_a_server_error,status_code_conformance,response_schema_conformance,content_type_conformance"
# A fresh, throw-away key: the reproducing curl lines below show it in clear.
FUZZ_KEY="vb_conformance_fuzz_key"
started=$(date +%s)

conf_venv
conf_build
mkdir -p "$REPORT_DIR"

CONF_EXTRA_TOML="
[keys.fuzz]
key_sha256 = \"$(conf_sha256 "$FUZZ_KEY")\"
initial_credits = 100000000
rate_limit_per_min = 100000
read_rate_limit_per_min = 100000
max_batch_items = 100
"
conf_start_server

# document name -> (path of the served document, base URL, auth header)
doc_path() {
    case "$1" in
        customer) echo /openapi.json ;;
        worker) echo /worker/openapi.json ;;
        admin) echo /admin/openapi.json ;;
    esac
}
doc_base() {
    case "$1" in
        customer) echo /api/enterprise ;;
        worker) echo /api/internal/worker ;;
        admin) echo /api/admin ;;
    esac
}
doc_auth() {
    case "$1" in
        customer) echo "x-api-key: $FUZZ_KEY" ;;
        worker) echo "Authorization: Bearer $WORKER_SECRET" ;;
        admin) echo "Authorization: Bearer $ADMIN_TOKEN" ;;
    esac
}

seed_args=()
[ -n "${FUZZ_SEED:-}" ] && seed_args=(--seed "$FUZZ_SEED")

failed=()
summary=()
for doc in $DOCS; do
    conf_log "schemathesis: $doc document ($BASE_URL$(doc_path "$doc"))"
    out="$REPORT_DIR/fuzz-$doc.txt"
    t0=$(date +%s)
    rc=0
    # `timeout` bounds a run that would hang (e.g. a server that stops answering).
    timeout 240 "$VENV/bin/schemathesis" run "$BASE_URL$(doc_path "$doc")" \
        --url "$BASE_URL$(doc_base "$doc")" \
        --header "$(doc_auth "$doc")" \
        --checks "$CHECKS" \
        --max-examples "$MAX_EXAMPLES" \
        --phases examples,coverage,fuzzing,stateful \
        --request-timeout 10 \
        --workers 1 \
        --output-sanitize false \
        --generation-database none \
        --no-color \
        --report junit --report-junit-path "$REPORT_DIR/fuzz-$doc.junit.xml" \
        "${seed_args[@]}" >"$out" 2>&1 || rc=$?
    t1=$(date +%s)
    cat "$out"
    # One line per document from schemathesis' own summary.
    ops=$(grep -m1 -E '^\s+Tested:' "$out" | awk '{print $2}' || true)
    cases=$(grep -m1 -E '^\s+[0-9]+ generated' "$out" | sed -E 's/^\s+//' || true)
    summary+=("$(printf '%-9s rc=%-3s operations tested=%-3s %-60s %4ss' \
        "$doc" "$rc" "${ops:-?}" "${cases:-?}" "$((t1 - t0))")")
    [ "$rc" -eq 0 ] || failed+=("$doc")
done

# A 5xx is also logged by the server with its cause: show those lines to help diagnosis.
if grep -qiE 'internal error|panicked' "$CONF_WORK/server.log"; then
    echo
    echo "==> server log lines about internal errors:"
    grep -iE 'internal error|panicked' "$CONF_WORK/server.log" | head -n 40
fi

echo
echo "================ conformance fuzz summary (max-examples $MAX_EXAMPLES) ================"
printf '%s\n' "${summary[@]}"
echo "reports: $REPORT_DIR/fuzz-*.txt, fuzz-*.junit.xml; total $(($(date +%s) - started))s"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all documents passed"
