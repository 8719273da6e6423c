#!/usr/bin/env bash
# scripts/bench.sh — throughput, latency and resource figures of the server, next to the
# ceilings of its two halves (HTTP layer, database statements), in one run.
#
#   scripts/bench.sh [--quick] [--out FILE] [--no-pg | --no-sqlite] [--no-build] [--report FILE]
#                    [--growth]
#
#   --quick     short windows and fewer levels: the whole run takes about 3 minutes once built
#   --out FILE  where the JSON report goes (default target/bench/bench-{quick,full}.json);
#               the table printed at the end is also written next to it as .md
#   --no-pg     SQLite only, even when PostgreSQL is reachable
#   --no-sqlite PostgreSQL only (L_http is still measured)
#   --no-build  use the binaries already in target/release
#   --report F  only print the table of an earlier JSON report F
#   --growth    only the cost-growth phase (10. below; a full run includes it)
#
# Environment: BENCH_PG_URL (default postgres://postgres@127.0.0.1:5432/postgres) is the
# maintenance database used to CREATE and DROP the fresh benchmark databases.
#
# What it does, per backend (SQLite on a fresh temp file; PostgreSQL on fresh databases when
# reachable), with the server pinned to CPU 0 and the load generator to CPU 1 (taskset):
#   1. starts the release server with a temp config (--config) that adds one key with
#      effectively unlimited rate limits and credits; local.toml underneath gives the worker
#      secret `local-worker-secret`;
#   2. worker phase: preloads items (100-item batches over HTTP), then CONC workers claim 10 and
#      complete each one over HTTP (examples/bench.rs `worker`) -> items/s;
#   3. create-batch peak: oha closed loop (-c C -z D) at several concurrency levels, POST
#      /api/enterprise/video-batch with 2 items. The body has no request_id, so the server
#      assigns a fresh one per request (DESIGN.md: no deduplication) and every call is a
#      distinct create that runs the idempotency lookup, as one with a new id would;
#   4. open loop (oha -q RATE --latency-correction) at 50% and 80% of that peak: p50/p99/p99.9;
#   5. the server's peak RSS (VmHWM) and CPU time (utime+stime) per request of each phase;
#   6. ceilings: L_http (examples/bench.rs `http-ceiling`: poem alone, same headers and JSON
#      body, measured like the create); L_db and L_claim (examples/bench.rs `db-ceiling`,
#      `claim-ceiling`: the service's own create / claim+complete functions, one commit per
#      call and no HTTP, on the same driver, pool size and durability, on a fresh migrated database, pinned like the
#      server; on SQLite writes go through a one-connection writer pool as in api::db). combined
#      = 1 / (1/L_http + 1/L_db). Ceilings are the best of their levels; so is each peak.
#   7. CPU efficiency: ceiling CPU per operation / server CPU per operation, a ratio that is far
#      less sensitive than throughput to other load on this 2-core machine.
#   8. stock ceilings (scripts/bench/): L_stock is the create's writes as one transaction per
#      create with a stock driver that is not our code - Python's sqlite3 at synchronous=NORMAL,
#      and pgbench -M prepared with 8 clients running the same transaction as a script; the
#      create is reported against 1/(1/L_http + 1/L_stock) (target >= 1.0: group commit beats
#      any design that commits once per request, though the server runs synchronous=FULL);
#      L_stock_claim is a claim of 10 and its 10 reports, one transaction each, the same way
#      (target: worker items/s >= 1.0 x L_stock_claim);
#   9. status polls: get_batch of one batch and /healthz of the same server, closed loop c=32.
#  10. cost growth (SQLite): the same calls on a store of ~0.23 M items and 10,000 usage rows and
#      on one of ~2.2 M items and 1,000,000 usage rows (scripts/bench/seed_growth.py: a year of
#      finished 100-item batches with a charge row per item, 30,000 queued items, a 50,000-item
#      batch, 20 batches of 1,000 and 20 of 2 items on two other keys): restart to healthy, idle
#      CPU, list, get of a 2-item, a 100-item and the 50,000-item batch, list of 20 batches of 1,000 and of
#      20 of 2 items, usage over 90 days, credits (closed loop c=16), create, claim (8 workers),
#      peak RSS; each rate on the large store / the same on the small one (target >= 0.8).
# On PostgreSQL it runs ANALYZE after each preload and warm-up (what autovacuum would have done;
# this machine's PostgreSQL has autovacuum off, and a young database otherwise keeps the plans
# it cached while empty). See docs/benchmarks.md for the method and the latest figures.
# Every process it starts is stopped on exit (trap), every wait is bounded by `timeout`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

QUICK=0 NO_PG=0 NO_SQLITE=0 NO_BUILD=0 OUT="" REPORT="" GROWTH_ONLY=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --no-pg) NO_PG=1 ;;
        --no-sqlite) NO_SQLITE=1 ;;
        --no-build) NO_BUILD=1 ;;
        --growth) GROWTH_ONLY=1 ;;
        --out) OUT="$2"; shift ;;
        --report) REPORT="$2"; shift ;;
        -h|--help) sed -n '2,58p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done

# ---- parameters ------------------------------------------------------------------------------
if [[ $QUICK == 1 ]]; then
    MODE=quick
    LEVELS=(8 32)        # closed-loop concurrency levels (create, L_http, L_db)
    DUR=3                # seconds per closed-loop level
    OPEN_DUR=4           # seconds per open-loop rate
    WLEVELS=(8 32)       # concurrent HTTP workers (and L_claim tasks)
    WDUR=3               # seconds per worker level
    PRELOAD=30000        # items queued before each worker level
else
    MODE=full
    LEVELS=(4 16 64)
    DUR=10
    OPEN_DUR=15
    WLEVELS=(2 8 32)
    WDUR=10
    PRELOAD=100000
fi
OPEN_CONC=64             # connections oha keeps for the open-loop runs
GROWTH_DUR=$(( QUICK == 1 ? 3 : 8 ))    # seconds per call measured in the growth phase
GROWTH_SMALL=130000      # finished history items of the small growth store (+ ~100,000 others)
GROWTH_LARGE=2130000     # the same on the large store
WH_N=$(( QUICK == 1 ? 5000 : 20000 ))   # webhook deliveries committed at once
WH_SECONDS=$(( QUICK == 1 ? 5 : 15 ))   # seconds of 200 events/s
MAX_CONN=16              # the server's pool size (config/base.toml); the raw loops use the same
OUT="${OUT:-target/bench/bench-$MODE.json}"
PG_URL="${BENCH_PG_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
CLK_TCK="$(getconf CLK_TCK)"
BIN="$ROOT/target/release/video-batch-api"
BENCH="$ROOT/target/release/examples/bench"

