#!/usr/bin/env bash
# The data flywheel (InstructGPT kept collecting comparisons on the current policy's samples): R
# rounds per task, with the shipped configs (only paths set). Round 1 is the pipeline
#   simulate → import → sft → reward → ppo → evaluate
# and each later round r
#   labeling export-sheet from round r-1's policy (its stored template), SHEET_PROMPTS prompts of
#     prompts.jsonl not used by an earlier sheet, K responses each; with SHEET_FROM=policy+sft
#     (the default) every other response from the SFT model, and with DISTINCT=1 (the default)
#     duplicate responses left out (a labeler can only tie them)
#   labeling simulate-labelers ranks it by the task's gold rule with noise and ties (the stages
#     never see the rule); the labeling cost is printed
#   labeling import of the first rankings and every round's sheet together
#   reward continues each member of round r-1's ensemble on old + new groups (RM_FROM=sft
#     trains each round's reward model from the SFT model instead)
#   ppo continues from round r-1's policy against the new reward model, KL to the SFT model
#   evaluate against the SFT model, gold by the task's rule
# and, as the control that tells new labels from more PPO, ppo continues as long on round 1's
# reward model with no new labels (CONTROL=0 skips it). After each round the reward models
# before and after it score round r-1's policy samples on the held-out evaluation prompts (the
# exploits the policy found): agreement with gold on pairs that gold tells apart, and the gap
# between the mean reward of gold-wrong and gold-right samples in standard deviations.
# One JSON line per (task, round) in $OUT_DIR/flywheel.jsonl and a table at the end.
#
# Environment: FAMILIES (default "words json demo"), SEED (0), ROUNDS (3), SHEET_PROMPTS (150),
# RM_FROM (previous, or sft), EXTRA_RM / EXTRA_PPO add `--set` overrides to every reward / ppo run (e.g. a weak KL penalty
# and a single reward model, to study a round 1 that over-optimises), K (4), SHEET_FROM
# (policy+sft, or policy), DISTINCT (1), OUT_DIR (runs/flywheel), EVAL_PROMPTS (300), CONTROL (1), BIN_DIR (target/release: a
# copy keeps a long study apart from rebuilds), SKIP_BUILD=1 uses the
# binaries as built.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --release --bins
bin=${BIN_DIR:-target/release}
root=${OUT_DIR:-runs/flywheel}
mkdir -p "$root"
: >"$root/flywheel.jsonl"
families=${FAMILIES:-words json demo}
seed=${SEED:-0}
rounds=${ROUNDS:-3}
n_sheet=${SHEET_PROMPTS:-150}
k=${K:-4}
sets() { for s in $1; do printf -- '--set\n%s\n' "$s"; done; }
mapfile -t xr < <(sets "${EXTRA_RM:-}")
mapfile -t xp < <(sets "${EXTRA_PPO:-}")
run() {
  echo "+ $*" >>"$log"
  "$@" >>"$log" 2>&1 || { echo "failed: $* (see $log)"; tail -20 "$log"; exit 1; }
}
evaluate() { # policy reward-model out
  run $bin/evaluate --policy "$1" --baseline "$o/sft/final" --reward-model "$2" \
    --prompts "$o/task/eval_prompts.jsonl" --max-prompts "${EVAL_PROMPTS:-300}" --temperature 1 \
    --samples-per-prompt 2 --max-new-tokens 48 --gold "$gold" --out "$3"
}
# PPO of round r continuing from a policy, KL to the SFT model.
ppo_continue() { # out policy reward-model
  run $bin/ppo --config configs/ppo.toml --out "$1" --seed "$((seed + r))" \
    --set model.policy="$2" --set model.reference="$o/sft/final" \
    --set model.reward_model="$3" --set data.prompts="$o/task/prompts.jsonl" "${xp[@]}"
}
# An evaluation's samples (policy's and baseline's) as candidates with gold and a kind.
candidates() {
  jq -c '. as $l | ("\($l.line)") as $id | ["policy", "baseline"][] as $m
    | $l[$m] | {prompt_id: $id, prompt: $l.prompt, response: .response, gold: .gold,
      kind: ((.response | split(" ") | map(select(. != ""))) as $w
        | if .gold >= 1 then "right" elif (.response | gsub("\\s"; "")) == "" then "empty"
          elif ($w | length) >= 6 and (($w | unique | length) * 3 <= ($w | length)) then "degenerate"
          else "wrong" end)}' \
    "$1/samples.jsonl" >"$2"
}
# Agreement with gold and the wrong-minus-right reward gap (in standard deviations) of a reward
# model on candidates; one JSON object.
exploit_check() { # reward-model candidates name
  run $bin/reward agreement "$1" --candidates "$2" --json "$o/agreement-$3.json"
  jq -c '{prompt, response}' "$2" >"$o/score-input.jsonl"
  $bin/reward score "$1" --input "$o/score-input.jsonl" 2>>"$log" >"$o/score-$3.jsonl"
  jq -cn --slurpfile c "$2" --slurpfile s "$o/score-$3.jsonl" --slurpfile a "$o/agreement-$3.json" '
    [range(0; $c | length) as $i | {kind: $c[$i].kind, r: $s[$i].reward}] as $x
    | ($x | map(.r)) as $all | ($all | add / length) as $m
    | (($all | map((. - $m) * (. - $m)) | add / length) | sqrt) as $sd
    | def mean(k): [$x[] | select(.kind == k) | .r] | if length == 0 then null else add / length end;
      {agreement: $a[0].overall.accuracy, pairs: $a[0].overall.total,
       gap_wrong: (if mean("wrong") == null or mean("right") == null then null else (mean("wrong") - mean("right")) / $sd end),
       gap_empty: (if mean("empty") == null or mean("right") == null then null else (mean("empty") - mean("right")) / $sd end),
       gap_degenerate: (if mean("degenerate") == null or mean("right") == null then null else (mean("degenerate") - mean("right")) / $sd end),
       wrong: ([$x[] | select(.kind == "wrong")] | length), empty: ([$x[] | select(.kind == "empty")] | length),
       degenerate: ([$x[] | select(.kind == "degenerate")] | length)}'
}
record() { # round eval-dir control-eval-dir-or-empty rows labeled-prompts before-check after-check
  jq -cn --arg family "$family" --argjson round "$1" --slurpfile e "$2/metrics.json" \
    --argjson ctl "$( [ -n "$3" ] && cat "$3/metrics.json" || echo null)" --argjson rows "$4" \
    --argjson prompts "$5" --argjson before "${6:-null}" --argjson after "${7:-null}" \
    '{family: $family, round: $round, rows_ranked: $rows, prompts_labeled: $prompts,
      sft_gold: $e[0].baseline.gold.rate, gold: $e[0].policy.gold.rate, diff: $e[0].difference.gold,
      control_gold: (if $ctl == null then null else $ctl.policy.gold.rate end),
      control_diff: (if $ctl == null then null else $ctl.difference.gold end),
      rm_before: $before, rm_after: $after}' | tee -a "$root/flywheel.jsonl"
}

