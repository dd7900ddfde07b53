#!/usr/bin/env bash
# The method comparison of issue 30: on the demo task and the task suite's families, from the same
# SFT policy, reward model (the shipped ensemble) and labels, with the shipped configs and the same
# budget of sampled episodes for the online methods (400 iterations x 16 episodes: ppo's
# batch_size 16; the group estimators 4 prompts x 4 samples):
#   ppo (gae, a critic), grpo, rloo, reinforce_pp (critic-free; the KL in the reward as ppo's),
#   dpo (sigmoid) and dpo listwise (Plackett-Luce on the K-way groups; the shipped dpo.toml),
#   best-of-N of the SFT policy (evaluate --best-of-n N: the reward model picks 1 of N samples),
#   FeedME (reward best-of-n on the PPO prompts, then sft from the SFT policy on the chosen ones:
#   2 epochs at lr 3e-4, a tenth of sft.toml's from-scratch rate).
# best-of-N's KL is the analytic bound log N - (N-1)/N, its gold difference a plain difference of
# rates (no paired interval: its samples are not the SFT row's).
# Each policy is evaluated against the SFT policy on held-out prompts with the family's gold rule
# (which no stage sees): gold rate with its 95% interval, the difference from SFT, KL from SFT.
# One JSON line per (family, method) in $OUT_DIR/methods.jsonl, a table at the end.
#
# Environment: FAMILIES (default "demo words choice zh json"), SEED (0), OUT_DIR (runs/methods),
# BIN_DIR (target/release; copy the binaries elsewhere for long runs), METHODS (default all:
# "ppo grpo rloo reinforce_pp dpo dpo_listwise best_of_n feedme"), N (best-of-N's N, 4),
# EVAL_PROMPTS (300), REPO_ROOT (the repository; for a copy of this script run from elsewhere).
# Finished steps are kept: a rerun does only what is missing.
set -euo pipefail
cd "${REPO_ROOT:-$(dirname "$0")/..}"
bin=${BIN_DIR:-target/release}
root=${OUT_DIR:-runs/methods}
families=${FAMILIES:-demo words choice zh json}
methods=${METHODS:-ppo grpo rloo reinforce_pp dpo dpo_listwise best_of_n feedme}
seed=${SEED:-0}
n=${N:-4}
mkdir -p "$root"
run() {
  echo "+ $*" >>"$log"
  "$@" >>"$log" 2>&1 || { echo "failed: $* (see $log)"; tail -20 "$log"; exit 1; }
}
# once DIR CMD...: runs CMD unless DIR/.done exists; records its seconds.
once() {
  local dir=$1; shift
  [ -f "$dir/.done" ] && return 0
  local t0; t0=$(date +%s)
  run "$@"
  mkdir -p "$dir"
  echo $(( $(date +%s) - t0 )) >"$dir/.done"
}
evaluate() { # evaluate NAME POLICY [extra evaluate flags]
  local name=$1 policy=$2; shift 2
  once "$o/eval-$name" $bin/evaluate --policy "$policy" --baseline "$o/sft/final" \
    --reward-model "$o/rm/final" --prompts "$o/task/eval_prompts.jsonl" \
    --max-prompts "${EVAL_PROMPTS:-300}" --temperature 1 --samples-per-prompt 2 \
    --max-new-tokens 48 --gold "$gold" --out "$o/eval-$name" "$@"
}
ppo_with() { # ppo_with NAME [--set overrides]
  local name=$1; shift
  once "$o/$name" $bin/ppo --config configs/ppo.toml --out "$o/$name" --seed "$seed" \
    --set model.policy="$o/sft/final" --set model.reward_model="$o/rm/final" \
    --set data.prompts="$o/task/prompts.jsonl" "$@"
}
dpo_with() {
  local name=$1; shift
  once "$o/$name" $bin/dpo --config configs/dpo.toml --out "$o/$name" --seed "$seed" \
    --set model.policy="$o/sft/final" --set data.path="$o/labels" "$@"
}

