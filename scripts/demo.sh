#!/usr/bin/env bash
# The demo pipeline on the project's own demo task (datasets/demo/task, written by
# `labeling simulate --seed 0`), end to end on tiny models:
#   labeling import → sft → reward → ppo → evaluate
# Each stage's command is printed before it runs, so that the real commands can be learned here.
# Environment: OUT_DIR (default runs/demo) holds every output; SFT_STEPS, RM_STEPS, PPO_ITERS and
# EVAL_PROMPTS shorten the run (CI uses small values); SKIP_BUILD=1 uses the binaries as built.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --release --bins
out=${OUT_DIR:-runs/demo}
bin=target/release
mkdir -p "$out"
run() {
  echo
  echo "+ $*"
  "$@"
}
# Labelers' rankings (a long CSV, K = 4, 3 labelers) → rankings.parquet, pairs.parquet, stats.json.
run $bin/labeling import datasets/demo/task/rankings.csv --out "$out/labels"
# Stage 1: supervised fine-tuning of a tiny model (BPE trained on the demonstrations).
run $bin/sft --config configs/sft.toml --out "$out/sft" \
  --set data.path=datasets/demo/task/demonstrations.jsonl --set train.max_steps="${SFT_STEPS:-400}"
# Stage 2: a reward model on the K-way rankings, from the SFT model's trunk.
run $bin/reward --config configs/reward.toml --out "$out/reward" \
  --set model.base="$out/sft/final" --set data.path="$out/labels" \
  --set data.demonstrations=datasets/demo/task/demonstrations.jsonl \
  --set train.max_steps="${RM_STEPS:-150}"
# Stage 3: PPO of the SFT policy against the reward model, critic from the reward model.
run $bin/ppo --config configs/ppo.toml --out "$out/ppo" \
  --set model.policy="$out/sft/final" --set model.reward_model="$out/reward/final" \
  --set data.prompts=datasets/demo/task/prompts.jsonl --set train.iterations="${PPO_ITERS:-60}"
# PPO's policy against the SFT model on held-out prompts: reward-model score and gold accuracy.
run $bin/evaluate --policy "$out/ppo/final" --baseline "$out/sft/final" \
  --reward-model "$out/reward/final" --prompts datasets/demo/task/eval_prompts.jsonl \
  --max-prompts "${EVAL_PROMPTS:-100}" --temperature 0 --max-new-tokens 48 \
  --demonstrations datasets/demo/task/demonstrations.jsonl \
  --runs "$out/sft" "$out/reward" "$out/ppo" --out "$out/eval"
echo
echo "report: $out/eval/report.md"
