#!/usr/bin/env bash
# Stage-level benchmark against Hugging Face TRL: the same tiny and small models, data and lengths,
# on this CPU, our stage vs TRL's trainer in one run:
#   sft    vs SFTTrainer     tokens/s       target >= 1.5x
#   reward vs RewardTrainer  comparisons/s  target >= 2x   (K = 4 groups; TRL trains the 6 pairs)
#   ppo    vs RLOOTrainer    episodes/s     target >= 2x   (TRL has no PPO trainer any more; RLOO
#                                                           does less work: no critic)
# It prints every command it runs, one JSON line per measurement
#   {"preset", "stage", "impl", "unit", "per_s", ...}
# (all of them also in $OUT_DIR/results.jsonl) and, at the end, a table of ratios ours / TRL.
# The TRL side is scripts/bench_trl.py. The numbers are reported as they come out: nothing is tuned
# for either side beyond making them do the same work.
#
# Environment:
#   SHAPES="tiny small"   presets to run (`model init --preset`)
#   BIN_DIR               our binaries (default target/release); SKIP_BUILD=1 skips
#                         `cargo build --release --bins`
#   PYTHON                a python with torch 2.9.0 + transformers (default: .venv/bin/python if it
#                         exists, else a new .venv-bench with `pip install torch==2.9.0 transformers`).
#                         TRL is always installed into it here (`pip install trl`, torch and
#                         transformers held at their installed versions by a constraints file);
#                         TRL_SPEC pins another version (default: trl, the newest that fits).
#   OUT_DIR               default runs/bench-stages (wiped per preset)
#   MATMUL                fp32 (default) or bf16: our `matmul` config key, and on the TRL side
#                         torch.backends.mkldnn.matmul.fp32_precision = "bf16" (the same contract:
#                         fp32 weights, matrix products on bf16 operands through oneDNN)
#   SFT_STEPS             measured SFT steps; the same number of warm-up steps runs first (default 60)
#   RM_WARMUP, RM_STEPS   reward warm-up / measured steps (default 5 / 40)
#   PPO_WARMUP, PPO_ITERS PPO/RLOO warm-up / measured iterations (default 3 / 12)
#   ROUNDS                rounds per preset, each running our three stages then TRL's (default
#                         2); the table takes each side's best round and shows the range over
#                         the rounds (a shared machine's noise only ever slows a run down; the
#                         same rule as `model bench --rounds`)
#   Per preset: SFT_STEPS_small=... etc. override for one preset.
# With the defaults the whole run (both presets) takes about 4 minutes on a 2-core CPU after the
# build (and the TRL install). Run it on an otherwise idle machine: it prints how busy the CPU was
# with other work before each preset and how much CPU time other processes took while the preset
# ran, with a warning when they took more than 5%. Under contention PyTorch (OpenMP threads on
# every core) slows down far more than ours: on this 2-core machine a concurrent `cargo build` cut
# TRL's rates 3-25x and ours hardly at all, so such a run says nothing about either.
#
# What is the same on both sides (the fairness rules):
# - Model: for each preset a fresh `model init` folder (Llama architecture, tied embeddings, a
#   byte-level BPE trained on the demonstrations; vocab 1024 for tiny, 8192 asked for small, which
#   the demo corpus caps at 1140 tokens — printed by `model init`; so "small" here is the small
#   trunk with a ~1.1k vocabulary, not model bench's 8192). Both sides load the same
#   folder (transformers reads config.json, model.safetensors and tokenizer.json), so they start
#   from identical weights and tokenizer. The reward model of both sides is that folder's trunk
#   with a fresh scalar head. PPO/RLOO's policy is the SFT folder written by our sft run here, its
#   frozen copy the reference; the reward model is the folder written by our reward run (an HF
#   LlamaForSequenceClassification, which transformers loads).
# - Data: written once by `bench_trl.py prepare` from datasets/demo/task: the demonstrations
#   without exact duplicates; the rankings' groups with K = 4 distinct ranks (tie-free, so that a
#   group is exactly C(4,2) = 6 comparisons); the PPO prompts. Template
#   "Human: {prompt}\n\nAssistant:" on both sides (TRL gets the prompts already templated).
# - Numerics: fp32 everywhere (TRL: bf16=False; its default is bf16; MATMUL=bf16 changes only the
#   matrix products, on both sides), AdamW with betas
#   0.9/0.999, eps 1e-8, weight decay 0, global grad-norm clip 1.0, no gradient checkpointing
#   (TRL's configs default to it; our stages never recompute), no dropout, the same learning
#   rates and schedules (sft: 3e-3, 5 warm-up steps, cosine to 0.1x; reward: 1e-3, same shape;
#   ppo: 3e-5 constant). Learning rates do not change the speed; they are matched anyway.
# - sft vs SFTTrainer: batch 16 examples, max_length 128 (longer examples dropped on both sides;
#   TRL would cut them), no packing, no padding-free, loss on the response + EOS only
#   (prompt/completion records, completion_only_loss=True; TRL appends EOS to the completion as
#   our sft appends the EOS token). Unit: tokens = the real (non-padding) input tokens of the
#   step's rows minus one per row, i.e. prompt + response + EOS - 1 per example — what our
#   `tokens_per_s` counts (our step feeds tokens[..n-1]; TRL feeds all n tokens and ignores the
#   last position, so TRL is credited with the same units for one more position of work per row).
#   The two sides draw their batches in different seeded orders from the same examples.
# - reward vs RewardTrainer: 8 groups per step for ours (all 4 x 8 = 32 responses in one padded
#   forward, the loss over the groups' 48 pairs), 48 pairs per step for TRL (per_device batch 48:
#   96 rows, chosen + rejected, in one forward): the same comparisons per optimizer step.
#   max_length 128 (nothing in this data comes near it). Our metrics give responses/s (4 per
#   group); comparisons/s = responses/s x 6/4. TRL: pairs/s.
# - ppo vs RLOOTrainer: 16 episodes per iteration (ours: 16 prompts x 1 sample; RLOO: 8 prompts x
#   num_generations 2 — RLOO needs >= 2 per prompt), max_new_tokens 24, temperature 1, top-k 0,
#   top-p 1, stop at EOS, KL coefficient 0.3 (ours: k1 KL in the per-token reward; RLOO: beta 0.3,
#   its k1 KL summed per sequence in the reward), 4 passes over the rollout in minibatches of 8:
#   8 policy optimizer steps per iteration on both sides (RLOO: per_device_train_batch_size 8,
#   steps_per_generation 2, num_iterations 4). Work that only ours does: a critic (forward over
#   the rollout, and 8 value-loss backward + AdamW steps per iteration), GAE. Both: sampling with
#   a KV cache (ours: our KV-cache batch path; RLOO: transformers' generate), decode and
#   re-tokenise for the reward model, reward-model forward, a no-grad forward of the policy (old
#   log-probs) and of the reference (KL), the clipped policy loss.
#   Unit: episodes (sampled responses trained on) per second.
#
# What each side's timed window holds (warm-up steps excluded on both sides):
# - ours (trainer::Run begin_step..end_step, the `*_per_s` of metrics.jsonl): sft / reward: the
#   step's batch assembly from pre-tokenised examples, forward, loss, backward, global-norm clip,
#   AdamW; ppo: the whole iteration — generation, scoring, the no-grad forwards, rewards/GAE, all
#   PPO epochs (policy + critic). Not in it: logging, evaluation, checkpoints (evaluation is off:
#   validation_fraction 0; checkpoints only after the last step), samples.jsonl.
# - TRL (a TrainerCallback's times at on_step_end, bench_trl.py): from the previous step's end
#   to this step's end: the dataloader fetch and collation of the batch, training_step (for RLOO
#   the round's generation, reward scoring and old/ref log-probs happen inside the first step of
#   a round), clipping, optimizer and scheduler steps, zero_grad. Logging, evaluation and saving
#   are off (strategies "no", no progress printer). TRL's own per-step bookkeeping stays in (it is
#   part of its trainers: SFTTrainer's token-accuracy / entropy metrics from its fused LM head,
#   RewardTrainer's accuracy / margin, RLOO's completion statistics), as do transformers' per-step
#   FLOP and token counters. `per_s_step_only` in TRL's JSON lines leaves the fetch/collation out.
# - Window sizes: sft: ours logs every N steps over 2N steps, so its last metrics line is exactly
#   the last N steps; TRL runs the same 2N steps and times the last N. reward and ppo: a metrics
#   line per step/iteration, all with the same units, so the rate over the measured ones is exact
#   (harmonic mean of the per-step rates); TRL times whole rounds (8 optimizer steps) for RLOO.
#
# Differences that remain (not removable without changing one side's algorithm):
# - Padding: both sides pad each batch to its longest row; our forward then runs the projections
#   and the MLP on the real tokens only (attention in the padded layout), TRL/transformers on every
#   position (TRL's padding_free mode flattens the batch, which is correct only with FlashAttention,
#   not available on the CPU). Same values for the real tokens; about 30% of an SFT batch here is
#   padding.
# - Attention: TRL/transformers use their default (sdpa) kernel; ours its own attention.
#   PyTorch uses its default intra-op threads (printed as torch_threads); ours its own pool. Both
#   processes run alone on the same cores, one after the other.
# - LM head: both sides run it only at the positions whose next token is a target (SFT: response
#   + EOS; PPO/RLOO: the response). SFTTrainer does it in tiles with a fused loss (plus entropy and
#   top-1 for its metrics); ours gathers those positions' hidden states, then LM head and
#   log-softmax.
# - RLOO samples 2 completions for each of 8 prompts, ours 1 for each of 16; response lengths
#   follow the same policy and sampling but are random on both sides (both JSON lines carry the
#   measured iterations' mean response length, EOS included).
# - TRL's RewardTrainer tokenises prompt+response as one string, ours tokenises template(prompt)
#   and the response separately; with this BPE (split at spaces and punctuation) the lengths agree.
# - AdamW: transformers' default optimizer (torch's fused AdamW kernel on this torch); ours burn's
#   AdamW.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
bin=${BIN_DIR:-target/release}
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  echo "+ cargo build --release --bins"
  cargo build --release --bins
