#!/usr/bin/env bash
# Starts `video-batch-api serve` (release) on a temporary SQLite database with the local config
# and runs scripts/test-batch-flow.sh in its three modes: flow (with replay), 402 and 429.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -q
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$work/ci.toml" <<TOML
[server]
bind = "127.0.0.1:$port"

[database]
url = "sqlite://$work/ci.db?mode=rwc"

[keys.poor]
key_sha256 = "$(printf '%s' vb_ci_poor_key | sha256sum | cut -d' ' -f1)"
initial_credits = 5

[keys.burst]
key_sha256 = "$(printf '%s' vb_ci_burst_key | sha256sum | cut -d' ' -f1)"
initial_credits = 100000
rate_limit_per_min = 5
TOML
./target/release/video-batch-api --config "$work/ci.toml" serve >"$work/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; wait $server 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 1 50); do
    curl -fs "http://127.0.0.1:$port/readyz" >/dev/null && break
    sleep 0.2
done

export BASE_URL="http://127.0.0.1:$port" INTERNAL_WORKER_SECRET=local-worker-secret
ENTERPRISE_API_KEY=vb_demo_local_only_not_for_production COST_PER_VIDEO_EXPECT=10 REQ_ID="ci-$$" \
    bash scripts/test-batch-flow.sh
# Running it again with the same REQ_ID exercises the replay path.
ENTERPRISE_API_KEY=vb_demo_local_only_not_for_production COST_PER_VIDEO_EXPECT=10 REQ_ID="ci-$$" \
    bash scripts/test-batch-flow.sh
MODE=insufficient ENTERPRISE_API_KEY=vb_ci_poor_key REQ_ID="ci-poor-$$" bash scripts/test-batch-flow.sh
MODE=ratelimit ENTERPRISE_API_KEY=vb_ci_burst_key REQ_ID="ci-burst-$$" BURST=20 bash scripts/test-batch-flow.sh
if grep -E 'vb_demo_local_only|vb_ci_(poor|burst)_key|local-worker-secret' "$work/server.log"; then
    echo "a secret reached the server log"; exit 1
fi
echo "flow script passed in all modes"
