#!/usr/bin/env bash
# test-batch-flow.sh: end-to-end smoke test of a running video-batch-api server.
#
# Usage:
#   ENTERPRISE_API_KEY=... INTERNAL_WORKER_SECRET=... scripts/test-batch-flow.sh
#   MODE=insufficient ENTERPRISE_API_KEY=... scripts/test-batch-flow.sh
#   MODE=ratelimit BURST=100 ENTERPRISE_API_KEY=... scripts/test-batch-flow.sh
#
# Environment:
#   BASE_URL                server base URL (default http://127.0.0.1:8080)
#   ENTERPRISE_API_KEY      customer API key, sent as `x-api-key` (required)
#   INTERNAL_WORKER_SECRET  worker bearer secret (required in MODE=flow)
#   COST_PER_VIDEO_EXPECT   expected cost_per_video of the key (optional)
#   REQ_ID                  idempotency request_id (default test-<unix time>)
#   MODE                    flow (default) | insufficient | ratelimit
#   BURST                   create calls to send in MODE=ratelimit (default 100)
#   MAX_CLAIMS              claim calls before giving up in MODE=flow (default 50)
#   CURL_MAX_TIME           per-request timeout in seconds (default 30)
#
# Modes:
#   flow          create a 2-item batch, check the response, replay it (same
#                 request_id => same batch_id, 200 + Idempotent-Replayed: true),
#                 complete both items through the worker API, then check the
#                 batch is completed and the credit ledger balances.
#   insufficient  expects the key to have fewer credits than a 2-item batch
#                 needs: the create must fail with 402 INSUFFICIENT_CREDITS.
#   ratelimit     sends up to BURST creates (1 item each, request ids
#                 REQ_ID-1, REQ_ID-2, ...) and expects a 429 RATE_LIMIT_EXCEEDED
#                 with a Retry-After header. Accepted batches hold real credits
#                 and stay queued for the workers.
#
# Output: `✅ ...` for every passed check; on the first failure `❌ ...` and
# exit 1. Unexpected error responses print `❌ <CODE> (<http status>)`, the
# message and the raw body. Needs only curl and jq.

# jq programs are written in single quotes on purpose ($var are jq variables).
# shellcheck disable=SC2016

set -euo pipefail

BASE_URL="${BASE_URL:-http://127.0.0.1:8080}"
BASE_URL="${BASE_URL%/}"
MODE="${MODE:-flow}"
REQ_ID="${REQ_ID:-test-$(date +%s)}"
BURST="${BURST:-100}"
MAX_CLAIMS="${MAX_CLAIMS:-50}"
CURL_MAX_TIME="${CURL_MAX_TIME:-30}"
COST_PER_VIDEO_EXPECT="${COST_PER_VIDEO_EXPECT:-}"
WORKER_ID="flow-script"

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

die() {
  echo "❌ $*" >&2
  exit 1
}

ok() {
  echo "✅ $*"
}

for tool in curl jq; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is required but not installed"
done

is_uint() {
  [[ "$1" =~ ^[0-9]+$ ]]
}

[[ -n "${ENTERPRISE_API_KEY:-}" ]] || die "ENTERPRISE_API_KEY is required"
if ! is_uint "$BURST" || ((BURST == 0)); then
  die "BURST must be a positive integer (got '$BURST')"
fi
if ! is_uint "$MAX_CLAIMS" || ((MAX_CLAIMS == 0)); then
  die "MAX_CLAIMS must be a positive integer (got '$MAX_CLAIMS')"
fi
if [[ -n "$COST_PER_VIDEO_EXPECT" ]] && ! is_uint "$COST_PER_VIDEO_EXPECT"; then
  die "COST_PER_VIDEO_EXPECT must be a non-negative integer (got '$COST_PER_VIDEO_EXPECT')"
fi

TMP_DIR="$(mktemp -d "${TMPDIR:-/tmp}/test-batch-flow.XXXXXX")"
trap 'rm -rf "$TMP_DIR"' EXIT

