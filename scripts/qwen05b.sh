#!/usr/bin/env bash
# A Qwen2.5-0.5B-shaped model (494M parameters, bf16 file, random weights: no hub here) through
# sft → reward → ppo with LoRA, then evaluate, on this machine, on the demo task; prints each
# stage's seconds and peak RSS (GNU time), and SFT's tokens/s with LoRA against full fine-tuning
# on the same batches.
#
#   scripts/qwen05b.sh [OUT]            (default runs/qwen05b; BIN=target/release, PY=.venv/bin/python)
#   FULL_SFT=0 scripts/qwen05b.sh       skips the full fine-tuning comparison (12.6 GB, slow)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/qwen05b}
bin=${BIN:-target/release}
py=${PY:-.venv/bin/python}
task=datasets/demo/task
mkdir -p "$out"
[ -f "$out/base/model.safetensors" ] || "$py" scripts/qwen05b.py "$out/base" "$task/demonstrations.jsonl"

# measure NAME CMD...: runs CMD with its output in OUT/NAME.log; prints seconds and peak RSS.
measure() {
  local name=$1
  shift
  if ! /usr/bin/time -f "%e %M" -o "$out/$name.time" "$@" >"$out/$name.log" 2>&1; then
    tail -5 "$out/$name.log"
    echo "$name failed"
    exit 1
  fi
  read -r secs kb <"$out/$name.time"
  printf '%-12s %8.1f s  peak RSS %6.2f GB\n' "$name" "$secs" "$(echo "$kb / 1048576" | bc -l)"
}
# tokens/s of an SFT run: the mean of its metrics lines after the first (warm-up).
rate() { jq -s '[.[1:][] | .tokens_per_s | select(. != null)] | add / length' "$1/metrics.jsonl"; }

lora=(--set lora.r=16 --set lora.alpha=32 --set 'lora.target_modules=["all-linear"]')
sft_sets=(--set "model.base=$out/base" --set "data.path=$task/demonstrations.jsonl"
  --set train.max_steps=${SFT_STEPS:-6} --set train.batch_size=4 --set train.eval_every=0
  --set train.save_every=0 --set train.log_every=1 --set data.max_length=64)
rm -rf "$out/sft" "$out/sft-full" "$out/rm" "$out/ppo" "$out/eval"
measure sft-lora "$bin/sft" --config configs/sft.toml --out "$out/sft" "${sft_sets[@]}" "${lora[@]}"
echo "  sft with LoRA: $(rate "$out/sft") tokens/s"
if [ "${FULL_SFT:-1}" = 1 ]; then
  measure sft-full "$bin/sft" --config configs/sft.toml --out "$out/sft-full" "${sft_sets[@]}"
  echo "  sft, full fine-tuning: $(rate "$out/sft-full") tokens/s"
fi
measure reward-lora "$bin/reward" --config configs/reward.toml --out "$out/rm" \
  --set "model.base=$out/sft/final" --set "data.path=$task/rankings.csv" \
  --set ensemble.members=1 --set train.max_steps=${RM_STEPS:-4} --set train.batch_size=2 \
  --set train.eval_every=0 --set train.save_every=0 --set 'data.demonstrations=""' "${lora[@]}"
measure ppo-lora "$bin/ppo" --config configs/ppo.toml --out "$out/ppo" \
  --set "model.policy=$out/sft/final" --set "model.reward_model=$out/rm/final" \
  --set "data.prompts=$task/prompts.jsonl" --set train.iterations=${PPO_ITERS:-3} \
  --set rollout.batch_size=8 --set ppo.minibatch_size=4 --set ppo.epochs=1 \
  --set rollout.max_new_tokens=24 --set train.save_every=0 --set train.log_every=1 "${lora[@]}"
jq -c '{step, time_generate_s, time_score_s, time_forward_s, time_train_s, episodes_per_s}' "$out/ppo/metrics.jsonl"
measure evaluate "$bin/evaluate" --policy "$out/ppo/final" --baseline "$out/sft/final" \
  --reward-model "$out/rm/final" --prompts "$task/eval_prompts.jsonl" --max-prompts 16 \
  --max-new-tokens 24 --out "$out/eval"