fi
case "$bin" in /*) ;; *) bin="$root/$bin" ;; esac
task=datasets/demo/task
template=$'Human: {prompt}\n\nAssistant:'
out=${OUT_DIR:-runs/bench-stages}
shapes=${SHAPES:-tiny small}
rounds=${ROUNDS:-2}
matmul=${MATMUL:-fp32}

# Prints a command (shell-quoted, so that it can be pasted) and runs it.
show() {
  echo
  printf '+'
  printf ' %q' "$@"
  echo
}
run() {
  show "$@"
  "$@"
}

# Python: absolute path; TRL installed here, with torch and transformers held where they are.
if [ -n "${PYTHON:-}" ]; then
  py=$PYTHON
elif [ -x .venv/bin/python ]; then
  py=$root/.venv/bin/python
else
  py=$root/.venv-bench/bin/python
  if [ ! -x "$py" ]; then
    run python3 -m venv .venv-bench
    run "$py" -m pip install -q torch==2.9.0 transformers
  fi
fi
case "$py" in /*) ;; *) py=$(command -v "$py") ;; esac
mkdir -p "$out"
"$py" - >"$out/constraints.txt" <<'EOF'
import importlib.metadata as m
for name in ("torch", "transformers"):
    print(f"{name}=={m.version(name)}")
EOF
run "$py" -m pip install -q "${TRL_SPEC:-trl}" -c "$out/constraints.txt"
"$py" -c 'import trl, transformers, torch; print(f"trl {trl.__version__}, transformers {transformers.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads)")'
# How busy the CPU is with other work (one second of /proc/stat, before we start anything):
# these stages are timed on all cores, so anything else running makes both sides noisy (PyTorch's
# OpenMP threads suffer most from it).
cpu_busy() {
  local a b busy total i
  read -r -a a </proc/stat
  sleep 1
  read -r -a b </proc/stat
  busy=0
  for i in 1 2 3 6 7 8; do busy=$((busy + b[i] - a[i])); done
  total=$((busy + b[4] - a[4] + b[5] - a[5]))
  local pct=$((100 * busy / (total > 0 ? total : 1)))
  echo "machine: $(nproc) cores, ${pct}% busy with other work over the last second; $(uptime)"
  if [ "$pct" -gt 15 ]; then
    echo "WARNING: the CPU is ${pct}% busy with other work: the timings below are noisy"
  fi
}
cpu_busy

# CPU time the rest of the machine used while a preset ran: all busy time in /proc/stat minus our
# own children's (`times`; the stages and TRL run one at a time, so theirs is all of ours).
clk=$(getconf CLK_TCK)
busy_cs() {
  local a
  read -r -a a </proc/stat
  echo $(((a[1] + a[2] + a[3] + a[6] + a[7] + a[8]) * 100 / clk))
}
ours_cs() {
  times >"$out/.times" # not in a subshell: its children's times would be 0
  awk 'NR == 2 { s = 0; for (i = 1; i <= 2; i++) { split($i, p, "m"); sub("s", "", p[2]); s += p[1] * 60 + p[2] } printf "%d", s * 100 }' "$out/.times"
}
mark() {
  mark_busy=$(busy_cs)
  ours_cs >"$out/.mark"
  mark_ours=$(cat "$out/.mark")
  mark_wall=$(date +%s)
}
other_work() {
  local busy ours wall other
  busy=$(($(busy_cs) - mark_busy))
  ours_cs >"$out/.mark"
  ours=$(($(cat "$out/.mark") - mark_ours))
  wall=$(($(date +%s) - mark_wall))
  other=$((busy > ours ? busy - ours : 0))
  echo "CPU time while $1 ran: ours + TRL $((ours / 100)) s, other processes $((other / 100)) s (wall ${wall} s x $(nproc) cores)"
  if [ "$wall" -gt 0 ] && [ $((other / wall)) -gt $((5 * $(nproc))) ]; then
    echo "WARNING: other processes used more than 5% of the CPU while $1 ran: its timings are noisy"
  fi
}

results=$out/results.jsonl
: >"$results"
: >"$out/load.txt"
# Runs a command whose stdout holds JSON lines: shows them and keeps them in results.jsonl.
collect() {
  show "$@"
  "$@" | tee "$out/.last-output"
  grep '^{' "$out/.last-output" >>"$results" || true
}

# A per-preset override (SFT_STEPS_small) or the global value or the default.
knob() {
  local name=$1 preset=$2 default=$3 v
  v="${name}_${preset}"
  v=${!v:-}
  [ -n "$v" ] || v=${!name:-$default}
  echo "$v"
}

work=$out/data
run "$py" scripts/bench_trl.py prepare --task "$task" --template "$template" --out "$work"

for preset in $shapes; do
  o=$out/$preset
  rm -rf "$o"
  mkdir -p "$o"
  sft_n=$(knob SFT_STEPS "$preset" 60)
  rm_w=$(knob RM_WARMUP "$preset" 5)
  rm_n=$(knob RM_STEPS "$preset" 40)
  ppo_w=$(knob PPO_WARMUP "$preset" 3)
  ppo_n=$(knob PPO_ITERS "$preset" 12)
  case "$preset" in tiny) vocab=1024 ;; *) vocab=8192 ;; esac
  echo
  echo "=== $preset: sft $sft_n+$sft_n steps, reward $rm_w+$rm_n steps, ppo $ppo_w+$ppo_n iterations, $rounds round(s)"
  cpu_busy
  mark
  run "$bin/model" init --preset "$preset" --texts "$work/texts.txt" --vocab-size "$vocab" --seed 0 \
    --out "$o/init"

  for round in $(seq 1 "$rounds"); do
    echo
    echo "--- $preset: round $round of $rounds"
    # Each round's stages start afresh (the same seeds: the same folders for TRL's side).
    rm -rf "$o/sft" "$o/reward" "$o/ppo" "$o/trl"
    # Ours. Evaluation off (no validation split), checkpoints only after the last step.
    run "$bin/sft" --config configs/sft.toml --out "$o/sft" --set matmul="$matmul" \
      --set model.base="$o/init" --set data.path="$work/sft.jsonl" \
      --set data.template="$template" --set data.validation_fraction=0 --set data.max_length=128 \
      --set data.packing=false --set train.batch_size=16 --set train.grad_accum=1 \
      --set train.max_steps=$((2 * sft_n)) --set train.log_every="$sft_n" \
      --set train.eval_every=0 --set train.save_every=0 --set train.lr=3e-3 \
      --set train.warmup_steps=5 --set train.max_grad_norm=1.0
    run "$bin/reward" --config configs/reward.toml --out "$o/reward" --set matmul="$matmul" \
      --set model.base="$o/init" --set data.path="$work/groups.jsonl" --set data.kind=ranked_groups \
      --set data.template="$template" --set data.validation_fraction=0 --set data.max_length=128 \
      --set data.ties=drop --set data.demonstrations= --set loss.kind=pairwise \
      --set loss.forward=groups --set train.batch_size=8 --set train.grad_accum=1 \
      --set train.max_steps=$((rm_w + rm_n)) --set train.log_every=1 --set train.eval_every=0 \
      --set train.save_every=0 --set train.lr=1e-3 --set train.max_grad_norm=1.0
    run "$bin/ppo" --config configs/ppo.toml --out "$o/ppo" --set matmul="$matmul" \
      --set model.policy="$o/sft/final" --set model.reward_model="$o/reward/final" \
      --set model.critic=reward_model --set data.prompts="$task/prompts.jsonl" \
      --set rollout.batch_size=16 --set rollout.max_new_tokens=24 --set rollout.temperature=1.0 \
      --set rollout.top_k=0 --set rollout.top_p=1.0 --set kl.coef=0.3 --set kl.adaptive=false \
      --set ppo.epochs=4 --set ppo.minibatch_size=8 --set ppo.max_approx_kl=0 \
      --set train.iterations=$((ppo_w + ppo_n)) --set train.log_every=1 --set train.save_every=0 \
      --set train.sample_every=0 --set train.max_grad_norm=1.0

    collect "$py" scripts/bench_trl.py ours --preset "$preset" --stage sft \
      --metrics "$o/sft/metrics.jsonl" --warmup "$sft_n" --steps "$sft_n"
    collect "$py" scripts/bench_trl.py ours --preset "$preset" --stage reward \
      --metrics "$o/reward/metrics.jsonl" --warmup "$rm_w" --steps "$rm_n" --per-step $((4 * 8))
    collect "$py" scripts/bench_trl.py ours --preset "$preset" --stage ppo \
      --metrics "$o/ppo/metrics.jsonl" --warmup "$ppo_w" --steps "$ppo_n" --per-step 16

    # TRL, on the same folders and data.
    collect "$py" scripts/bench_trl.py run --preset "$preset" --work "$work" --out "$o/trl" \
      --init "$o/init" --policy "$o/sft/final" --reward-model "$o/reward/final" \
      --template "$template" --matmul "$matmul" \
      --sft-warmup "$sft_n" --sft-steps "$sft_n" --sft-batch 16 --sft-max-length 128 \
      --rm-warmup "$rm_w" --rm-steps "$rm_n" --rm-groups 8 --rm-max-length 128 \
      --ppo-warmup "$ppo_w" --ppo-iters "$ppo_n" --ppo-episodes 16 --ppo-num-generations 2 \
      --ppo-minibatch 8 --ppo-epochs 4 --ppo-max-new-tokens 24 --ppo-beta 0.3
  done
  echo
  other_work "$preset" >"$out/.load" # not in a pipeline (a subshell): see ours_cs
  cat "$out/.load"
  cat "$out/.load" >>"$out/load.txt"
done

echo
cpu_busy
echo "results: $results"
echo
"$py" scripts/bench_trl.py table "$results"
cat "$out/load.txt"