# Results of the last http() call.
HTTP_STATUS=""
HTTP_BODY=""
HTTP_REQUEST=""
HTTP_HEADERS_FILE="$TMP_DIR/headers"

# http METHOD URL [BODY] [HEADER...]
# Sends one request; sets HTTP_STATUS and HTTP_BODY, keeps the response headers
# in $HTTP_HEADERS_FILE. Exits when curl itself fails (connection refused,
# timeout, ...); HTTP error statuses are left to the caller.
http() {
  local method="$1" url="$2" body="${3:-}"
  shift 3 || shift $#
  local args=(-sS -X "$method" --max-time "$CURL_MAX_TIME"
    -o "$TMP_DIR/body" -D "$HTTP_HEADERS_FILE" -w '%{http_code}'
    -H 'Accept: application/json' -H 'User-Agent: test-batch-flow.sh')
  local h
  for h in "$@"; do
    args+=(-H "$h")
  done
  if [[ -n "$body" ]]; then
    args+=(-H 'Content-Type: application/json' --data-binary "$body")
  fi
  : >"$TMP_DIR/body"
  HTTP_REQUEST="$method ${url#"$BASE_URL"}"
  local rc=0
  HTTP_STATUS="$(curl "${args[@]}" "$url")" || rc=$?
  if ((rc != 0)); then
    echo "❌ curl failed (exit $rc): $method $url" >&2
    [[ -s "$TMP_DIR/body" ]] && cat "$TMP_DIR/body" >&2
    exit 1
  fi
  HTTP_BODY="$(cat "$TMP_DIR/body")"
}

# customer API call: customer METHOD PATH [BODY]
customer() {
  http "$1" "$BASE_URL$2" "${3:-}" "x-api-key: $ENTERPRISE_API_KEY"
}

# worker API call: worker PATH BODY
worker() {
  http POST "$BASE_URL$1" "$2" "Authorization: Bearer $INTERNAL_WORKER_SECRET"
}

# header NAME: value of a response header of the last call (case-insensitive,
# last occurrence wins so that 100-continue blocks are skipped); empty if absent.
header() {
  local name="$1"
  awk -v n="$(printf '%s' "$name" | tr '[:upper:]' '[:lower:]')" '
    {
      sub(/\r$/, "")
      i = index($0, ":")
      if (i > 0 && tolower(substr($0, 1, i - 1)) == n) {
        v = substr($0, i + 1)
        sub(/^[ \t]+/, "", v); sub(/[ \t]+$/, "", v)
        last = v
      }
    }
    END { print last }' "$HTTP_HEADERS_FILE"
}

# jq over the last body; prints nothing (and succeeds) if the body is not JSON.
jb() {
  printf '%s' "$HTTP_BODY" | jq -r "$@" 2>/dev/null || true
}

is_json() {
  printf '%s' "$HTTP_BODY" | jq -e . >/dev/null 2>&1
}

# Prints the standard failure line for an error response and exits.
fail_response() {
  local code message
  if is_json; then
    code="$(jb '.error // "UNKNOWN" | tostring')"
    message="$(jb '.message // "" | tostring')"
  else
    code="NON_JSON_RESPONSE"
    message=""
  fi
  echo "❌ $code ($HTTP_STATUS)" >&2
  echo "   request: $HTTP_REQUEST" >&2
  [[ -n "$message" ]] && echo "   message: $message" >&2
  echo "   body: ${HTTP_BODY:-<empty>}" >&2
  exit 1
}

# Fails unless the last response is a JSON success with one of the statuses.
expect_success() {
  local s
  for s in "$@"; do
    [[ "$HTTP_STATUS" == "$s" ]] || continue
    # 204 and friends: an empty body is fine.
    [[ -z "${HTTP_BODY//[[:space:]]/}" && "$s" != "200" && "$s" != "201" ]] && return 0
    if is_json && [[ "$(jb '.ok')" != "false" ]]; then
      return 0
    fi
  done
  fail_response
}

