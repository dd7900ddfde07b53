#!/usr/bin/env bash
# The demo pipeline: what exists of it so far, end to end on tiny models.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin model
out=${OUT_DIR:-runs/demo}
mkdir -p "$out"
target/release/model init --preset tiny --texts README.md --vocab-size 1024 --out "$out/init"
target/release/model info "$out/init"
target/release/model generate "$out/init" --prompt "What is RLHF?" \
  --template "Human: {prompt}\n\nAssistant:" --max-new-tokens 16 --seed 1 --json
python=${PYTHON:-}
[ -z "$python" ] && [ -x .venv/bin/python ] && python=.venv/bin/python
target/release/model bench --shape small --steps 3 ${python:+--python "$python"}
# Labeler rankings (the project's own demo file) → rankings.parquet, pairs.parquet, stats.json.
cargo build --release --bin labeling
target/release/labeling import datasets/demo/rankings_wide.csv --out "$out/labels"
# Stage 1: supervised fine-tuning of a tiny model on the bundled demonstrations, then a sample.
cargo build --release --bin sft
target/release/sft --config configs/sft.toml --out "$out/sft"
target/release/model generate "$out/sft/final" --prompt "What is 4 plus 5?" \
  --template "Human: {prompt}\n\nAssistant:" --temperature 0 --max-new-tokens 16 --json
