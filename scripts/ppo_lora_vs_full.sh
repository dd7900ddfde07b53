#!/usr/bin/env bash
# PPO with LoRA (adapters on the policy and on the critic; the KL reference is the policy with its
# adapters off) against full fine-tuning (policy and critic trained; a frozen reference copy), at
# the `small` and `large` presets (large: hidden 768, 12 layers, 12 heads, GPT-2 124M's trunk, with
# the demo's 1,024-token vocabulary), on the demo task, shipped configs otherwise: seconds per
# iteration (median over the iterations after the first) and peak RSS (GNU time) of each.
#
#   scripts/ppo_lora_vs_full.sh [OUT]     (default runs/lora_vs_full; SHAPES="small large",
#                                          ITERS=4, BIN=target/release)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/lora_vs_full}
bin=${BIN:-target/release}
task=datasets/demo/task
iters=${ITERS:-4}
run() {
  local log=$1
  shift
  "$@" >"$log" 2>&1 || { tail -5 "$log"; echo "failed: $*"; exit 1; }
}
printf '%-6s %-5s %10s %10s\n' shape mode "s/iter" "peak RSS"
for shape in ${SHAPES:-small large}; do
  o=$out/$shape
  rm -rf "$o"
  mkdir -p "$o"
  run "$o/sft.log" "$bin/sft" --config configs/sft.toml --out "$o/sft" --set "model.preset=$shape" \
    --set "data.path=$task/demonstrations.jsonl" --set train.max_steps=10 \
    --set train.eval_every=0 --set train.save_every=0
  run "$o/rm.log" "$bin/reward" --config configs/reward.toml --out "$o/rm" \
    --set "model.base=$o/sft/final" --set "data.path=$task/rankings.csv" \
    --set ensemble.members=1 --set ensemble.monitor=false --set train.max_steps=10 \
    --set train.eval_every=0 --set train.save_every=0 --set 'data.demonstrations=""'
  for mode in full lora; do
    extra=()
    if [ "$mode" = lora ]; then
      extra=(--set lora.r=16 --set lora.alpha=32 --set 'lora.target_modules=["all-linear"]')
    fi
    run "$o/ppo-$mode.log" /usr/bin/time -f "%e %M" -o "$o/ppo-$mode.time" "$bin/ppo" \
      --config configs/ppo.toml --out "$o/ppo-$mode" --set "model.policy=$o/sft/final" \
      --set "model.reward_model=$o/rm/final" --set "data.prompts=$task/prompts.jsonl" \
      --set "train.iterations=$iters" --set train.save_every=0 --set train.log_every=1 \
      "${extra[@]}"
    per_iter=$(jq -s '[.[1:][] | select(.time_generate_s != null)
      | .time_generate_s + .time_score_s + .time_forward_s + .time_train_s] | sort
      | .[length / 2 | floor]' "$o/ppo-$mode/metrics.jsonl")
    read -r _ kb <"$o/ppo-$mode.time"
    printf '%-6s %-5s %10.2f %7.2f GB\n' "$shape" "$mode" "$per_iter" "$(echo "$kb / 1048576" | bc -l)"
  done
done
