#!/usr/bin/env bash
# The demo pipeline on the project's own demo task (datasets/demo/task, written by
# `labeling simulate --seed 0`), end to end on tiny models:
#   labeling import → sft → reward → ppo
# Each stage's command is printed before it runs, so that the real commands can be learned here.
# OUT_DIR (default runs/demo) holds every output; the stages' configs are in configs/.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins
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
  --set data.path=datasets/demo/task/demonstrations.jsonl --set train.max_steps=400
# Stage 2: a reward model on the K-way rankings, from the SFT model's trunk.
run $bin/reward --config configs/reward.toml --out "$out/reward" \
  --set model.base="$out/sft/final" --set data.path="$out/labels" \
  --set data.demonstrations=datasets/demo/task/demonstrations.jsonl
# Stage 3: PPO of the SFT policy against the reward model, critic from the reward model.
run $bin/ppo --config configs/ppo.toml --out "$out/ppo" \
  --set model.policy="$out/sft/final" --set model.reward_model="$out/reward/final" \
  --set data.prompts=datasets/demo/task/prompts.jsonl
run $bin/model generate "$out/ppo/final" --prompt "What is 4 plus 5?" \
  --temperature 0 --max-new-tokens 24 --json --template "Human: {prompt}\n\nAssistant:"
echo
echo "outputs in $out: labels/, sft/, reward/, ppo/ (each with metrics.jsonl and summary.json)"
