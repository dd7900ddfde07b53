#!/usr/bin/env bash
# The demo pipeline on the project's own demo task (datasets/demo/task, written by
# `labeling simulate --seed 0`), end to end on tiny models:
#   labeling import → sft → reward → ppo → evaluate
# Each stage's command is printed before it runs, so that the real commands can be learned here.
# Environment: OUT_DIR (default runs/demo) holds every output; TASK (default datasets/demo/task)
# is the task folder (`labeling simulate --out DIR` writes others); SFT_STEPS, RM_STEPS, PPO_ITERS
# and EVAL_PROMPTS shorten the run (CI uses small values); SKIP_BUILD=1 uses the binaries as built.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --release --bins
out=${OUT_DIR:-runs/demo}
task=${TASK:-datasets/demo/task}
bin=target/release
mkdir -p "$out"
run() {
  echo
  echo "+ $*"
  "$@"
}
# Labelers' rankings (a long CSV, K = 4, 3 labelers) → rankings.parquet, pairs.parquet, stats.json.
run $bin/labeling import "$task/rankings.csv" --out "$out/labels"
# Stage 1: supervised fine-tuning of a tiny model (BPE trained on the demonstrations). Half of the
# demonstrations come from careless demonstrators who skip the task's "The answer is X." form, so
# the SFT policy has the habit too: the room PPO has to improve.
run $bin/sft --config configs/sft.toml --out "$out/sft" \
  --set data.path="$task/demonstrations.jsonl" --set train.max_steps="${SFT_STEPS:-3000}"
# Stage 2: a reward model on the K-way rankings, from the SFT model's trunk.
run $bin/reward --config configs/reward.toml --out "$out/reward" \
  --set model.base="$out/sft/final" --set data.path="$out/labels" \
  --set data.demonstrations="$task/demonstrations.jsonl" \
  --set train.max_steps="${RM_STEPS:-300}"
# Stage 3: PPO of the SFT policy against the reward model, critic from the reward model.
run $bin/ppo --config configs/ppo.toml --out "$out/ppo" \
  --set model.policy="$out/sft/final" --set model.reward_model="$out/reward/final" \
  --set data.prompts="$task/prompts.jsonl" --set train.iterations="${PPO_ITERS:-400}"
# PPO's policy against the SFT model on held-out prompts, sampled as PPO samples (temperature 1,
# two samples per prompt): reward-model score, and gold accuracy by the task's rule, which the
# reward model never saw.
run $bin/evaluate --policy "$out/ppo/final" --baseline "$out/sft/final" \
  --reward-model "$out/reward/final" --prompts "$task/eval_prompts.jsonl" \
  --max-prompts "${EVAL_PROMPTS:-300}" --temperature 1 --samples-per-prompt 2 \
  --max-new-tokens 48 --gold final_answer --demonstrations "$task/demonstrations.jsonl" \
  --runs "$out/sft" "$out/reward" "$out/ppo" --out "$out/eval"
echo
echo "report: $out/eval/report.md"
