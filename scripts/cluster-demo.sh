#!/usr/bin/env bash
# Two `video-batch-api serve` nodes on one PostgreSQL database behind nginx, the way several
# nodes are deployed: nginx balances them and appends the client address to X-Forwarded-For;
# the nodes trust nginx's address (server.trusted_proxies) and nothing else.
#
#   scripts/cluster-demo.sh               start, print the addresses, stop on Ctrl-C
#   scripts/cluster-demo.sh start DIR     start in the background; DIR/cluster.env has the
#                                         addresses and process ids
#   scripts/cluster-demo.sh stop DIR      stop what `start DIR` started
#
# Environment: DATABASE_URL (default: a new database vb_cluster_<pid> on the local PostgreSQL),
# BIN (default: target/release/video-batch-api, built if missing), EXTRA_CONFIG (a TOML file
# layered on top, e.g. keys), NGINX (default: nginx on PATH or /usr/sbin/nginx).
# PostgreSQL is started when it is down; nginx comes from Debian's `nginx` package.
set -euo pipefail
cd "$(dirname "$0")/.."

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

stop_cluster() {
    local dir=$1
    [ -f "$dir/cluster.env" ] || return 0
    # shellcheck disable=SC1091
    . "$dir/cluster.env"
    kill "$NGINX_PID" "$NODE1_PID" "$NODE2_PID" 2>/dev/null || true
    for _ in $(seq 1 50); do
        kill -0 "$NODE1_PID" 2>/dev/null || kill -0 "$NODE2_PID" 2>/dev/null || kill -0 "$NGINX_PID" 2>/dev/null || break
        sleep 0.1
    done
}

start_cluster() {
    local dir=$1
    mkdir -p "$dir"
    local nginx=${NGINX:-$(command -v nginx || echo /usr/sbin/nginx)}
    if [ ! -x "$nginx" ]; then
        echo "nginx is not installed (apt-get install nginx)" >&2
        return 3
    fi
    if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
        echo "PostgreSQL is down: starting it" >&2
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
        for _ in $(seq 1 30); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 1; done
    fi
    local url=${DATABASE_URL:-}
    if [ -z "$url" ]; then
        local name="vb_cluster_$$"
        psql -h 127.0.0.1 -U postgres -d postgres -qc "CREATE DATABASE $name" >/dev/null
        url="postgres://postgres@127.0.0.1:5432/$name"
    fi
    local bin=${BIN:-target/release/video-batch-api}
    if [ ! -x "$bin" ]; then
        cargo build --release -q
    fi
    local p1 p2 o1 o2 pn
    p1=$(free_port); p2=$(free_port); o1=$(free_port); o2=$(free_port); pn=$(free_port)
    for n in 1 2; do
        local port ops
        if [ "$n" = 1 ]; then port=$p1; ops=$o1; else port=$p2; ops=$o2; fi
        cat > "$dir/node$n.toml" <<TOML
[server]
bind = "127.0.0.1:$port"
ops_bind = "127.0.0.1:$ops"
trusted_proxies = ["127.0.0.1/32"]   # nginx connects from here
shutdown_grace_seconds = 5

[database]
url = "$url"
TOML
    done
    local extra=()
    if [ -n "${EXTRA_CONFIG:-}" ]; then extra=(--config "$EXTRA_CONFIG"); fi
    # The first node migrates before the second starts (both would be safe: migrations take a lock).
    "$bin" --config "$dir/node1.toml" "${extra[@]}" serve >"$dir/node1.log" 2>&1 &
    local node1=$!
    for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:$p1/readyz" >/dev/null && break; sleep 0.1; done
    "$bin" --config "$dir/node2.toml" "${extra[@]}" serve >"$dir/node2.log" 2>&1 &
    local node2=$!
    for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:$p2/readyz" >/dev/null && break; sleep 0.1; done
    local user_line=""
    if [ "$(id -u)" = 0 ]; then user_line="user root;"; fi
    mkdir -p "$dir/nginx"
    cat > "$dir/nginx.conf" <<NGINX
$user_line
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/nginx-error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $dir/nginx/body;
    proxy_temp_path $dir/nginx/proxy;
    fastcgi_temp_path $dir/nginx/fastcgi;
    uwsgi_temp_path $dir/nginx/uwsgi;
    scgi_temp_path $dir/nginx/scgi;
    upstream video_batch_api {
        server 127.0.0.1:$p1 max_fails=1 fail_timeout=10s;
        server 127.0.0.1:$p2 max_fails=1 fail_timeout=10s;
        keepalive 32;
    }
    server {
        listen 127.0.0.1:$pn;
        client_max_body_size 2m;
        location / {
            proxy_pass http://video_batch_api;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
            # Appends the client's address to whatever the client sent: the nodes believe only
            # the right-most hop that is not nginx itself.
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_connect_timeout 2s;
        }
    }
}
NGINX
    "$nginx" -p "$dir/nginx" -c "$dir/nginx.conf" -e "$dir/nginx-error.log" -g 'daemon off;' >"$dir/nginx.out" 2>&1 &
    local ng=$!
    for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:$pn/healthz" >/dev/null && break; sleep 0.1; done
    cat > "$dir/cluster.env" <<ENV
CLUSTER_URL=http://127.0.0.1:$pn
NODE1_URL=http://127.0.0.1:$p1
NODE2_URL=http://127.0.0.1:$p2
NODE1_OPS_URL=http://127.0.0.1:$o1
NODE2_OPS_URL=http://127.0.0.1:$o2
NODE1_PID=$node1
NODE2_PID=$node2
NGINX_PID=$ng
DATABASE_URL=$url
ENV
    curl -fs "http://127.0.0.1:$pn/readyz" >/dev/null || {
        echo "the cluster did not come up; logs in $dir" >&2
        return 1
    }
}

case "${1:-}" in
    start) start_cluster "${2:?usage: $0 start DIR}" ;;
    stop) stop_cluster "${2:?usage: $0 stop DIR}" ;;
    "")
        dir=$(mktemp -d)
        trap 'stop_cluster "$dir"' EXIT INT TERM
        start_cluster "$dir"
        cat "$dir/cluster.env"
        echo "cluster up: ${dir}/cluster.env; logs in $dir; Ctrl-C stops it"
        wait
        ;;
    *) echo "usage: $0 [start DIR | stop DIR]" >&2; exit 2 ;;
esac
