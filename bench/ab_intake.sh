#!/usr/bin/env bash
# Intake CPU of two checkouts side by side: both servers (`serve --no-worker`) up at once on one
# PostgreSQL, loaded in turn by the same wrk script, server CPU seconds per request read from
# /proc. Alternating rounds on one machine cancel most of a shared machine's drift, which a
# before/after pair of `bench.intake` runs hours apart does not.
#
#   bench/ab_intake.sh CHECKOUT_A CHECKOUT_B [ROUNDS] [SECONDS]
#
# Each checkout needs its own .venv (scripts/test makes one). Needs wrk, psql and a PostgreSQL
# on loopback that takes `postgresql://postgres@127.0.0.1:5432/` (PGURL overrides); it makes
# the databases crm_relay_ab_a and crm_relay_ab_b afresh. Loopback only; bounded by
# ROUNDS x 2 x SECONDS.
set -euo pipefail
a=$(cd "$1" && pwd); b=$(cd "$2" && pwd); rounds=${3:-4}; seconds=${4:-8}
pg=${PGURL:-postgresql://postgres@127.0.0.1:5432}
work=$(mktemp -d)
pids=()
cleanup() { kill -TERM "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
start() { # checkout name port
  psql "$pg/postgres" -qc "DROP DATABASE IF EXISTS crm_relay_ab_$2" -c "CREATE DATABASE crm_relay_ab_$2"
  (cd "$1" && exec env -u REDIS_URL -u CRM DATABASE_URL="$pg/crm_relay_ab_$2" \
    CRM_RELAY_DATA_DIR="$work/$2" PORT="$3" HOST=127.0.0.1 LOG_LEVEL=INFO \
    .venv/bin/python -m service serve --no-worker >"$work/$2.log" 2>&1) &
  pids+=($!)
  for _ in $(seq 1 120); do curl -sf "127.0.0.1:$3/readyz" >/dev/null 2>&1 && return; sleep 0.5; done
  echo "$2 did not become ready:" >&2; tail -20 "$work/$2.log" >&2; exit 1
}
cat >"$work/load.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
function request()
  local n = math.random(1, 999999999)
  local body = string.format(
    '{"name":"Bench %d","phone":"+7701%07d","utm_source":"wrk","comment":"load"}', n, n % 10000000)
  return wrk.format(nil, "/api/v1/forms/bench", nil, body)
end
LUA
start "$a" a 18101
start "$b" b 18102
cpu() { awk '{print $14 + $15}' "/proc/$(pgrep -P "$1" -f 'service serve' || echo "$1")/stat"; }
echo "A = $a ($(git -C "$a" rev-parse --short HEAD)), B = $b ($(git -C "$b" rev-parse --short HEAD))"
echo "$(date -u '+%F %H:%M UTC'), nproc $(nproc), load $(cut -d' ' -f1 /proc/loadavg)"
for port in 18101 18102; do
  wrk -t2 -c64 -d3s -s "$work/load.lua" "http://127.0.0.1:$port/" >/dev/null  # warm-up
done
for round in $(seq 1 "$rounds"); do
  for side in a b; do
    if [ "$side" = a ]; then pid=${pids[0]}; port=18101; else pid=${pids[1]}; port=18102; fi
    before=$(cpu "$pid")
    out=$(wrk -t2 -c64 -d"${seconds}s" -s "$work/load.lua" "http://127.0.0.1:$port/")
    after=$(cpu "$pid")
    n=$(awk '/requests in/ {print $1}' <<<"$out")
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    ticks=$(getconf CLK_TCK)
    echo "round $round $side req/s $rps server_cpu_ms_per_req" \
      "$(python3 -c "print(round(($after - $before) * 1000 / $ticks / $n, 4))")"
  done
done