for family in $families; do
  o="$root/$family-$seed"
  rm -rf "$o"
  mkdir -p "$o"
  log="$o/log.txt"
  if [ "$family" = demo ]; then
    run $bin/labeling simulate --seed "$seed" --heldout-candidates 150 --out "$o/task"
  else
    run $bin/labeling simulate --family "$family" --seed "$seed" --out "$o/task"
  fi
  gold=$(jq -r '.gold_rule' "$o/task/task.json")
  run $bin/labeling import "$o/task/rankings.csv" --out "$o/labels-1"
  rows=$(( $(jq -r '.files["rankings.csv"]' "$o/task/task.json") ))
  prompts=$(jq -r '.prompts' "$o/labels-1/stats.json")
  run $bin/sft --config configs/sft.toml --out "$o/sft" --seed "$seed" \
    --set data.path="$o/task/demonstrations.jsonl"
  run $bin/reward --config configs/reward.toml --out "$o/rm-1" --seed "$seed" \
    --set model.base="$o/sft/final" --set data.path="$o/labels-1" "${xr[@]}"
  run $bin/ppo --config configs/ppo.toml --out "$o/ppo-1" --seed "$seed" \
    --set model.policy="$o/sft/final" --set model.reward_model="$o/rm-1/final" \
    --set data.prompts="$o/task/prompts.jsonl" "${xp[@]}"
  evaluate "$o/ppo-1/final" "$o/rm-1/final" "$o/eval-1"
  echo "$family round 1: $rows rows ranked ($prompts prompts), the first labeling"
  record 1 "$o/eval-1" "" "$rows" "$prompts"
  sheets=("$o/task/rankings.csv")
  for ((r = 2; r <= rounds; r++)); do
    p=$((r - 1))
    # Sheet prompts: the next SHEET_PROMPTS lines of prompts.jsonl (PPO prompts: the policy's
    # own distribution; their answers are the simulated labelers' gold).
    sed -n "$(( (p - 1) * n_sheet + 1 )),$(( p * n_sheet ))p" "$o/task/prompts.jsonl" >"$o/sheet-$p-prompts.jsonl"
    [ -s "$o/sheet-$p-prompts.jsonl" ] || { echo "prompts.jsonl has no prompts left for round $r"; exit 1; }
    from=(--policy "$o/ppo-$p/final")
    [ "${SHEET_FROM:-policy+sft}" = policy ] || from+=(--policy "$o/sft/final")
    distinct=()
    [ "${DISTINCT:-1}" = 0 ] || distinct=(--distinct)
    run $bin/labeling export-sheet "${from[@]}" "${distinct[@]}" \
      --prompts "$o/sheet-$p-prompts.jsonl" --k "$k" --id-prefix "r$p-" --max-new-tokens 24 \
      --temperature 1 --seed "$((seed + r))" --out "$o/sheet-$p.csv"
    run $bin/labeling simulate-labelers --sheet "$o/sheet-$p.csv" --gold "$gold" \
      --answers "$o/task/prompts.jsonl" --seed "$((seed + r))" --out "$o/ranked-$p.csv"
    echo "$family round $r: $(grep '^labeling cost' "$log" | tail -1)"
    echo "  $(grep '^gold mean of the sheet' "$log" | tail -1)"
    sheets+=("$o/ranked-$p.csv")
    round_rows=$(( $(wc -l <"$o/ranked-$p.csv") - 1 ))
    run $bin/labeling import "${sheets[@]}" --out "$o/labels-$r"
    prompts=$(jq -r '.prompts' "$o/labels-$r/stats.json")
    rm_base="$o/rm-$p/final"
    [ "${RM_FROM:-previous}" = sft ] && rm_base="$o/sft/final"
    run $bin/reward --config configs/reward.toml --out "$o/rm-$r" --seed "$seed" \
      --set model.base="$rm_base" --set data.path="$o/labels-$r" "${xr[@]}"
    ppo_continue "$o/ppo-$r" "$o/ppo-$p/final" "$o/rm-$r/final"
    evaluate "$o/ppo-$r/final" "$o/rm-$r/final" "$o/eval-$r"
    ctl=""
    if [ "${CONTROL:-1}" = 1 ]; then
      ctl_from="$o/ppo-$p-control/final"
      [ "$p" = 1 ] && ctl_from="$o/ppo-1/final"
      ppo_continue "$o/ppo-$r-control" "$ctl_from" "$o/rm-1/final"
      evaluate "$o/ppo-$r-control/final" "$o/rm-1/final" "$o/eval-$r-control"
      ctl="$o/eval-$r-control"
    fi
    candidates "$o/eval-$p" "$o/policy-$p-candidates.jsonl"
    before=$(exploit_check "$o/rm-$p/final" "$o/policy-$p-candidates.jsonl" "rm-$p-on-policy-$p")
    after=$(exploit_check "$o/rm-$r/final" "$o/policy-$p-candidates.jsonl" "rm-$r-on-policy-$p")
    record "$r" "$o/eval-$r" "$ctl" "$round_rows" "$prompts" "$before" "$after"
  done
done

echo
echo "| task | round | rows ranked | prompts labeled | SFT gold | policy gold (diff [95%]) | control gold (no new labels) | RM agreement on the previous policy's samples, before → after | wrong − right reward (sd), before → after |"
echo "|---|---|---|---|---|---|---|---|---|"
jq -r '
  def f: if . == null then "—" else (. * 1000 | round / 1000 | tostring) end;
  def d: if . == null then "—" else "\(.mean|f) [\(.low|f), \(.high|f)]" end;
  "| \(.family) | \(.round) | \(.rows_ranked) | \(.prompts_labeled) | \(.sft_gold|f) | \(.gold|f) (\(.diff|d)) | \(.control_gold|f) | \(.rm_before.agreement|f) → \(.rm_after.agreement|f) | \(.rm_before.gap_wrong|f) → \(.rm_after.gap_wrong|f) |"' \
  "$root/flywheel.jsonl"
