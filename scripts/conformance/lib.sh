# shellcheck shell=bash disable=SC2034 # the variables set here are used by the scripts that source it
# Shared helpers of the conformance scripts; sourced, never run.
#
#   conf_venv            creates/updates the Python venv with the pinned tools (requirements.txt)
#   conf_build           `cargo build --release` unless CONFORMANCE_SKIP_BUILD=1
#   conf_start_server    starts the release server on a free port, a temporary SQLite database and
#                        a temporary config (keys from $CONF_EXTRA_TOML appended); sets BASE_URL,
#                        CONF_WORK, CONF_SERVER_PID, and stops the server on exit
#   conf_sha256 TEXT     SHA-256 hex of TEXT (what `key_sha256` holds)
#
# Paths: the repository is $ROOT; the venv is $ROOT/.venv-conformance (override: CONFORMANCE_VENV).

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CONF_DIR="$ROOT/scripts/conformance"
VENV="${CONFORMANCE_VENV:-$ROOT/.venv-conformance}"

# Secrets of config/local.toml (public, local only).
WORKER_SECRET="local-worker-secret"
ADMIN_TOKEN="local-admin-token"

conf_log() { printf '==> %s\n' "$*" >&2; }

conf_sha256() { printf '%s' "$1" | sha256sum | cut -d' ' -f1; }

conf_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        conf_log "creating venv $VENV"
        python3 -m venv "$VENV"
    fi
    # Quiet, and a no-op when the pinned versions are already installed.
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$CONF_DIR/requirements.txt"
}

conf_build() {
    if [ "${CONFORMANCE_SKIP_BUILD:-0}" != 1 ]; then
        conf_log "cargo build --release"
        (cd "$ROOT" && cargo build --release -q)
    fi
    [ -x "$ROOT/target/release/video-batch-api" ] || { echo "no release binary" >&2; exit 1; }
}

conf_free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

conf_stop_server() {
    if [ -n "${CONF_SERVER_PID:-}" ] && kill -0 "$CONF_SERVER_PID" 2>/dev/null; then
        kill "$CONF_SERVER_PID" 2>/dev/null || true
        # Graceful shutdown drains in-flight calls; do not wait for ever.
        for _ in $(seq 1 50); do kill -0 "$CONF_SERVER_PID" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$CONF_SERVER_PID" 2>/dev/null || true
        wait "$CONF_SERVER_PID" 2>/dev/null || true
    fi
    CONF_SERVER_PID=
    if [ -n "${CONF_WORK:-}" ] && [ "${CONFORMANCE_KEEP:-0}" != 1 ]; then
        rm -rf "$CONF_WORK"
    fi
}

conf_start_server() {
    CONF_WORK="$(mktemp -d /tmp/conformance.XXXXXX)"
    local port
    port="$(conf_free_port)"
    {
        # Every call comes from 127.0.0.1, most of the fuzzer's without a valid key: give that one
        # address room, or the stranger budget answers 429 where the documents expect 401.
        printf '[server]\nbind = "127.0.0.1:%s"\nops_bind = "127.0.0.1:0"\nunauthenticated_per_min = 1000000\n\n' "$port"
        printf '[database]\nurl = "sqlite://%s/db.sqlite?mode=rwc"\n\n' "$CONF_WORK"
        printf '%s\n' "${CONF_EXTRA_TOML:-}"
    } >"$CONF_WORK/conformance.toml"
    trap conf_stop_server EXIT
    conf_log "starting server on 127.0.0.1:$port (work dir $CONF_WORK)"
    # config/ is found relative to the working directory.
    (cd "$ROOT" && exec ./target/release/video-batch-api --config "$CONF_WORK/conformance.toml" serve) \
        >"$CONF_WORK/server.log" 2>&1 &
    CONF_SERVER_PID=$!
    BASE_URL="http://127.0.0.1:$port"
    for _ in $(seq 1 100); do
        if curl -fs "$BASE_URL/readyz" >/dev/null 2>&1; then
            return 0
        fi
        if ! kill -0 "$CONF_SERVER_PID" 2>/dev/null; then break; fi
        sleep 0.1
    done
    echo "server did not become ready; its log:" >&2
    tail -n 50 "$CONF_WORK/server.log" >&2
    exit 1
}