for family in $families; do
  o="$root/$family-$seed"
  mkdir -p "$o"
  log="$o/log.txt"
  if [ "$family" = demo ]; then
    once "$o/task" $bin/labeling simulate --seed "$seed" --out "$o/task"
  else
    once "$o/task" $bin/labeling simulate --family "$family" --seed "$seed" --out "$o/task"
  fi
  gold=$(jq -r '.gold_rule' "$o/task/task.json")
  once "$o/labels" $bin/labeling import "$o/task/rankings.csv" --out "$o/labels"
  once "$o/sft" $bin/sft --config configs/sft.toml --out "$o/sft" --seed "$seed" \
    --set data.path="$o/task/demonstrations.jsonl"
  once "$o/rm" $bin/reward --config configs/reward.toml --out "$o/rm" --seed "$seed" \
    --set model.base="$o/sft/final" --set data.path="$o/labels"
  group=(--set rollout.batch_size=4 --set rollout.samples_per_prompt=4)
  for m in $methods; do
    case $m in
      ppo) ppo_with ppo ;;
      grpo | rloo) ppo_with "$m" --set advantage.estimator="\"$m\"" "${group[@]}" ;;
      reinforce_pp) ppo_with "$m" --set advantage.estimator='"reinforce_pp"' ;;
      dpo) dpo_with dpo ;;
      dpo_listwise) dpo_with dpo_listwise --set loss.kind='"listwise"' ;;
      best_of_n) ;;
      feedme)
        once "$o/feedme-demos" $bin/reward best-of-n --policy "$o/sft/final" \
          --reward-model "$o/rm/final" --prompts "$o/task/prompts.jsonl" --n "$n" \
          --seed "$seed" --max-new-tokens 24 --out "$o/feedme-demos/demos.jsonl"
        once "$o/feedme" $bin/sft --config configs/sft.toml --out "$o/feedme" --seed "$seed" \
          --set model.base="$o/sft/final" --set data.path="$o/feedme-demos/demos.jsonl" \
          --set train.max_steps=0 --set train.epochs=2 --set train.lr=3e-4 ;;
      *) echo "unknown method $m"; exit 1 ;;
    esac
    if [ "$m" = best_of_n ]; then
      evaluate best_of_n "$o/sft/final" --best-of-n "$n"
    else
      evaluate "$m" "$o/$m/final"
    fi
    secs=$(cat "$o/$m/.done" 2>/dev/null || echo 0)
    [ "$m" = feedme ] && secs=$(( secs + $(cat "$o/feedme-demos/.done") ))
    jq -cn --arg family "$family" --arg method "$m" --arg gold "$gold" --argjson secs "$secs" \
      --argjson n "$n" --slurpfile e "$o/eval-$m/metrics.json" \
      'def row: if $method == "best_of_n" then $e[0].best_of_n else $e[0].policy end;
       {family: $family, method: $method, gold_rule: $gold, seconds: $secs,
        sft_gold: $e[0].baseline.gold.rate,
        gold: (row.gold.rate), gold_low: (row.gold.low), gold_high: (row.gold.high),
        diff: (if $method == "best_of_n"
               then {mean: (row.gold.rate - $e[0].baseline.gold.rate), low: null, high: null}
               else $e[0].difference.gold end),
        kl: (if $method == "best_of_n" then row.kl_analytic else $e[0].policy.kl.mean end),
        reward: (row.reward.mean)}' >>"$root/methods.jsonl"
  done
done

echo
echo "| family | method | SFT gold | gold [95%] | gold - SFT [95%] | KL from SFT (nats) | RM score | train s |"
echo "|---|---|---|---|---|---|---|---|"
jq -rs '
  def f: if . == null then "—" else (. * 1000 | round / 1000 | tostring) end;
  def d: if . == null then "—" else "\(.mean|f) [\(.low|f), \(.high|f)]" end;
  group_by(.family + "/" + .method) | map(.[-1]) | sort_by(.family) | .[] |
  "| \(.family) | \(.method) | \(.sft_gold|f) | \(.gold|f) [\(.gold_low|f), \(.gold_high|f)] | \(.diff|d) | \(.kl|f) | \(.reward|f) | \(.seconds) |"' \
  "$root/methods.jsonl"
