#!/usr/bin/env bash
# The task suite: the whole pipeline with the shipped configs (only paths set) on task families
# unlike the demo (`labeling simulate --family F`: prompt kinds, answer forms, K, labeler noise,
# sloppy demonstrations, Chinese), each with a gold rule no stage ever sees. Per family:
#   simulate → import → sft → reward (shipped: ensemble + held-out monitor) → ppo → evaluate
# and, with the defences off, a single reward model (ensemble.members = 1) → ppo → evaluate; then
# each reward model's agreement with gold on held-out candidates nobody ranked (empty, repeated
# and refusal-like ones among them: `reward agreement`). One table at the end; one JSON line per
# family in $OUT_DIR/suite.jsonl.
#
# Environment: FAMILIES (default "words choice zh json demo"), SEEDS (default "0"), OUT_DIR
# (default runs/suite), SKIP_BUILD=1 uses the binaries as built, EXTRA_SFT / EXTRA_RM / EXTRA_PPO
# add `--set` overrides to every run of that stage (for choosing defaults: never per family),
# OFF=0 skips the defences-off runs, EVAL_PROMPTS (default 300).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --release --bins
bin=target/release
root=${OUT_DIR:-runs/suite}
mkdir -p "$root"
: >"$root/suite.jsonl"
families=${FAMILIES:-words choice zh json demo}
seeds=${SEEDS:-0}
sets() { for s in $1; do printf -- '--set\n%s\n' "$s"; done; }
run() {
  echo "+ $*" >>"$log"
  "$@" >>"$log" 2>&1 || { echo "failed: $* (see $log)"; tail -20 "$log"; exit 1; }
}
gold_of() { jq -r '.gold_rule' "$1/task.json"; }

for family in $families; do
  for seed in $seeds; do
    o="$root/$family-$seed"
    rm -rf "$o"
    mkdir -p "$o"
    log="$o/log.txt"
    t0=$(date +%s)
    if [ "$family" = demo ]; then
      run $bin/labeling simulate --seed "$seed" --heldout-candidates 150 --out "$o/task"
    else
      run $bin/labeling simulate --family "$family" --seed "$seed" --out "$o/task"
    fi
    gold=$(gold_of "$o/task")
    run $bin/labeling import "$o/task/rankings.csv" --out "$o/labels"
    mapfile -t xs < <(sets "${EXTRA_SFT:-}")
    run $bin/sft --config configs/sft.toml --out "$o/sft" --seed "$seed" \
      --set data.path="$o/task/demonstrations.jsonl" "${xs[@]}"
    variants="on"
    [ "${OFF:-1}" = 0 ] || variants="on off"
    for v in $variants; do
      mapfile -t xr < <(sets "${EXTRA_RM:-}")
      mapfile -t xp < <(sets "${EXTRA_PPO:-}")
      off=()
      [ "$v" = off ] && off=(--set ensemble.members=1)
      run $bin/reward --config configs/reward.toml --out "$o/rm-$v" --seed "$seed" \
        --set model.base="$o/sft/final" --set data.path="$o/labels" "${xr[@]}" "${off[@]}"
      run $bin/ppo --config configs/ppo.toml --out "$o/ppo-$v" --seed "$seed" \
        --set model.policy="$o/sft/final" --set model.reward_model="$o/rm-$v/final" \
        --set data.prompts="$o/task/prompts.jsonl" "${xp[@]}"
      run $bin/evaluate --policy "$o/ppo-$v/final" --baseline "$o/sft/final" \
        --reward-model "$o/rm-$v/final" --prompts "$o/task/eval_prompts.jsonl" \
        --max-prompts "${EVAL_PROMPTS:-300}" --temperature 1 --samples-per-prompt 2 \
        --max-new-tokens 48 --gold "$gold" --out "$o/eval-$v"
      if [ -f "$o/ppo-$v/best/model.safetensors" ]; then
        run $bin/evaluate --policy "$o/ppo-$v/best" --baseline "$o/sft/final" \
          --reward-model "$o/rm-$v/final" --prompts "$o/task/eval_prompts.jsonl" \
          --max-prompts "${EVAL_PROMPTS:-300}" --temperature 1 --samples-per-prompt 2 \
          --max-new-tokens 48 --gold "$gold" --out "$o/eval-$v-best"
      fi
      if [ -f "$o/task/heldout_candidates.jsonl" ]; then
        run $bin/reward agreement "$o/rm-$v/final" --candidates "$o/task/heldout_candidates.jsonl" \
          --json "$o/agreement-$v.json"
      fi
    done
    secs=$(( $(date +%s) - t0 ))
    jq -cn --arg family "$family" --arg seed "$seed" --arg gold "$gold" --arg secs "$secs" \
      --slurpfile on "$o/eval-on/metrics.json" \
      --argjson off "$( [ -f "$o/eval-off/metrics.json" ] && cat "$o/eval-off/metrics.json" || echo null)" \
      --argjson onbest "$( [ -f "$o/eval-on-best/metrics.json" ] && cat "$o/eval-on-best/metrics.json" || echo null)" \
      --argjson agon "$( [ -f "$o/agreement-on.json" ] && cat "$o/agreement-on.json" || echo null)" \
      --argjson agoff "$( [ -f "$o/agreement-off.json" ] && cat "$o/agreement-off.json" || echo null)" \
      --argjson ppo "$(cat "$o/ppo-on/summary.json")" \
      '{family: $family, seed: ($seed|tonumber), gold_rule: $gold, seconds: ($secs|tonumber),
        sft_gold: $on[0].baseline.gold.rate,
        on: {gold: $on[0].policy.gold.rate, diff: $on[0].difference.gold,
             reward_diff: $on[0].difference.reward.mean,
             heldout_diff: $on[0].difference.heldout_reward.mean,
             warnings: ($ppo.overoptimization_warnings | length), best_iteration: $ppo.best_iteration},
        on_best: (if $onbest == null then null else {gold: $onbest.policy.gold.rate, diff: $onbest.difference.gold} end),
        off: (if $off == null then null else {gold: $off.policy.gold.rate, diff: $off.difference.gold,
             reward_diff: $off.difference.reward.mean} end),
        agreement_on: (if $agon == null then null else $agon.overall.accuracy end),
        agreement_off: (if $agoff == null then null else $agoff.overall.accuracy end)}' \
      | tee -a "$root/suite.jsonl"
  done
done

echo
echo "| family | seed | gold rule | SFT gold | PPO gold, defences on (diff [95%]) | best/ gold (diff) | PPO gold, single RM (diff [95%]) | RM-gold agreement ens / single | warnings | s |"
echo "|---|---|---|---|---|---|---|---|---|---|"
jq -r '
  def f: if . == null then "—" else (. * 1000 | round / 1000 | tostring) end;
  def d: if . == null then "—" else "\(.mean|f) [\(.low|f), \(.high|f)]" end;
  "| \(.family) | \(.seed) | \(.gold_rule) | \(.sft_gold|f) | \(.on.gold|f) (\(.on.diff|d)) | \(.on_best.gold|f) (\(.on_best.diff|d)) | \(.off.gold|f) (\(.off.diff|d)) | \(.agreement_on|f) / \(.agreement_off|f) | \(.on.warnings) | \(.seconds) |"' \
  "$root/suite.jsonl"
