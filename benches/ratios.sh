#!/usr/bin/env bash
# Measures the two ratios the server's targets are stated in, with the
# release binaries, each run against a fresh server and state folder (a
# cold cache), on this machine's cores:
#
#   benches/ratios.sh through-server TREE [ROUNDS]
#       `scanserver scan TREE` (local) against `lightagent scan TREE`
#       through a server: the local time over the time through the server
#       (target: at least 0.85).
#   benches/ratios.sh storm TREE [ROUNDS]
#       `lightagent bench --agents 1` against `--agents 50` on TREE: the
#       storm's time over one agent's (target: at most 1.5), with the
#       scans the engine ran (one per unique content) and the errors.
#
# Settings from the environment: RULES (the signatures, `signatures/` by
# default), PORT (the server's agent port, 17405; the admin port is the
# next one). The servers' and the benches' logs go to the run's scratch
# folder, which is removed on exit unless KEEP is set (or a step failed).
# Needs bash 5 or later (EPOCHREALTIME) and cargo.
set -euo pipefail
((BASH_VERSINFO[0] >= 5)) || { echo "$0 needs bash 5 or later" >&2; exit 2; }

usage() {
    echo "usage: $0 through-server|storm TREE [ROUNDS]" >&2
    exit 2
}
[[ $# -ge 2 ]] || usage
what=$1 tree=$2 rounds=${3:-5}
[[ $what == through-server || $what == storm ]] || usage
[[ $rounds =~ ^[1-9][0-9]*$ ]] || usage
# The servers run with the settings given here, whatever the caller's
# environment says.
unset "${!SCANSERVER_@}"
root=$(cd "$(dirname "$0")/.." && pwd)
rules=${RULES:-$root/signatures}
port=${PORT:-17405}
bin=$root/target/release
cargo build --release --bins --manifest-path "$root/Cargo.toml" >&2

scratch=$(mktemp -d)
server=
cleanup() {
    [[ -n $server ]] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
    [[ -n ${KEEP:-} ]] && echo "kept $scratch" >&2 || rm -rf "$scratch"
}
trap cleanup EXIT

# The signatures compiled, and the tree read, once before any round: no
# round pays for either.
"$bin/scanserver" scan --rules "$rules" --rules-cache "$scratch/rules" "$tree" >/dev/null || true

now() { echo "$EPOCHREALTIME"; }

# Arithmetic on decimals, printed with `format`.
calc() { awk "BEGIN { printf \"$1\", $2 }"; }

# Runs a command whose exit status must say it scanned every file (0:
# nothing found, 1: something found).
scanned() {
    local status=0
    "$@" >/dev/null || status=$?
    if ((status > 1)); then
        echo "$1 failed (exit status $status): the round does not count" >&2
        exit 1
    fi
}

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; }

# Starts a server on a fresh state folder, and waits until it listens.
serve() {
    if listening; then
        echo "something listens on port $port already: set PORT to a free one" >&2
        exit 1
    fi
    rm -rf "$scratch/state"
    "$bin/scanserver" serve --rules "$rules" --rules-cache "$scratch/rules" \
        --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$((port + 1))" \
        --state-dir "$scratch/state" >>"$scratch/serve.log" 2>&1 &
    server=$!
    for _ in $(seq 200); do
        listening && return
        kill -0 "$server" 2>/dev/null || break
        sleep 0.05
    done
    echo "the server did not start: see $scratch/serve.log" >&2
    KEEP=1
    exit 1
}

stop() {
    kill "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
    server=
}

# One `lightagent bench` round of $1 agents against a fresh server; its
# JSON summary goes to the file $2.
storm() {
    serve
    "$bin/lightagent" bench --server "http://127.0.0.1:$port" --agents "$1" \
        --files "$tree" --json 2>>"$scratch/bench.log" | tail -1 >"$2"
    stop
    if [[ ! -s $2 ]]; then
        echo "lightagent bench --agents $1 gave no summary: see $scratch/bench.log" >&2
        KEEP=1
        exit 1
    fi
}

field() { grep -o "\"$1\":[0-9.]*" <<<"$2" | cut -d: -f2; }

for round in $(seq "$rounds"); do
    case $what in
    through-server)
        start=$(now)
        scanned "$bin/scanserver" scan --rules "$rules" --rules-cache "$scratch/rules" "$tree"
        local_time=$(calc %.3f "$(now) - $start")
        serve
        start=$(now)
        scanned "$bin/lightagent" scan --server "http://127.0.0.1:$port" "$tree"
        server_time=$(calc %.3f "$(now) - $start")
        stop
        echo "round $round: local $local_time s, through the server $server_time s," \
            "ratio $(calc %.2f "$local_time / $server_time")"
        ;;
    storm)
        storm 1 "$scratch/one.json"
        storm 50 "$scratch/fifty.json"
        one=$(<"$scratch/one.json") fifty=$(<"$scratch/fifty.json")
        a=$(field seconds "$one") b=$(field seconds "$fifty")
        echo "round $round: one agent $(calc %.3f "$a") s, 50 agents $(calc %.3f "$b") s," \
            "ratio $(calc %.2f "$b / $a"); scans $(field scans "$fifty"), errors $(field errors "$fifty")"
        ;;
    esac
done
