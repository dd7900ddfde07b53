#!/usr/bin/env bash
# Throughput of `reward serve` in responses/s, OpenRLHF-style requests (a new connection each),
# at client batch 1 and 32 (sequential client), and batch 1 from 8 concurrent clients (batched by
# the server), against `reward score` on the same inputs. Checks the rewards equal score's.
#   scripts/bench_serve.sh [REWARD_DIR] [N]      (default runs/demo/reward/final, 256)
set -euo pipefail
cd "$(dirname "$0")/.."
RM=${1:-runs/demo/reward/final}
N=${2:-256}
OUT=runs/serve-bench
BIN=target/release/reward
mkdir -p "$OUT"
head -n "$N" datasets/demo/task/demonstrations.jsonl > "$OUT/inputs.jsonl"

start=$(date +%s.%N)
"$BIN" score "$RM" --input "$OUT/inputs.jsonl" --batch-size 32 > "$OUT/score.jsonl" 2> "$OUT/score.log"
end=$(date +%s.%N)
echo "reward score (batch 32): $(tail -1 "$OUT/score.log"); $(echo "$end - $start" | bc) s wall with loading"

"$BIN" serve "$RM" --port 0 --batch-size 32 > "$OUT/serve.out" 2> "$OUT/serve.log" &
PID=$!
trap 'kill -TERM $PID 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q listening "$OUT/serve.out" 2>/dev/null && break; sleep 0.1; done
URL=$(head -1 "$OUT/serve.out" | sed 's/listening on //')

python3 - "$URL" "$RM" "$OUT" <<'EOF'
import http.client, json, os, sys, time, urllib.parse
from concurrent.futures import ThreadPoolExecutor
url, rm, out = sys.argv[1:]
member = os.path.join(rm, "member-0") if os.path.exists(os.path.join(rm, "ensemble.json")) else rm
template = json.load(open(os.path.join(member, "rlhf.json")))["prompt_template"]
rows = [json.loads(l) for l in open(os.path.join(out, "inputs.jsonl"))]
want = [json.loads(l)["reward"] for l in open(os.path.join(out, "score.jsonl"))]
prompts = [template.replace("{prompt}", r["prompt"]) for r in rows]
queries = [p + r["response"] + "<|endoftext|>" for p, r in zip(prompts, rows)]
u = urllib.parse.urlparse(url)

def post(lo, hi):
    c = http.client.HTTPConnection(u.hostname, u.port)
    c.request("POST", "/get_reward", json.dumps({"query": queries[lo:hi], "prompts": prompts[lo:hi]}),
              {"Content-Type": "application/json"})
    r = c.getresponse(); body = json.loads(r.read()); c.close()
    assert r.status == 200, body
    return body["rewards"]

def run(batch, clients):
    spans = [(i, min(i + batch, len(rows))) for i in range(0, len(rows), batch)]
    t = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        got = [x for part in pool.map(lambda s: post(*s), spans) for x in part]
    dt = time.perf_counter() - t
    diff = max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(got, want))
    return len(rows) / dt, dt, diff

run(32, 1)  # warm-up
for batch, clients in [(1, 1), (32, 1), (1, 8)]:
    rates = sorted(run(batch, clients) for _ in range(3))
    rate, dt, diff = rates[1]
    print(f"serve, client batch {batch:>2}, {clients} client(s): {rate:7.1f} responses/s "
          f"(median of 3; {dt:.2f} s for {len(rows)}; max |reward - score's| / max(1, |score's|) {diff:.1e})")
EOF
kill -TERM $PID; wait $PID; trap - EXIT
tail -1 "$OUT/serve.out"