# check DESCRIPTION JQ_EXPR [jq args...]: evaluates JQ_EXPR on the last body
# with `jq -e`; on false/null/error prints the failure and the body, exits 1.
check() {
  local desc="$1" expr="$2"
  shift 2
  if ! printf '%s' "$HTTP_BODY" | jq -e "$@" "$expr" >/dev/null 2>&1; then
    echo "❌ Assert failed: $desc" >&2
    echo "   expression: $expr" >&2
    echo "   body: ${HTTP_BODY:-<empty>}" >&2
    exit 1
  fi
}

# batch_body REQUEST_ID N_ITEMS: create-batch JSON body.
batch_body() {
  local request_id="$1" n="$2"
  jq -cn --arg rid "$request_id" --argjson n "$n" '
    [ {prompt: "a red fox at dawn", params: {duration_s: 5}},
      {prompt: "a city at night in the rain", params: {duration_s: 5}} ] as $all
    | {request_id: $rid, items: [range(0; $n) | $all[. % 2]]}'
}

# ---------------------------------------------------------------------------
# MODE=flow
# ---------------------------------------------------------------------------

# Validates a create-batch response (first call or replay) and sets BATCH_ID,
# COST, REQUIRED, AVAILABLE, REPLAY.
check_create_response() {
  if [[ "$(jb '.ok')" != "true" ]]; then
    fail_response
  fi
  check "ok === true" '.ok == true'
  check "status == \"queued\"" '.status == "queued"'
  check "total_count == 2" '.total_count == 2'
  check "batch_id is a non-empty string" '(.batch_id | type) == "string" and (.batch_id | length) > 0'
  check "request_id is echoed" '.request_id == $rid' --arg rid "$REQ_ID"
  check "cost_per_video is a non-negative integer" '(.cost_per_video | type) == "number" and .cost_per_video >= 0 and (.cost_per_video | floor) == .cost_per_video'
  if [[ -n "$COST_PER_VIDEO_EXPECT" ]]; then
    check "cost_per_video == $COST_PER_VIDEO_EXPECT" '.cost_per_video == $c' --argjson c "$COST_PER_VIDEO_EXPECT"
  fi
  check "required_credits == 2 * cost_per_video" '.required_credits == 2 * .cost_per_video'
  check "available_credits is a number" '(.available_credits | type) == "number"'

  BATCH_ID="$(jb '.batch_id')"
  COST="$(jb '.cost_per_video')"
  REQUIRED="$(jb '.required_credits')"
  AVAILABLE="$(jb '.available_credits')"
  REPLAY="$(jb '.idempotent_replay // false')"

  if [[ "$REPLAY" == "true" ]]; then
    # On replay available_credits is what is available now (after the hold),
    # so it is not compared with required_credits.
    echo "Idempotent replay detected"
    [[ "$HTTP_STATUS" == "200" ]] || die "replay must be HTTP 200, got $HTTP_STATUS"
    local replayed
    replayed="$(header Idempotent-Replayed)"
    [[ "${replayed,,}" == "true" ]] || die "replay must carry 'Idempotent-Replayed: true', got '${replayed:-<missing>}'"
    ok "Replay returned batch_id=$BATCH_ID (200, Idempotent-Replayed: true)"
  else
    [[ "$HTTP_STATUS" == "201" ]] || die "new batch must be HTTP 201, got $HTTP_STATUS"
    check "idempotent_replay == false" '.idempotent_replay == false'
    check "available_credits >= required_credits" '.available_credits >= .required_credits'
    check "remaining_credits == available_credits - required_credits" \
      '(has("remaining_credits") | not) or .remaining_credits == .available_credits - .required_credits'
  fi
  ok "Assert passed: status=queued total_count=2 cost_per_video=$COST required=$REQUIRED available=$AVAILABLE"
}

