#!/usr/bin/env bash
# Where a connect's CPU goes: the directory and one shard on CPU 0 (as bench/compare's
# roomshard-1), the Node load generator on CPU 1 opening ROOMS x MEMBERS connections with
# CONC connects in flight (bench/loadgen/loadgen.js, idle mode); prints each process's CPU
# per connect. PROF=1 also records py-spy profiles (raw and flame graph) of both servers.
# Results in OUT (default /tmp/roomshard-connect-profile). docs/benchmarks/connect.md.
#
#   bench/connect_profile.sh                 # 5,000 connections in 250 rooms, 200 in flight
#   PROF=1 bench/connect_profile.sh 200 250 20
#   NODE_OPTS="--cpu-prof --cpu-prof-dir=/tmp/nprof" bench/connect_profile.sh   # the load generator's CPU profile
set -euo pipefail
cd "$(dirname "$0")/.."
CONC=${1:-200}; ROOMS=${2:-250}; MEMBERS=${3:-20}
OUT=${OUT:-/tmp/roomshard-connect-profile}; DIR_PORT=${DIR_PORT:-9411}; SHARD_PORT=${SHARD_PORT:-9412}
rm -rf "$OUT"; mkdir -p "$OUT"
export ROOMSHARD_ADMIN_TOKEN=connect-profile-admin-token ROOMSHARD_CLUSTER_SECRET=connect-profile-secret \
  ROOMSHARD_AUTH=open ROOMSHARD_DATABASE_URL="sqlite+aiosqlite:///$OUT/directory.db" \
  ROOMSHARD_LOG_LEVEL=warning PYTHONUNBUFFERED=1
PY=${PYTHON:-.venv/bin/python}
taskset -c 0 "$PY" -m roomshard directory --port "$DIR_PORT" > "$OUT/directory.log" 2>&1 & DP=$!
taskset -c 0 "$PY" -m roomshard shard --instance i1 --port "$SHARD_PORT" \
  --directory-url "http://127.0.0.1:$DIR_PORT" > "$OUT/shard.log" 2>&1 & SP=$!
PIDS=()
cleanup() {
  if [ ${#PIDS[@]} -gt 0 ]; then kill -INT "${PIDS[@]}" 2>/dev/null || true; wait "${PIDS[@]}" 2>/dev/null || true; fi
  kill "$SP" 2>/dev/null || true; sleep 0.5; kill "$DP" 2>/dev/null || true; wait 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 100); do
  curl -sf -H "Authorization: Bearer $ROOMSHARD_ADMIN_TOKEN" "http://127.0.0.1:$DIR_PORT/v1/admin/instances" \
    | grep -q '"active"' && break
  sleep 0.2
done
if [ "${PROF:-0}" = 1 ]; then
  for who in directory:$DP shard:$SP; do
    name=${who%%:*}; pid=${who##*:}
    "${PYSPY:-$(dirname "$PY")/py-spy}" record -r ${RATE:-200} -p "$pid" -o "$OUT/$name.txt" -f raw --nonblocking >"$OUT/py-spy-$name.log" 2>&1 & PIDS+=($!)
  done
  sleep 1
fi
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
d0=$(ticks $DP); s0=$(ticks $SP)
CFG="{\"protocol\":\"roomshard\",\"mode\":\"idle\",\"targets\":[],\"directory\":\"http://127.0.0.1:$DIR_PORT\",\"rooms\":$ROOMS,\"members\":$MEMBERS,\"roomPrefix\":\"p$RANDOM\",\"rates\":[],\"stepSeconds\":1,\"drainSeconds\":1,\"minDelivered\":0.99,\"maxP99Ms\":200,\"maxConsecutiveFailures\":2,\"pids\":[$DP,$SP],\"databasePids\":[],\"clkTck\":100,\"connectConcurrency\":$CONC,\"settleSeconds\":1}"
taskset -c 1 node ${NODE_OPTS:-} bench/loadgen/loadgen.js "$CFG" > "$OUT/loadgen.json" 2> "$OUT/loadgen.err"
d1=$(ticks $DP); s1=$(ticks $SP)
N=$((ROOMS * MEMBERS))
"$PY" - "$OUT/loadgen.json" "$N" "$((d1 - d0))" "$((s1 - s0))" "$(getconf CLK_TCK)" <<'PYEOF'
import json, sys
doc, n, d, s, hz = json.load(open(sys.argv[1])), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
c = doc["idle"]["connect"]
print(json.dumps({"connections": n, "connected": c["ok"], "failed": c["failed"], "seconds": round(c["seconds"], 2),
                  "connects_per_s": round(c["per_s"]), "retries": doc.get("connect_retries"),
                  "directory_cpu_us_per_connect": round(d / hz / n * 1e6),
                  "shard_cpu_us_per_connect": round(s / hz / n * 1e6)}))
PYEOF
