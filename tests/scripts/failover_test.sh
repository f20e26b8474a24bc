#!/usr/bin/env bash
# Two http_server replicas behind nginx on loopback under wrk load (scripts/replicas):
#   kill:  one replica gets SIGKILL mid-load and is restarted; every request must be answered 200
#          (nginx sends the ones the dead replica held to the survivor), the survivor must carry
#          the load, and the restarted replica must take requests again.
#   drain: one replica gets SIGTERM mid-load; it drains and exits 0, and nothing is lost.
# usage: failover_test.sh BUILD_DIR WRK [kill|drain]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
build=$1 wrk=$2 which=${3:-kill}
export OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1
# The counts go to BUILD_DIR/failover_<which>.log too, for scripts/test to print.
exec > >(tee "$build/failover_$which.log") 2>&1
dir=$(mktemp -d)
base=$("$root/scripts/replicas" ports)  # free now, and no client connection takes them
lb=$((base + 10))
trap '"$root/scripts/replicas" stop "$dir" || true; rm -rf "$dir"' EXIT
"$root/scripts/replicas" start "$dir" "$build" "$lb" "$base" cpu,cpu -- \
  --model mlp:1x64 --mode stacked --threads 2 --policy adaptive:2ms
url="http://127.0.0.1:$lb/v2/models/model/infer"
served() {  # replica i's 200 answers so far
  curl -sf "http://127.0.0.1:$((base + $1))/metrics" |
    sed -n 's/^syncbatch_requests_total{model="model",code="200"} \([0-9]*\)$/\1/p' | grep . || echo 0
}
load() {  # seconds -> RESULT line of wrk
  "$wrk" -t2 -c16 -d"$1"s -s "$root/bench/http/post.lua" "$url" -- oip 64 | grep '^RESULT'
}
fail=0
check() {  # what, RESULT line
  local requests non2xx socket_errors requests_per_s p50_us p90_us p99_us
  eval "${2#RESULT }"
  echo "$1: $requests requests, $((requests - non2xx)) answered 2xx, $non2xx other statuses, $socket_errors socket errors (timeouts included: a request never answered)"
  ((requests > 0 && non2xx == 0 && socket_errors == 0)) || { echo "FAIL: $1 lost or failed requests"; fail=1; }
}
pid0=$(cat "$dir/replica-0.pid")
if [[ "$which" == kill ]]; then
  load 5 >"$dir/wrk.out" &
  wrk_pid=$!
  sleep 1.5
  before1=$(served 1)
  kill -KILL "$pid0"
  echo "SIGKILL to replica 0 (pid $pid0) after 1.5 s of load"
  sleep 1.5
  after1=$(served 1)
  "$root/scripts/replicas" restart "$dir" 0
  echo "replica 0 restarted (pid $(cat "$dir/replica-0.pid"))"
  wait "$wrk_pid"
  check "load across the kill and restart" "$(cat "$dir/wrk.out")"
  echo "survivor (replica 1) answered $((after1 - before1)) requests in the 1.5 s replica 0 was down"
  ((after1 > before1)) || { echo "FAIL: the survivor did not carry the load"; fail=1; }
  # nginx retries a replica it marked failed after fail_timeout (2 s), in each worker process;
  # on a loaded machine the restart itself may end after the first load, so the load goes on
  # in rounds of 2 s, up to three, until the restarted replica has answered.
  rejoined=0
  for round in 1 2 3; do
    check "load after the restart (round $round)" "$(load 2)"
    rejoined=$(served 0)
    ((rejoined > 0)) && break
  done
  echo "restarted replica 0 answered $rejoined requests since it came back"
  ((rejoined > 0)) || { echo "FAIL: the restarted replica did not rejoin"; fail=1; }
else
  load 4 >"$dir/wrk.out" &
  wrk_pid=$!
  sleep 1.5
  kill -TERM "$pid0"
  echo "SIGTERM to replica 0 (pid $pid0) after 1.5 s of load"
  while kill -0 "$pid0" 2>/dev/null; do sleep 0.05; done
  wait "$wrk_pid"
  check "load across the drain" "$(cat "$dir/wrk.out")"
  if grep -q '^stopped; stats' "$dir/replica-0.log"; then
    echo "replica 0 drained and exited: $(grep '^stopped' "$dir/replica-0.log")"
  else
    echo "FAIL: replica 0 did not stop cleanly:"; cat "$dir/replica-0.log"; fail=1
  fi
fi
exit "$fail"