# Claims work until both items of $BATCH_ID have been completed by us or are
# otherwise terminal (e.g. a reference worker running next to this script).
process_batch() {
  local claim_body completed=0 released=0 claims=0 idle=0
  claim_body="$(jq -cn --arg w "$WORKER_ID" '{worker_id: $w, max_items: 10}')"
  declare -A done_items=()

  while ((claims < MAX_CLAIMS)); do
    claims=$((claims + 1))
    worker /api/internal/worker/claim "$claim_body"
    expect_success 200
    check "claim response has an items array" '(.items | type) == "array"'

    local items=()
    mapfile -t items < <(jb '.items[] | @base64')
    if ((${#items[@]} == 0)); then
      # Nothing claimable: our items may be leased by another worker. Ask the
      # batch itself whether it is done, else wait a little.
      customer GET "/api/enterprise/video-batch/$BATCH_ID"
      expect_success 200
      local pending
      pending="$(jb 'if (.counts | type) == "object" then (.counts.queued // 0) + (.counts.running // 0)
                     else [.items[]? | select(.status == "queued" or .status == "running")] | length end')"
      if [[ "$pending" == "0" ]]; then
        echo "   batch $BATCH_ID has no queued or running items left"
        break
      fi
      idle=$((idle + 1))
      sleep 1
      continue
    fi

    local enc item item_id item_batch lease body
    for enc in "${items[@]}"; do
      item="$(printf '%s' "$enc" | base64 -d)"
      item_id="$(jq -r '.item_id' <<<"$item")"
      item_batch="$(jq -r '.batch_id' <<<"$item")"
      lease="$(jq -r '.lease_token' <<<"$item")"
      [[ -n "$item_id" && "$item_id" != "null" && -n "$lease" && "$lease" != "null" ]] ||
        die "claimed item without item_id/lease_token: $item"

      if [[ "$item_batch" == "$BATCH_ID" ]]; then
        body="$(jq -cn --arg t "$lease" --arg u "https://cdn.example/videos/$item_id.mp4" \
          '{lease_token: $t, result_url: $u}')"
        worker "/api/internal/worker/items/$item_id/complete" "$body"
        expect_success 200 204
        done_items["$item_id"]=1
        completed=$((completed + 1))
        echo "   completed item $item_id (attempt $(jq -r '.attempt // "?"' <<<"$item"))"
      else
        # An item of another batch (claims are oldest batch first, fair across
        # keys). Hand it back as a retryable failure so that it returns to the
        # queue. NOTE: this spends one of that item's attempts (worker
        # max_attempts): do not run this script against a queue that holds
        # other customers' work you care about.
        body="$(jq -cn --arg t "$lease" \
          '{lease_token: $t, error: "released by flow script", retryable: true}')"
        worker "/api/internal/worker/items/$item_id/fail" "$body"
        if [[ "$HTTP_STATUS" =~ ^2 ]]; then
          released=$((released + 1))
        else
          echo "   warning: could not release item $item_id of batch $item_batch: $(jb '.error // "?"') ($HTTP_STATUS)" >&2
        fi
      fi
    done

    if ((${#done_items[@]} >= 2)); then
      break
    fi
  done

  echo "   worker: $claims claim call(s), completed $completed item(s) of our batch, released $released other item(s), idle polls $idle"
  if ((${#done_items[@]} < 2)); then
    # A concurrent worker may have finished them; the batch check below decides.
    echo "   note: this script completed ${#done_items[@]} of 2 items itself" >&2
  fi
  ok "Worker processing done for batch_id=$BATCH_ID"
}

check_batch_completed() {
  local tries=0
  # Batch status may settle a moment after the last item report.
  while :; do
    customer GET "/api/enterprise/video-batch/$BATCH_ID"
    expect_success 200
    [[ "$(jb '.status')" == "completed" ]] && break
    tries=$((tries + 1))
    ((tries < 10)) || break
    sleep 1
  done
  check "batch_id matches" '.batch_id == $b' --arg b "$BATCH_ID"
  check "status == \"completed\"" '.status == "completed"'
  check "counts.total == 2" '.counts.total == 2'
  check "counts.succeeded == 2" '.counts.succeeded == 2'
  check "counts.failed == 0 and counts.cancelled == 0" '.counts.failed == 0 and .counts.cancelled == 0'
  check "counts.queued == 0 and counts.running == 0" '.counts.queued == 0 and .counts.running == 0'
  check "items has 2 entries, all succeeded" '(.items | length) == 2 and all(.items[]; .status == "succeeded")'
  check "every item has a result_url" 'all(.items[]; (.result_url | type) == "string" and (.result_url | length) > 0)'
  ok "Batch completed: status=completed counts.succeeded=$(jb '.counts.succeeded')/$(jb '.counts.total')"
}

check_credits() {
  customer GET /api/enterprise/credits
  expect_success 200
  check "balance, held, available are numbers" \
    '(.balance | type) == "number" and (.held | type) == "number" and (.available | type) == "number"'
  check "available == balance - held" '.available == .balance - .held'
  echo "   credits: balance=$(jb '.balance') held=$(jb '.held') available=$(jb '.available')"
  check "ledger is an array" '(.ledger | type) == "array"'

  # Amounts are compared as absolute values, so the check holds whether the
  # ledger stores movements signed (charge = -20) or unsigned (charge = 20).
  local sums='
    [.ledger[] | select(.batch_id == $b)] as $rows
    | def total(k): [$rows[] | select(.kind == k) | .amount | if . < 0 then -. else . end] | add // 0;
    {rows: ($rows | length), hold: total("hold"), charge: total("charge"), release: total("release")}'
  local s
  s="$(printf '%s' "$HTTP_BODY" | jq -c --arg b "$BATCH_ID" "$sums")" || die "could not read the ledger: $HTTP_BODY"
  local rows hold charge release
  rows="$(jq -r '.rows' <<<"$s")"
  hold="$(jq -r '.hold' <<<"$s")"
  charge="$(jq -r '.charge' <<<"$s")"
  release="$(jq -r '.release' <<<"$s")"
  echo "   ledger rows for batch $BATCH_ID: $rows (hold=$hold charge=$charge release=$release)"

  ((rows > 0)) || die "Assert failed: no ledger rows for batch $BATCH_ID (is the ledger window too short?)"
  [[ "$charge" == "$REQUIRED" ]] || die "Assert failed: charges for the batch sum to $charge, expected required_credits=$REQUIRED"
  ok "Ledger charges for batch sum to required_credits=$REQUIRED"
  local net
  net="$(jq -n --argjson h "$hold" --argjson c "$charge" --argjson r "$release" '$h - $c - $r')"
  [[ "$net" == "0" ]] || die "Assert failed: holds - charges - releases for the batch = $net, expected 0"
  ok "Ledger balanced for batch: holds($hold) - charges($charge) - releases($release) = 0"
}

mode_flow() {
  [[ -n "${INTERNAL_WORKER_SECRET:-}" ]] || die "INTERNAL_WORKER_SECRET is required for the processing step (MODE=flow)"
  echo "== flow: BASE_URL=$BASE_URL request_id=$REQ_ID"
  local body
  body="$(batch_body "$REQ_ID" 2)"

  customer POST /api/enterprise/video-batch "$body"
  check_create_response
  local first_batch_id="$BATCH_ID"

  # Same request again: must be an idempotent replay of the same batch.
  customer POST /api/enterprise/video-batch "$body"
  if [[ "$(jb '.idempotent_replay // false')" != "true" ]]; then
    [[ "$(jb '.ok')" == "true" ]] || fail_response
    die "second request with request_id=$REQ_ID was not an idempotent replay (HTTP $HTTP_STATUS, batch_id=$(jb '.batch_id'))"
  fi
  check_create_response
  [[ "$BATCH_ID" == "$first_batch_id" ]] ||
    die "replay returned batch_id=$BATCH_ID, expected $first_batch_id"
  ok "Replay returned the same batch_id=$BATCH_ID"

  process_batch
  check_batch_completed
  check_credits
  ok "Flow passed for batch_id=$BATCH_ID"
}

# ---------------------------------------------------------------------------
# MODE=insufficient
# ---------------------------------------------------------------------------

mode_insufficient() {
  echo "== insufficient: BASE_URL=$BASE_URL request_id=$REQ_ID"
  customer POST /api/enterprise/video-batch "$(batch_body "$REQ_ID" 2)"
  local code
  code="$(jb '.error // empty')"
  if [[ "$HTTP_STATUS" == "402" && "$code" == "INSUFFICIENT_CREDITS" ]]; then
    ok "Got INSUFFICIENT_CREDITS (402) required=$(jb '.details.required_credits // "?"') available=$(jb '.details.available_credits // "?"')"
    exit 0
  fi
  if [[ -z "$code" ]]; then
    code="$(jb 'if .ok == true then "OK batch_id=\(.batch_id)" + (if .idempotent_replay == true then " (an idempotent replay: use a fresh REQ_ID)" else "" end) else empty end')"
  fi
  echo "❌ expected INSUFFICIENT_CREDITS (402), got ${code:-<no error code>} ($HTTP_STATUS)" >&2
  echo "   body: ${HTTP_BODY:-<empty>}" >&2
  exit 1
}

# ---------------------------------------------------------------------------
# MODE=ratelimit
# ---------------------------------------------------------------------------

mode_ratelimit() {
  echo "== ratelimit: BASE_URL=$BASE_URL burst=$BURST request_id prefix=$REQ_ID"
  local i accepted=0 other_admitted=0 code retry_after
  for ((i = 1; i <= BURST; i++)); do
    customer POST /api/enterprise/video-batch "$(batch_body "$REQ_ID-$i" 1)"
    case "$HTTP_STATUS" in
      201 | 200)
        accepted=$((accepted + 1))
        ;;
      429)
        code="$(jb '.error // empty')"
        retry_after="$(header Retry-After)"
        if [[ "$code" != "RATE_LIMIT_EXCEEDED" ]]; then
          echo "❌ expected RATE_LIMIT_EXCEEDED (429), got ${code:-<no error code>} ($HTTP_STATUS)" >&2
          echo "   body: ${HTTP_BODY:-<empty>}" >&2
          exit 1
        fi
        if [[ -z "$retry_after" ]]; then
          echo "❌ RATE_LIMIT_EXCEEDED (429) without a Retry-After header" >&2
          exit 1
        fi
        local extra=""
        ((other_admitted > 0)) && extra=" and $other_admitted admitted but refused later (e.g. 402)"
        ok "Got RATE_LIMIT_EXCEEDED (429) after $accepted accepted calls$extra (Retry-After=${retry_after}s)"
        local h v
        for h in RateLimit-Policy RateLimit X-RateLimit-Limit X-RateLimit-Remaining X-RateLimit-Reset; do
          v="$(header "$h")"
          [[ -n "$v" ]] && echo "   $h: $v"
        done
        exit 0
        ;;
      402 | 422)
        # Passed the rate limiter (it is checked before validation and credits)
        # but was refused afterwards, e.g. the key ran out of credits: the call
        # still used quota, so keep going.
        other_admitted=$((other_admitted + 1))
        ;;
      *)
        fail_response
        ;;
    esac
  done
  echo "❌ no RATE_LIMIT_EXCEEDED (429) after $BURST calls ($accepted accepted, $other_admitted refused otherwise)" >&2
  exit 1
}

case "$MODE" in
  flow) mode_flow ;;
  insufficient) mode_insufficient ;;
  ratelimit) mode_ratelimit ;;
  *) die "unknown MODE '$MODE' (expected flow, insufficient or ratelimit)" ;;
esac
