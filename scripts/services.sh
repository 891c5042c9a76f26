# Test services, sourced by scripts/test: Redis and a MongoDB-compatible
# server on loopback. A service already reachable at REDIS_URL / MONGODB_URI
# is used as it is; otherwise it is installed if missing, started on a
# scratch directory, and stopped when the calling script exits.
#
# Exports REDIS_URL, MONGODB_URI, and the server commands the outage tests
# start their own private instances with: REDIS_SERVER_BIN, MONGO_SERVER_BIN;
# and MOSQUITTO_BIN, the remote broker of the bridge tests (each test starts
# its own on a free port; Debian's package is installed if missing).

SERVICES_DIR="$(mktemp -d "${TMPDIR:-/tmp}/broker-test-services.XXXXXX")"
STARTED_PIDS=()

stop_services() {
    for pid in "${STARTED_PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${STARTED_PIDS[@]}"; do
        # The MongoDB-compatible server takes a few seconds to stop cleanly.
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    done
    rm -rf "$SERVICES_DIR"
}
trap stop_services EXIT

# The end of each started server's log, for a failed run: a server that
# wedged or ran out of disk shows why there.
show_service_logs() {
    for log in "$SERVICES_DIR"/*.log; do
        [ -f "$log" ] || continue
        echo "--- last lines of $(basename "$log") (started by scripts/services.sh) ---" >&2
        tail -n 40 "$log" >&2
    done
    df -h "$SERVICES_DIR" >&2 || true
}

reachable() { # host port
    timeout 1 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null
}

wait_reachable() { # name host port log
    for _ in $(seq 1 100); do
        reachable "$2" "$3" && return 0
        sleep 0.1
    done
    echo "error: $1 did not start on $2:$3; its log:" >&2
    cat "$4" >&2 || true
    exit 1
}

# host and port of a redis:// or mongodb:// URL
url_host() { echo "$1" | sed -E 's#^[a-z]+://([^@/]*@)?([^:/?]+).*#\2#'; }
url_port() { echo "$1" | sed -E 's#^[a-z]+://([^@/]*@)?[^:/?]+:?([0-9]*).*#\2#'; }

apt_install() { # package
    if ! command -v apt-get >/dev/null; then
        echo "error: $1 is missing and apt-get is not available; install it" >&2
        exit 1
    fi
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "installing $1 from Debian's packages" >&2
    $sudo apt-get install -y -q "$1" >/dev/null 2>&1 ||
        { $sudo apt-get update -q >/dev/null 2>&1 && $sudo apt-get install -y -q "$1" >/dev/null; }
}

start_redis() {
    export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/}"
    command -v redis-server >/dev/null || apt_install redis-server
    export REDIS_SERVER_BIN="${REDIS_SERVER_BIN:-$(command -v redis-server)}"
    local host port
    host="$(url_host "$REDIS_URL")"
    port="$(url_port "$REDIS_URL")"
    port="${port:-6379}"
    if reachable "$host" "$port"; then
        echo "using Redis at $REDIS_URL" >&2
        return
    fi
    mkdir -p "$SERVICES_DIR/redis"
    "$REDIS_SERVER_BIN" --port "$port" --bind 127.0.0.1 --appendonly yes \
        --dir "$SERVICES_DIR/redis" --save '' >"$SERVICES_DIR/redis.log" 2>&1 &
    STARTED_PIDS+=("$!")
    wait_reachable redis-server 127.0.0.1 "$port" "$SERVICES_DIR/redis.log"
    echo "started redis-server on 127.0.0.1:$port (appendonly yes)" >&2
}

start_mongo() {
    export MONGODB_URI="${MONGODB_URI:-mongodb://127.0.0.1:27017/?directConnection=true}"
    local venv=".venv-mongo"
    if [ -z "${MONGO_SERVER_BIN:-}" ]; then
        if [ ! -x "$venv/bin/secantusd-py" ]; then
            echo "installing the MongoDB-compatible test server (SecantusDB, see shared/MONGODB.md)" >&2
            python3 -m venv "$venv" >/dev/null 2>&1 || { apt_install python3-venv && python3 -m venv "$venv"; }
            "$venv/bin/pip" install -q 'SecantusDB==0.7.0b3' >/dev/null
        fi
        MONGO_SERVER_BIN="$PWD/$venv/bin/secantusd-py"
    fi
    export MONGO_SERVER_BIN
    local host port
    host="$(url_host "$MONGODB_URI")"
    port="$(url_port "$MONGODB_URI")"
    port="${port:-27017}"
    if reachable "$host" "$port"; then
        echo "using MongoDB at $MONGODB_URI" >&2
        return
    fi
    mkdir -p "$SERVICES_DIR/mongo"
    "$MONGO_SERVER_BIN" --host 127.0.0.1 --port "$port" \
        --storage-path "$SERVICES_DIR/mongo" >"$SERVICES_DIR/mongo.log" 2>&1 &
    STARTED_PIDS+=("$!")
    wait_reachable "the MongoDB-compatible server" 127.0.0.1 "$port" "$SERVICES_DIR/mongo.log"
    echo "started the MongoDB-compatible server on 127.0.0.1:$port" >&2
}

find_mosquitto() {
    if [ -n "${MOSQUITTO_BIN:-}" ] && [ -x "$MOSQUITTO_BIN" ]; then return; fi
    local bin
    bin="$(command -v mosquitto || true)"
    [ -n "$bin" ] || { [ -x /usr/sbin/mosquitto ] && bin=/usr/sbin/mosquitto; }
    if [ -z "$bin" ]; then
        apt_install mosquitto
        bin="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
    fi
    [ -x "$bin" ] || { echo "error: mosquitto is missing: apt-get install mosquitto" >&2; exit 1; }
    export MOSQUITTO_BIN="$bin"
}

start_redis
start_mongo
find_mosquitto
