#!/usr/bin/env bash
# Reward models against each task's gold scorer, on held-out candidates nobody ranked (every kind:
# correct, nearly right, wrong, wrong format, and the empty, repeated and refusal-like responses a
# policy finds when it hacks a reward model): our `reward` (a single model, and the shipped
# ensemble) against TRL's RewardTrainer, from the same SFT checkpoint on the same rankings, each at
# its best training length. Per family of the task suite (`labeling simulate --family F`):
#   simulate → import → sft (shipped config) →
#     ours:  reward with ensemble.members = 1 at each of RM_STEPS, and the shipped ensemble (3
#            members, bootstrap) at each of RM_STEPS, `reward agreement` (the ensemble by its
#            members' mean and by mean − std)
#     TRL:   scripts/bench_rm_agreement.py: RewardTrainer on every pair of the same rankings
#            (all groups: no validation split, which ours keeps), agreement after each epoch.
# One JSON line per measurement in $OUT_DIR/agreement.jsonl, and a table at the end.
#
# Environment: FAMILIES (default "words choice zh json demo"), SEED (0), RM_STEPS (default
# "150 300 600"), TRL_EPOCHS (4), TRL_LR ("3e-4,1e-3": 3e-4 was TRL's best on words, 1e-3 is ours;
# a comma list tries each), OUT_DIR (runs/bench-agreement), SKIP_BUILD=1, PYTHON (a python with torch
# 2.9.0 + transformers; default .venv/bin/python if it exists, else a new .venv-bench), TRL_SPEC.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --release --bins
bin=$root/target/release
out=${OUT_DIR:-runs/bench-agreement}
mkdir -p "$out"
res=$out/agreement.jsonl
: >"$res"
seed=${SEED:-0}

if [ -n "${PYTHON:-}" ]; then
  py=$PYTHON
elif [ -x .venv/bin/python ]; then
  py=$root/.venv/bin/python
else
  py=$root/.venv-bench/bin/python
  if [ ! -x "$py" ]; then
    python3 -m venv .venv-bench
    "$py" -m pip install -q torch==2.9.0 transformers
  fi
fi
"$py" - >"$out/constraints.txt" <<'EOF'
import importlib.metadata as m
for name in ("torch", "transformers"):
    print(f"{name}=={m.version(name)}")
EOF
"$py" -m pip install -q "${TRL_SPEC:-trl}" datasets -c "$out/constraints.txt"

ours() { # family method steps dir aggregate
  local j=$out/$1/agreement-$2-$3-$5.json
  $bin/reward agreement "$4" --candidates "$out/$1/task/heldout_candidates.jsonl" \
    --aggregate "$5" --json "$j" >/dev/null
  jq -c --arg f "$1" --arg m "$2" --arg s "$3" --arg agg "$5" --argjson seed "$seed" \
    '{impl: "ours", method: $m, family: $f, seed: $seed, steps: ($s|tonumber), aggregate: $agg,
      agreement: (.overall.accuracy * 10000 | round / 10000), candidate_pairs: .overall.total,
      by_worse_kind: (.by_worse_kind | map_values(.accuracy * 10000 | round / 10000))}' "$j" \
    | tee -a "$res"
}

for f in ${FAMILIES:-words choice zh json demo}; do
  o=$out/$f
  rm -rf "$o"
  mkdir -p "$o"
  log=$o/log.txt
  if [ "$f" = demo ]; then
    $bin/labeling simulate --seed "$seed" --heldout-candidates 150 --out "$o/task" >>"$log"
  else
    $bin/labeling simulate --family "$f" --seed "$seed" --out "$o/task" >>"$log"
  fi
  $bin/labeling import "$o/task/rankings.csv" --out "$o/labels" >>"$log"
  $bin/sft --config configs/sft.toml --out "$o/sft" --seed "$seed" \
    --set data.path="$o/task/demonstrations.jsonl" >>"$log"
  for steps in ${RM_STEPS:-150 300 600}; do
    common=(--config configs/reward.toml --seed "$seed" --set model.base="$o/sft/final"
      --set data.path="$o/labels" --set train.max_steps="$steps")
    $bin/reward "${common[@]}" --out "$o/single-$steps" --set ensemble.members=1 >>"$log"
    ours "$f" "reward (single)" "$steps" "$o/single-$steps/final" mean
    $bin/reward "${common[@]}" --out "$o/ensemble-$steps" >>"$log"
    ours "$f" "reward (ensemble of 3, mean)" "$steps" "$o/ensemble-$steps/final" mean
    ours "$f" "reward (ensemble of 3, mean - std)" "$steps" "$o/ensemble-$steps/final" mean-minus-std
  done
  "$py" scripts/bench_rm_agreement.py trl --task "$o/task" --sft "$o/sft/final" --work "$o/trl" \
    --epochs "${TRL_EPOCHS:-4}" --lr "${TRL_LR:-3e-4,1e-3}" --seed "$seed" | tee -a "$res"
done
echo
"$py" scripts/bench_rm_agreement.py table "$res"