# Pin the server (and the in-process raw loops) to CPU 0 and the load generators to CPU 1.
if [[ "$(nproc)" -ge 2 ]] && command -v taskset >/dev/null; then
    SRV=(taskset -c 0) GEN=(taskset -c 1) PINNED="server CPU 0, load generator CPU 1"
else
    SRV=() GEN=() PINNED="not pinned"
fi

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# ---- the table -------------------------------------------------------------------------------
print_report() { # JSON_FILE: prints the header line and the Markdown table
    local table header
    jq -e '.backends | length > 0' "$1" >/dev/null || return 0
    table="$(jq -r '
  def r0: if . == null then "–" else (. | round | tostring) end;
  def r2: if . == null then "–" else ((. * 100 | round) / 100 | tostring) end;
  def r3: if . == null then "–" else ((. * 1000 | round) / 1000 | tostring) end;
  def ok(c): if c then "yes" else "**NO**" end;
  . as $root | .backends as $b | [ $b | keys_unsorted[] ] as $ks
  | def row($title; f): "| " + $title + " | " + ($ks | map(. as $k | $b[$k] | f) | join(" | ")) + " |";
    def lat: "\(.p50_ms | r2) / \(.p99_ms | r2) / \(.p999_ms | r2)";
  ( "| figure | " + ($ks | join(" | ")) + " |",
    "| --- |" + ($ks | map(" ---: |") | join("")),
    row("**create-batch peak**, req/s (best level)"; .create.peak | "\(.rps | r0) (c=\(.conc))"),
    ( range(0; $b[$ks[0]].create.levels | length) as $i
      | row("  closed loop c=\($b[$ks[0]].create.levels[$i].conc): req/s; p50 / p99 / p99.9 ms; errors";
            .create.levels[$i] | "\(.rps | r0); \(lat); \(.errors)") ),
    row("L_http (poem alone, same headers + JSON), req/s"; $root.l_http.peak | "\(.rps | r0) (c=\(.conc))"),
    row("L_db (the create writes of the service code, one commit each, no HTTP), /s"; .l_db.peak | "\(.ops_per_s | r0) (c=\(.conc))"),
    ( range(0; $b[$ks[0]].l_db.levels | length) as $i
      | row("  L_db c=\($b[$ks[0]].l_db.levels[$i].conc): /s; p50 / p99 / p99.9 ms"; .l_db.levels[$i] | "\(.ops_per_s | r0); \(lat)") ),
    row("combined ceiling 1/(1/L_http + 1/L_db), /s"; .combined_ceiling | r0),
    row("**create / combined ceiling** (target ≥ 0.70)"; .create_ratio | "\(r2) \(ok(. >= 0.7))"),
    row("L_stock (the create writes, 1 transaction per create, stock driver), /s"; .l_stock | "\(.ops_per_s | r0) (\(.driver))"),
    row("combined stock ceiling 1/(1/L_http + 1/L_stock), /s"; .combined_stock | r0),
    row("**create / combined stock ceiling** (target ≥ 1.0)"; .create_stock_ratio | "\(r2) \(ok(. >= 1.0))"),
    row("get_batch (status poll), req/s at c=32; p50 / p99 ms"; .get_batch | "\(.rps | r0); \(.p50_ms | r2) / \(.p99_ms | r2)"),
    row("/healthz of the same server, req/s at c=32"; .healthz.rps | r0),
    row("**get_batch / healthz** (target ≥ 0.25 SQLite, 0.15 PostgreSQL)"; .get_ratio | r2),
    ( range(0; $b[$ks[0]].open_loop | length) as $j
      | row("open loop at \($b[$ks[0]].open_loop[$j].pct_of_peak)% of peak: rate; p50 / p99 / p99.9 ms; errors";
            .open_loop[$j] | "\(.target_rps)/s; \(lat); \(.errors)") ),
    ( $ks | map(. as $k | $b[$k].open_loop[0] | ok(.p99_ms <= 10 and .errors == 0))
      | "| **p99 ≤ 10 ms at 50% of peak, 0 errors** | " + join(" | ") + " |" ),
    row("**worker claim(10) + complete**, items/s (best level)"; .worker.peak | "\(.units_per_s | r0) (c=\(.conc))"),
    ( range(0; $b[$ks[0]].worker.levels | length) as $i
      | row("  \($b[$ks[0]].worker.levels[$i].conc) workers: items/s; per-request p50 / p99 / p99.9 ms; errors";
            .worker.levels[$i] | "\(.units_per_s | r0); \(lat); \(.errors)") ),
    row("L_claim (claim + complete of the service code, one commit each, no HTTP), items/s"; .l_claim.peak | "\(.units_per_s | r0) (c=\(.conc))"),
    ( range(0; $b[$ks[0]].l_claim.levels | length) as $i
      | row("  L_claim c=\($b[$ks[0]].l_claim.levels[$i].conc): items/s"; .l_claim.levels[$i] | "\(.units_per_s | r0)") ),
    row("claim / L_claim"; .claim_ratio | r2),
    row("L_stock_claim (claim 10 + 10 reports, 1 transaction each, stock driver), items/s"; .l_stock_claim | "\(.units_per_s | r0) (\(.driver))"),
    row("**claim / L_stock_claim** (target ≥ 1.0)"; .claim_stock_ratio | "\(r2) \(ok(. >= 1.0))"),
    row("server CPU per create at peak level, ms"; .create.peak.cpu_ms_per_req | r3),
    row("  L_http CPU per request, ms"; $root.l_http.peak.cpu_ms_per_req | r3),
    row("server CPU per create at 50% of peak, ms"; .open_loop[0].cpu_ms_per_req | r3),
    row("  raw loop (L_db) CPU per create at its best level, ms"; .l_db.peak.cpu_ms_per_op | r3),
    row("server CPU per worker item (claim/10 + complete), ms"; .worker.peak.cpu_ms_per_item | r3),
    row("  raw loop (L_claim) CPU per item at its best level, ms"; .l_claim.peak.cpu_ms_per_unit | r3),
    row("CPU efficiency, create: (L_http + L_db CPU) / server CPU"; ((.l_db.peak.cpu_ms_per_op + $root.l_http.peak.cpu_ms_per_req) / .create.peak.cpu_ms_per_req) | r2),
    row("CPU efficiency, worker: L_claim CPU / server CPU per item"; (.l_claim.peak.cpu_ms_per_unit / .worker.peak.cpu_ms_per_item) | r2),
    row("**server peak RSS (VmHWM), MB** (target ≤ 150)"; .peak_rss_mb | "\(r0) \(ok(. <= 150))"),
    row("**webhook deliveries/s** to a local receiver (target ≥ 1000 SQLite, 500 PostgreSQL)"; .webhooks | "\(.deliveries_per_s | r0) (\(.delivered)/\(.n))"),
    row("webhook deliveries/s beside a dead endpoint (200 deliveries to a receiver that never answers; target: no measurable cost)"; .webhooks | "\(.tarpit_deliveries_per_s | r0) (\(.tarpit_deliveries_per_s / .deliveries_per_s | r2) × without)"),
    row("**webhook delay commit → receipt at 200/s**, p50 / p99 ms (target p99 ≤ 1000)"; .webhooks | "\(.delay_p50_ms | r2) / \(.delay_p99_ms | r2)"),
    row("**server peak RSS during the webhook run, with 100,000 deliveries pending**, MB (target ≤ 150)"; .webhooks | "\(.peak_rss_mb | r0) \(ok(.peak_rss_mb <= 150)) (\(.backlog_received) of \(.backlog) sent in \(.backlog_seconds) s)")
  )' "$1")"
    header="$(jq -r '"Mode \(.mode), \(.date), commit \(.commit); \(.machine.cores) × \(.machine.cpu), \(.machine.memory); \(.machine.pinning); closed loop \(.params.levels) × \(.params.seconds_per_level) s, open loop \(.params.open_loop_seconds) s, workers \(.params.worker_levels) × \(.params.worker_seconds) s; load average before \(.machine.loadavg_before // "?"), after (1/5/15 min) \(.machine.loadavg_after_1_5_15 // "?"); run took \(.run_seconds) s."' "$1")"
    printf '%s\n\n%s\n' "$header" "$table"
}

print_growth() { # JSON_FILE: the growth table, when the report has one
    jq -e '.growth != null' "$1" >/dev/null 2>&1 || return 0
    jq -r '
  def r0: if . == null then "–" else (. | round | tostring) end;
  def r2: if . == null then "–" else ((. * 100 | round) / 100 | tostring) end;
  def ok(c): if c then "yes" else "**NO**" end;
  .growth as $g
  | def rate($st; $n): [$st.calls[] | select(.name == $n)][0];
  ( "",
    "Cost growth (SQLite): small store \($g.small.seed.items) items, \($g.small.seed.usage) usage rows, \($g.small.seed.file_mib) MiB; large store \($g.large.seed.items) items, \($g.large.seed.usage) usage rows, \($g.large.seed.file_mib) MiB.",
    "",
    "| call | small store, req/s (p99 ms) | large store, req/s (p99 ms) | large / small (target ≥ 0.8) |",
    "| --- | ---: | ---: | ---: |",
    ( $g.large.calls[] | .name as $n | rate($g.small; $n) as $s
      | "| \($n) | \($s.rps | r0) (\($s.p99_ms | r2)) | \(.rps | r0) (\(.p99_ms | r2)) | \($g.ratios[$n] | r2) \(ok($g.ratios[$n] >= 0.8)) |" ),
    "| **list of 20 × 1,000-item batches / list of 20 × 2-item batches** (large store, target ≥ 0.8) | | | \($g.list_1000_vs_2 | r2) \(ok($g.list_1000_vs_2 >= 0.8)) |",
    "| **get of the 50,000-item batch / get of a 100-item batch** (both answer counts and a first page of 100 items; large store, target ≥ 0.8) | | | \($g.get_50000_vs_100 | r2) \(ok($g.get_50000_vs_100 >= 0.8)) |",
    "| get of the 50,000-item batch / get of a 2-item batch (a page of 100 items against one of 2) | | | \($g.get_50000_vs_2 | r2) |",
    "| restart to healthy, ms (target < 5000) | \($g.small.restart_ms) | \($g.large.restart_ms) \(ok($g.large.restart_ms < 5000)) | |",
    "| idle CPU, % of a core (target < 5) | \($g.small.idle_cpu_pct | r2) | \($g.large.idle_cpu_pct | r2) \(ok($g.large.idle_cpu_pct < 5)) | |",
    "| peak RSS, MB (target ≤ 150) | \($g.small.peak_rss_mb | r0) | \($g.large.peak_rss_mb | r0) \(ok($g.large.peak_rss_mb <= 150)) | |"
  )' "$1"
}

if [[ -n $REPORT ]]; then
    print_report "$REPORT"
    print_growth "$REPORT"
    exit 0
fi

# ---- tools -----------------------------------------------------------------------------------
if ! command -v oha >/dev/null; then
    log "oha not found: cargo install oha --locked (a few minutes, once)"
    cargo install oha --locked
    export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v jq >/dev/null; then
    log "jq not found: installing from apt"
    (apt-get update -qq && apt-get install -y -qq jq) >/dev/null
fi
if [[ $NO_BUILD == 0 ]]; then
    # Two commands on purpose: the example pulls dev-dependency features (poem "test"), and
    # building it with the binary would change the binary's feature set and force rebuilds.
    log "building release binaries"
    cargo build --release --quiet --bin video-batch-api
    cargo build --release --quiet --example bench
fi

# ---- process and resource bookkeeping --------------------------------------------------------
TMP="$(mktemp -d /tmp/vb-bench.XXXXXX)"
PIDS=()
PG_DBS=()
cleanup() {
    local pid db
    for pid in "${PIDS[@]}"; do
        stop_pid "$pid"
    done
    for db in "${PG_DBS[@]}"; do
        psql "$PG_URL" -qAtc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
    done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

stop_pid() { # PID: SIGTERM, wait up to 15 s, then SIGKILL; forgets it
    kill "$1" 2>/dev/null || true
    timeout 15 tail --pid="$1" -f /dev/null 2>/dev/null || kill -9 "$1" 2>/dev/null || true
    local keep=() p
    for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

free_port() {
    local p
    for p in $(shuf -i 20000-60000 -n 50); do
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return; fi
    done
    echo "no free port found" >&2; return 1
}

wait_http() { # URL: until it answers 200, at most 30 s
    local i
    for i in $(seq 1 300); do
        curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "timed out waiting for $1" >&2; return 1
}

cpu_ticks() { # PID -> utime+stime in clock ticks (fields 14 and 15 of /proc/PID/stat)
    sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'
}

peak_rss_mb() { awk '/^VmHWM:/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }

# pg_analyze URL: on PostgreSQL, fresh planner statistics (what autovacuum's autoanalyze would
# have done by then). Without them a young database keeps the plans it cached while empty
# (sqlx prepares every statement) and creates slow down as the tables grow; this machine's
# PostgreSQL runs with autovacuum off. No-op for SQLite.
pg_analyze() {
    [[ $1 == postgres* ]] || return 0
    psql "$1" -qAtc 'ANALYZE' >/dev/null
}

pg_fresh_db() { # NAME -> creates it (dropped on exit); its URL is left in PG_DB_URL
    psql "$PG_URL" -qAtc "CREATE DATABASE $1" >/dev/null
    PG_DBS+=("$1")
    PG_DB_URL="${PG_URL%/*}/$1"
}

# ---- oha -------------------------------------------------------------------------------------
KEY="vb_bench_$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
KEY_SHA="$(printf '%s' "$KEY" | sha256sum | cut -d' ' -f1)"
BODY='{"items":[{"prompt":"a red fox at dawn","params":{"duration_s":5}},{"prompt":"a city at night in the rain"}],"metadata":{"campaign":"bench"}}'

# oha_create URL OUTFILE ARGS... : one oha run of the create call, JSON report in OUTFILE.
oha_create() {
    local url="$1" out="$2"; shift 2
    timeout 300 "${GEN[@]}" oha --no-tui --output-format json -o "$out" \
        -m POST -H "x-api-key: $KEY" -T application/json -d "$BODY" "$@" \
        "$url/api/enterprise/video-batch" >/dev/null
}

# oha_summary FILE -> {"rps", "p50_ms", "p99_ms", "p999_ms", "requests", "errors"}; rps counts 2xx
# answers only; errors are non-2xx answers plus transport errors.
oha_summary() {
    jq -c '
      (.statusCodeDistribution // {}) as $s | (.errorDistribution // {}) as $e
      | ([$s | to_entries[] | select(.key | startswith("2")) | .value] | add // 0) as $ok
      | ([$s | to_entries[] | select(.key | startswith("2") | not) | .value] | add // 0) as $bad
      | ([$e[]] | add // 0) as $err
      | { rps: ($ok / .summary.total), requests: ($ok + $bad + $err), errors: ($bad + $err),
          p50_ms: ((.latencyPercentiles.p50 // 0) * 1000),
          p99_ms: ((.latencyPercentiles.p99 // 0) * 1000),
          p999_ms: ((.latencyPercentiles["p99.9"] // 0) * 1000),
          error_kinds: ($e + ($s | with_entries(select(.key | startswith("2") | not)))) }' "$1"
}

# closed_levels URL PID -> JSON array, one entry per level in LEVELS (with server CPU/request)
closed_levels() {
    local url="$1" pid="$2" c t0 t1 s out="[]"
    for c in "${LEVELS[@]}"; do
        t0="$(cpu_ticks "$pid")"
        oha_create "$url" "$TMP/oha.json" -c "$c" -z "${DUR}s" -w
        t1="$(cpu_ticks "$pid")"
        s="$(oha_summary "$TMP/oha.json")"
        s="$(jq -c --argjson c "$c" --argjson dt "$((t1 - t0))" --argjson hz "$CLK_TCK" \
            '. + {conc: $c, cpu_ms_per_req: (if .requests > 0 then $dt * 1000 / $hz / .requests else null end)}' <<<"$s")"
        log "  conc $c: $(jq -r '"\(.rps | floor) req/s, p50 \(.p50_ms*100|round/100) ms, p99 \(.p99_ms*100|round/100) ms, errors \(.errors)"' <<<"$s")"
        out="$(jq -c --argjson s "$s" '. + [$s]' <<<"$out")"
    done
    echo "$out"
}

peak_of() { jq -c 'max_by(.rps)' <<<"$1"; }

# ---- L_http: the HTTP layer alone (backend-independent, measured once) ------------------------
# Runs in the main shell (not in $(...)) so that the cleanup trap knows its process; sets L_HTTP.
measure_l_http() {
    local port pid levels
    port="$(free_port)"
    "${SRV[@]}" "$BENCH" http-ceiling --bind "127.0.0.1:$port" >"$TMP/http-ceiling.log" 2>&1 &
    pid=$!; PIDS+=("$pid")
    wait_http_post "http://127.0.0.1:$port"
    oha_create "http://127.0.0.1:$port" "$TMP/warm.json" -c 32 -z 1s -w # warm-up
    levels="$(closed_levels "http://127.0.0.1:$port" "$pid")"
    stop_pid "$pid"
    L_HTTP="$(jq -c '{levels: ., peak: (max_by(.rps))}' <<<"$levels")"
}

wait_http_post() { # BASE: until the create route answers (any status), at most 30 s
    local i
    for i in $(seq 1 300); do
        curl -sS -o /dev/null -X POST -H "x-api-key: $KEY" -H 'content-type: application/json' \
            -d "$BODY" "$1/api/enterprise/video-batch" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "timed out waiting for $1" >&2; return 1
}

# stock_pg_db SUFFIX -> "URL KEY_ID": a fresh PostgreSQL database migrated by the server, with
# one key named stock (its wallet is the caller's). The stock ceilings run in a subshell (their
# output is captured), where PG_DBS cannot reach the exit trap: they drop it themselves.
stock_pg_db() {
    local db url key
    db="vb_bench_$1_$(date +%s)_$$"
    psql "$PG_URL" -qAtc "CREATE DATABASE $db" >/dev/null
    url="${PG_URL%/*}/$db"
    APP__DATABASE__URL="$url" "$BIN" migrate >/dev/null 2>&1
    # The account owns the wallet, batches and windows: its id is what the scripts bind.
    key="$(psql "$url" -qAtc "INSERT INTO account (name, disabled, created_at, updated_at) \
        VALUES ('stock', false, now(), now()) RETURNING id" | head -n1)"
    psql "$url" -qAtc "INSERT INTO api_key (name, key_sha256, disabled, account_id, created_at, updated_at) \
        VALUES ('stock', repeat('0', 64), false, $key, now(), now())" >/dev/null
    echo "$url $key"
}

drop_pg_db() { # URL
    psql "$PG_URL" -qAtc "DROP DATABASE IF EXISTS ${1##*/}" >/dev/null 2>&1 || true
}

# stock_ceiling NAME URL -> {"ops_per_s", "driver"}: the create's writes (rate-limit upsert, batch
# row, 2 item rows, hold ledger row, usage row, conditional wallet update) as one transaction per
# create with a stock driver, on a fresh database migrated by the server: Python's sqlite3 (WAL,
# synchronous=NORMAL, one connection) or pgbench (-M prepared, 8 clients, synchronous_commit on).
stock_ceiling() {
    local name="$1" url="$2" file key
    if [[ $name == sqlite ]]; then
        file="$TMP/stock.db"
        APP__DATABASE__URL="sqlite://$file?mode=rwc" "$BIN" migrate >/dev/null 2>&1
        "${SRV[@]}" python3 "$ROOT/scripts/bench/stock_sqlite.py" "$file" "$DUR" \
            | jq -c '{ops_per_s, driver: "python sqlite3, WAL, synchronous=NORMAL"}'
    else
        read -r url key <<<"$(stock_pg_db stock)"
        psql "$url" -qAtc "INSERT INTO credit_wallet (api_key_id, balance, held, updated_at) \
            VALUES ($key, 1000000000000000, 0, now())" >/dev/null
        "${GEN[@]}" pgbench -n -M prepared -c 8 -j 1 -T "$DUR" -D "key=$key" \
            -f "$ROOT/scripts/bench/stock_create.pgbench" "$url" 2>/dev/null \
            | awk '/^tps/ {print $3}' | jq -Rc '{ops_per_s: tonumber, driver: "pgbench -M prepared -c 8"}'
        drop_pg_db "$url"
    fi
}

# stock_claim_ceiling NAME -> {"units_per_s", "driver"}: a worker's claim of 10 items and its 10
# success reports, one transaction each, with a stock driver on a fresh database migrated by the
# server and preloaded with $PRELOAD queued items: Python's sqlite3 (WAL, synchronous=NORMAL, one
# connection) or pgbench (-M prepared, 8 clients; one script run = 10 items).
stock_claim_ceiling() {
    local name="$1" file url key
    if [[ $name == sqlite ]]; then
        file="$TMP/stock-claim.db"
        APP__DATABASE__URL="sqlite://$file?mode=rwc" "$BIN" migrate >/dev/null 2>&1
        "${SRV[@]}" python3 "$ROOT/scripts/bench/stock_claim.py" "$file" "$WDUR" "$PRELOAD" \
            | jq -c '{units_per_s, driver: "python sqlite3, WAL, synchronous=NORMAL"}'
    else
        read -r url key <<<"$(stock_pg_db stock_claim)"
        psql "$url" -qAt >/dev/null <<SQL
INSERT INTO credit_wallet (api_key_id, balance, held, updated_at) VALUES ($key, 1000000000000000, $PRELOAD * 10, now());
INSERT INTO batch_job (id, api_key_id, request_id, fingerprint, status, total_count, succeeded_count,
  failed_count, cancelled_count, cost_per_video, required_credits, response, created_at, updated_at)
  SELECT md5('b' || b)::uuid, $key, 'req_' || b, repeat('f', 64), 'queued', 100, 0, 0, 0, 10, 1000, '{}', now(), now()
  FROM generate_series(0, ($PRELOAD - 1) / 100) b;
INSERT INTO batch_item (id, batch_id, api_key_id, idx, prompt, status, attempts, fair_pos, created_at, updated_at)
  SELECT gen_random_uuid(), md5('b' || (i / 100))::uuid, $key, i % 100, 'a red fox at dawn', 'queued', 0, i, now(), now()
  FROM generate_series(0, $PRELOAD - 1) i;
ANALYZE;
SQL
        "${GEN[@]}" pgbench -n -M prepared -c 8 -j 1 -T "$WDUR" -D "key=$key" \
            -f "$ROOT/scripts/bench/stock_claim.pgbench" "$url" 2>/dev/null \
            | awk '/^tps/ {print $3 * 10}' | jq -Rc '{units_per_s: tonumber, driver: "pgbench -M prepared -c 8"}'
        drop_pg_db "$url"
    fi
}

# ---- one backend: server run + raw ceilings --------------------------------------------------
# run_backend NAME SERVER_DB_URL LDB_URL LCLAIM_URL: adds .NAME to BACKENDS. Runs in the main
# shell (not in $(...)) so that the cleanup trap knows the server's process.
run_backend() {
    local name="$1" db_url="$2" ldb_url="$3" lclaim_url="$4"
    local port base cfg pid worker="[]" levels open="[]" w t0 t1 s peak rate pct rss conc_csv
    port="$(free_port)"; base="http://127.0.0.1:$port"; cfg="$TMP/bench-$name.toml"
    cat >"$cfg" <<EOF
# Written by scripts/bench.sh: one key with effectively unlimited quota and credits.
[server]
bind = "127.0.0.1:$port"
shutdown_grace_seconds = 5

[database]
max_connections = $MAX_CONN

[keys.bench]
key_sha256 = "$KEY_SHA"
initial_credits = 1_000_000_000_000_000
rate_limit_per_min = 1_000_000_000
read_rate_limit_per_min = 1_000_000_000
max_batch_items = 100
EOF
    log "$name: starting the server ($PINNED)"
    APP__DATABASE__URL="$db_url" "${SRV[@]}" "$BIN" --config "$cfg" serve >"$TMP/server-$name.log" 2>&1 &
    pid=$!; PIDS+=("$pid")
    wait_http "$base/readyz"

    # Worker phase first, on an empty queue, so that it claims only its own 100-item batches.
    for c in "${WLEVELS[@]}"; do
        timeout 300 "${GEN[@]}" "$BENCH" preload --base "$base" --key "$KEY" --items "$PRELOAD" --batch-items 100
        pg_analyze "$db_url"
        t0="$(cpu_ticks "$pid")"
        w="$(timeout 300 "${GEN[@]}" "$BENCH" worker --base "$base" --secret local-worker-secret \
            --conc "$c" --seconds "$WDUR")"
        t1="$(cpu_ticks "$pid")"
        # Server CPU over the worker process's whole run (warm-up included) / everything it did.
        w="$(jq -c --argjson dt "$((t1 - t0))" --argjson hz "$CLK_TCK" \
            '. + {cpu_ms_per_item: (if .all_units > 0 then $dt * 1000 / $hz / .all_units else null end),
                  cpu_ms_per_req: (if .all_ops > 0 then $dt * 1000 / $hz / .all_ops else null end)}' <<<"$w")"
        log "  workers $c: $(jq -r '"\(.units_per_s | floor) items/s, \(.errors) errors, ran dry: \(.ran_dry)"' <<<"$w")"
        worker="$(jq -c --argjson w "$w" '. + [$w]' <<<"$worker")"
    done

    log "$name: create-batch closed loop at concurrency ${LEVELS[*]}"
    oha_create "$base" "$TMP/warm.json" -c 32 -z 1s -w # warm-up (connections, caches)
    pg_analyze "$db_url"
    levels="$(closed_levels "$base" "$pid")"
    peak="$(peak_of "$levels")"

    for pct in 50 80; do
        rate="$(jq -r --argjson p "$pct" '.rps * $p / 100 | floor' <<<"$peak")"
        log "$name: open loop at $pct% of peak = $rate req/s"
        t0="$(cpu_ticks "$pid")"
        oha_create "$base" "$TMP/oha.json" -c "$OPEN_CONC" -q "$rate" -z "${OPEN_DUR}s" --latency-correction -w
        t1="$(cpu_ticks "$pid")"
        s="$(jq -c --argjson p "$pct" --argjson r "$rate" --argjson dt "$((t1 - t0))" --argjson hz "$CLK_TCK" \
            '. + {pct_of_peak: $p, target_rps: $r, cpu_ms_per_req: (if .requests > 0 then $dt * 1000 / $hz / .requests else null end)}' \
            <<<"$(oha_summary "$TMP/oha.json")")"
        log "  p50 $(jq -r '.p50_ms*100|round/100' <<<"$s") ms, p99 $(jq -r '.p99_ms*100|round/100' <<<"$s") ms, p99.9 $(jq -r '.p999_ms*100|round/100' <<<"$s") ms, errors $(jq -r .errors <<<"$s")"
        open="$(jq -c --argjson s "$s" '. + [$s]' <<<"$open")"
    done

    # Status polls: get_batch of one batch, next to /healthz of the same server (no database).
    local bid gets health
    bid="$(curl -fsS -X POST -H "x-api-key: $KEY" -H 'content-type: application/json' -d "$BODY" \
        "$base/api/enterprise/video-batch" | jq -r .batch_id)"
    log "$name: get_batch and /healthz closed loop at concurrency 32"
    timeout 300 "${GEN[@]}" oha --no-tui --output-format json -o "$TMP/get.json" -c 32 -z "${DUR}s" -w \
        -H "x-api-key: $KEY" "$base/api/enterprise/video-batch/$bid" >/dev/null
    gets="$(oha_summary "$TMP/get.json")"
    timeout 300 "${GEN[@]}" oha --no-tui --output-format json -o "$TMP/health.json" -c 32 -z "${DUR}s" -w \
        "$base/healthz" >/dev/null
    health="$(oha_summary "$TMP/health.json")"
    log "  get_batch $(jq -r '.rps|floor' <<<"$gets") req/s, healthz $(jq -r '.rps|floor' <<<"$health") req/s"

    rss="$(peak_rss_mb "$pid")"
    if grep -qE 'ERROR|WARN' "$TMP/server-$name.log"; then
        log "$name: the server logged warnings or errors:"; grep -E 'ERROR|WARN' "$TMP/server-$name.log" | head -5 >&2
    fi
    stop_pid "$pid"

    conc_csv="$(IFS=,; echo "${LEVELS[*]}")"
    log "$name: L_db (the service's create writes, one commit each) at concurrency $conc_csv"
    local ldb lclaim
    ldb="$(timeout 600 "${SRV[@]}" "$BENCH" db-ceiling --url "$ldb_url" --conc "$conc_csv" \
        --seconds "$DUR" --items 2 --max-connections "$MAX_CONN" --clk-tck "$CLK_TCK" | jq -sc .)"
    log "  $(jq -r 'map("conc \(.conc): \(.ops_per_s|floor)/s") | join(", ")' <<<"$ldb")"
    log "$name: L_stock (the create's writes, one transaction per create, stock driver)"
    local lstock
    lstock="$(stock_ceiling "$name" "$ldb_url")"
    log "  $(jq -r '"\(.ops_per_s|floor)/s (\(.driver))"' <<<"$lstock")"
    conc_csv="$(IFS=,; echo "${WLEVELS[*]}")"
    log "$name: L_claim (the service's claim+complete, one commit each) at concurrency $conc_csv"
    lclaim="$(timeout 600 "${SRV[@]}" "$BENCH" claim-ceiling --url "$lclaim_url" --conc "$conc_csv" \
        --seconds "$WDUR" --preload "$PRELOAD" --batch-items 100 --max-connections "$MAX_CONN" --clk-tck "$CLK_TCK" | jq -sc .)"
    log "  $(jq -r 'map("conc \(.conc): \(.units_per_s|floor) items/s") | join(", ")' <<<"$lclaim")"
    log "$name: L_stock_claim (claim 10 + 10 reports, one transaction each, stock driver)"
    local lstockclaim
    lstockclaim="$(stock_claim_ceiling "$name")"
    log "  $(jq -r '"\(.units_per_s|floor) items/s (\(.driver))"' <<<"$lstockclaim")"

    BACKENDS="$(jq -c --arg name "$name" --argjson v "$(jq -nc --argjson create "$levels" --argjson open "$open" --argjson worker "$worker" \
        --argjson ldb "$ldb" --argjson lclaim "$lclaim" --argjson rss "$rss" --argjson http "$L_HTTP" \
        --argjson stock "$lstock" --argjson stockclaim "$lstockclaim" --argjson gets "$gets" --argjson health "$health" '
        ($create | max_by(.rps)) as $peak | ($ldb | max_by(.ops_per_s)) as $db
        | ($worker | max_by(.units_per_s)) as $w | ($lclaim | max_by(.units_per_s)) as $lc
        | (1 / (1 / $http.peak.rps + 1 / $db.ops_per_s)) as $comb
        | (1 / (1 / $http.peak.rps + 1 / $stock.ops_per_s)) as $comb_stock
        | { create: {levels: $create, peak: $peak}, open_loop: $open,
            worker: {levels: $worker, peak: $w},
            l_db: {levels: $ldb, peak: $db}, l_claim: {levels: $lclaim, peak: $lc},
            combined_ceiling: $comb, create_ratio: ($peak.rps / $comb),
            claim_ratio: ($w.units_per_s / $lc.units_per_s), peak_rss_mb: $rss,
            l_stock: $stock, combined_stock: $comb_stock, create_stock_ratio: ($peak.rps / $comb_stock),
            l_stock_claim: $stockclaim, claim_stock_ratio: ($w.units_per_s / $stockclaim.units_per_s),
            get_batch: $gets, healthz: $health, get_ratio: ($gets.rps / $health.rps) }')" \
        '. + {($name): $v}' <<<"$BACKENDS")"
}

# webhook_phase NAME DB_URL: a server whose key targets a local receiver that answers at once;
# N deliveries committed at once (deliveries/s), then 200 events/s for a while (delay from
# commit to receipt). Adds .NAME.webhooks to BACKENDS.
webhook_phase() {
    local name="$1" db_url="$2" port rport cfg pid out rss
    port="$(free_port)"; rport="$(free_port)"; cfg="$TMP/webhooks-$name.toml"
    cat >"$cfg" <<EOF
[server]
bind = "127.0.0.1:$port"
ops_bind = "127.0.0.1:0"
shutdown_grace_seconds = 5

[webhooks]
allow_private_targets = true

[keys.bench]
key_sha256 = "$KEY_SHA"
webhook_url = "http://127.0.0.1:$rport/hook"
webhook_secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
EOF
    log "$name: webhook delivery ($WH_N at once, then 200/s for ${WH_SECONDS}s, then $WH_N beside a dead endpoint, then 100,000 pending for ${WH_SECONDS}s)"
    APP__DATABASE__URL="$db_url" "${SRV[@]}" "$BIN" --config "$cfg" serve >"$TMP/server-wh-$name.log" 2>&1 &
    pid=$!; PIDS+=("$pid")
    wait_http "http://127.0.0.1:$port/readyz" || { grep -v "^ *[0-9]*: \|^ *at " "$TMP/server-wh-$name.log" | tail -n 20 >&2; return 1; }
    out="$(timeout 600 "${GEN[@]}" "$BENCH" webhooks --url "$db_url" --key bench \
        --receiver "127.0.0.1:$rport" --n "$WH_N" --rate 200 --seconds "$WH_SECONDS" \
        --tarpit 200 --backlog 100000 --backlog-seconds "$WH_SECONDS")"
    rss="$(peak_rss_mb "$pid")"
    stop_pid "$pid"
    log "  $(jq -r '"\(.deliveries_per_s|floor) deliveries/s; at 200/s: p50 \(.delay_p50_ms) ms, p99 \(.delay_p99_ms) ms"' <<<"$out")"
    BACKENDS="$(jq -c --arg name "$name" --argjson w "$out" --argjson rss "$rss" \
        '.[$name].webhooks = ($w + {peak_rss_mb: $rss})' <<<"$BACKENDS")"
}

# ---- cost growth: the same calls on a small and a large store (SQLite) ------------------------
# oha_get NAME URL KEY -> one closed-loop GET (c=16, GROWTH_DUR s) summary with .name
oha_get() {
    timeout 300 "${GEN[@]}" oha --no-tui --output-format json -o "$TMP/g.json" -c 16 -z "${GROWTH_DUR}s" -w \
        -H "x-api-key: $3" "$2" >/dev/null
    jq -c --arg n "$1" '. + {name: $n}' <<<"$(oha_summary "$TMP/g.json")"
}

# growth_store LABEL HISTORY_ITEMS USAGE_ROWS -> JSON of one store's figures
growth_store() {
    local label="$1" history="$2" usage="$3" db port base cfg pid seed t0 t1 restart_ms idle
    local k1 k2 k3 small hundred huge calls="[]" c from to w create rss api
    db="$TMP/growth-$label.db"; port="$(free_port)"; base="http://127.0.0.1:$port"; cfg="$TMP/growth.toml"
    k1="vb_growth_bench_$label" k2="vb_growth_wide_$label" k3="vb_growth_narrow_$label"
    cat >"$cfg" <<EOF
[server]
bind = "127.0.0.1:$port"
ops_bind = "127.0.0.1:0"
shutdown_grace_seconds = 5

[database]
max_connections = $MAX_CONN

[keys.bench]
key_sha256 = "$(printf '%s' "$k1" | sha256sum | cut -d' ' -f1)"
rate_limit_per_min = 1_000_000_000
read_rate_limit_per_min = 1_000_000_000
max_batch_items = 100

[keys.wide]
key_sha256 = "$(printf '%s' "$k2" | sha256sum | cut -d' ' -f1)"
read_rate_limit_per_min = 1_000_000_000

[keys.narrow]
key_sha256 = "$(printf '%s' "$k3" | sha256sum | cut -d' ' -f1)"
read_rate_limit_per_min = 1_000_000_000
EOF
    # The server makes the schema and the keys; the seeder writes the history under them.
    APP__DATABASE__URL="sqlite://$db?mode=rwc" "${SRV[@]}" "$BIN" --config "$cfg" serve >"$TMP/growth-$label.log" 2>&1 &
    pid=$!; PIDS+=("$pid"); wait_http "$base/readyz"; stop_pid "$pid"
    log "growth $label: seeding $history history items and $usage usage rows"
    seed="$(python3 "$ROOT/scripts/bench/seed_growth.py" "$db" "$history" "$usage" 30000)"
    log "  $(jq -r '"\(.items) items in \(.batches) batches, \(.ledger) ledger rows, \(.usage) usage rows, \(.file_mib) MiB, in \(.seconds) s"' <<<"$seed")"
    sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
    t0="$(date +%s%N)"
    APP__DATABASE__URL="sqlite://$db?mode=rwc" "${SRV[@]}" "$BIN" --config "$cfg" serve >>"$TMP/growth-$label.log" 2>&1 &
    pid=$!; PIDS+=("$pid"); wait_http "$base/readyz"
    restart_ms=$(( ($(date +%s%N) - t0) / 1000000 ))
    sleep 2
    t0="$(cpu_ticks "$pid")"; sleep 10; t1="$(cpu_ticks "$pid")"
    idle="$(jq -n --argjson dt "$((t1 - t0))" --argjson hz "$CLK_TCK" '$dt / $hz / 10 * 100')"
    log "  restart to healthy $restart_ms ms; idle CPU $(jq -r '.*100|round/100' <<<"$idle") % of a core"
    api="$base/api/enterprise"
    small="$(curl -fsS -H "x-api-key: $k3" "$api/video-batch?limit=1" | jq -r '.data[0].batch_id')"
    hundred="$(curl -fsS -H "x-api-key: $k1" "$api/video-batch?limit=1" | jq -r '.data[0].batch_id')"
    huge="$(curl -fsS -H "x-api-key: $k2" "$api/video-batch?limit=25" | jq -r '[.data[] | select(.counts.total == 50000)][0].batch_id')"
    from="$(date -u -d '89 days ago' +%Y-%m-%d)"; to="$(date -u +%Y-%m-%d)"
    for c in "list|$api/video-batch?limit=20|$k1" "get_2|$api/video-batch/$small|$k3" "get_100|$api/video-batch/$hundred|$k1" \
             "get_50000|$api/video-batch/$huge|$k2" "list_20x1000|$api/video-batch?limit=20|$k2" \
             "list_20x2|$api/video-batch?limit=20|$k3" "usage_90d|$api/usage?from=$from&to=$to|$k1" \
             "credits|$api/credits|$k1"; do
        IFS='|' read -r n u k <<<"$c"
        calls="$(jq -c --argjson r "$(oha_get "$n" "$u" "$k")" '. + [$r]' <<<"$calls")"
    done
    timeout 300 "${GEN[@]}" oha --no-tui --output-format json -o "$TMP/g.json" -c 16 -z "${GROWTH_DUR}s" -w \
        -m POST -H "x-api-key: $k1" -H 'content-type: application/json' -d "$BODY" "$api/video-batch" >/dev/null
    create="$(jq -c '. + {name: "create"}' <<<"$(oha_summary "$TMP/g.json")")"
    w="$(timeout 300 "${GEN[@]}" "$BENCH" worker --base "$base" --secret local-worker-secret --conc 8 --seconds "$GROWTH_DUR")"
    calls="$(jq -c --argjson c "$create" --argjson w "$w" '. + [$c, {name: "claim", rps: $w.units_per_s, errors: $w.errors}]' <<<"$calls")"
    rss="$(peak_rss_mb "$pid")"
    log "  $(jq -r 'map("\(.name) \(.rps | floor)/s") | join(", ")' <<<"$calls"); peak RSS $rss MB"
    stop_pid "$pid"
    jq -nc --argjson seed "$seed" --argjson calls "$calls" --argjson restart "$restart_ms" \
        --argjson idle "$idle" --argjson rss "$rss" \
        '{seed: $seed, calls: $calls, restart_ms: $restart, idle_cpu_pct: $idle, peak_rss_mb: $rss}'
}

# growth_phase -> sets GROWTH (JSON): both stores and the ratios large / small per call
growth_phase() {
    local small large
    small="$(growth_store small "$GROWTH_SMALL" 10000)"
    large="$(growth_store large "$GROWTH_LARGE" 1000000)"
    GROWTH="$(jq -nc --argjson s "$small" --argjson l "$large" '
        {small: $s, large: $l,
         ratios: ([$l.calls[] | . as $c | {key: .name,
                   value: ($c.rps / ([$s.calls[] | select(.name == $c.name)][0].rps))}] | from_entries),
         list_1000_vs_2: ([$l.calls[] | select(.name == "list_20x1000")][0].rps
                          / [$l.calls[] | select(.name == "list_20x2")][0].rps),
         get_50000_vs_2: ([$l.calls[] | select(.name == "get_50000")][0].rps
                          / [$l.calls[] | select(.name == "get_2")][0].rps),
         get_50000_vs_100: ([$l.calls[] | select(.name == "get_50000")][0].rps
                            / [$l.calls[] | select(.name == "get_100")][0].rps)}')"
}


# ---- the run ---------------------------------------------------------------------------------
START=$(date +%s)
# The code measured: HEAD when the binaries were built (+dirty when api/ or src/ had changes).
COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- api src entity migration 2>/dev/null || echo '+dirty')"
[[ $NO_BUILD == 0 ]] || COMMIT="$COMMIT (--no-build: binaries may be older)"
LOAD_BEFORE="$(cut -d' ' -f1 /proc/loadavg)"
if awk -v l="$LOAD_BEFORE" 'BEGIN { exit !(l > 0.5) }'; then
    log "warning: load average is $LOAD_BEFORE before the run: other work on this machine skews the figures"
fi
log "mode $MODE; levels ${LEVELS[*]} x ${DUR}s; open loop ${OPEN_DUR}s; workers ${WLEVELS[*]} x ${WDUR}s"
L_HTTP="" BACKENDS="{}"
if [[ $GROWTH_ONLY == 0 ]]; then
    log "L_http: trivial poem endpoint"
    measure_l_http
fi

GROWTH="null"
if [[ $GROWTH_ONLY == 1 ]]; then
    NO_SQLITE=1 NO_PG=1
    L_HTTP="null"
fi
if [[ $NO_SQLITE == 0 ]]; then
    run_backend sqlite "sqlite://$TMP/server.db?mode=rwc" \
        "sqlite://$TMP/l_db.db?mode=rwc" "sqlite://$TMP/l_claim.db?mode=rwc"
    webhook_phase sqlite "sqlite://$TMP/webhooks.db?mode=rwc"
fi

if [[ $NO_PG == 0 ]] && psql "$PG_URL" -qAtc 'SELECT 1' >/dev/null 2>&1; then
    SUFFIX="$(date +%s)_$$"
    pg_fresh_db "vb_bench_srv_$SUFFIX"; PG_SRV="$PG_DB_URL"
    pg_fresh_db "vb_bench_ldb_$SUFFIX"; PG_LDB="$PG_DB_URL"
    pg_fresh_db "vb_bench_lclaim_$SUFFIX"; PG_LCLAIM="$PG_DB_URL"
    run_backend postgres "$PG_SRV" "$PG_LDB" "$PG_LCLAIM"
    pg_fresh_db "vb_bench_wh_$SUFFIX"
    webhook_phase postgres "$PG_DB_URL"
else
    log "PostgreSQL: skipped (--no-pg, or $PG_URL not reachable)"
fi

if [[ $GROWTH_ONLY == 1 || ( $QUICK == 0 && $NO_SQLITE == 0 ) ]]; then
    growth_phase
fi

mkdir -p "$(dirname "$OUT")"
jq -n --argjson http "${L_HTTP:-null}" --argjson b "$BACKENDS" --argjson growth "$GROWTH" \
    --arg mode "$MODE" --arg date "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    --arg commit "$COMMIT" \
    --arg cpu "$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)" \
    --arg cores "$(nproc)" --arg mem "$(awk '/^MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)" \
    --arg pinned "$PINNED" --arg levels "${LEVELS[*]}" --arg wlevels "${WLEVELS[*]}" \
    --arg load "$LOAD_BEFORE" --arg load_after "$(cut -d' ' -f1-3 /proc/loadavg)" \
    --argjson dur "$DUR" --argjson odur "$OPEN_DUR" --argjson wdur "$WDUR" --argjson seconds "$(( $(date +%s) - START ))" \
    '{mode: $mode, date: $date, commit: $commit,
      machine: {cpu: $cpu, cores: ($cores|tonumber), memory: $mem, pinning: $pinned,
                loadavg_before: $load, loadavg_after_1_5_15: $load_after},
      params: {levels: $levels, seconds_per_level: $dur, open_loop_seconds: $odur,
               worker_levels: $wlevels, worker_seconds: $wdur},
      l_http: $http, backends: $b, growth: $growth, run_seconds: $seconds}' >"$OUT"

{ print_report "$OUT"; print_growth "$OUT"; } | tee "${OUT%.json}.md"
log "JSON report: $OUT; table: ${OUT%.json}.md"
